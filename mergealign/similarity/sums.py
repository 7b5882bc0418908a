"""Per-tensor sums of the similarity pass: options, TIES thresholds, and the running sums fed by a kernel.

The numba kernel (mergealign.similarity.kernels) sums a tensor row by row into running accumulators; without
numba the plain-torch kernel :func:`_torch_sums` gives the same sums up to float64 rounding.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mergealign.errors import MergeAlignError
from mergealign.tensor_names import layer_index, module_type

log = logging.getLogger(__name__)

DEFAULT_TIES_DENSITY = 0.2
DEFAULT_TIES_SAMPLE = 1 << 16

PAIR_SUMS = (
    "numel",
    "bb",
    "bd",
    "ba",
    "dd",
    "da",
    "aa",
    "both_nonzero",
    "conflicts",
    "top_d",
    "top_a",
    "top_energy_d",
    "top_energy_a",
    "top_both",
    "top_both_conflicts",
)
MERGED_SUMS = ("mb", "md", "ma", "mm")


@dataclass(frozen=True)
class SimilarityOptions:
    """Knobs of the pass. ``ties_sample=None``: exact TIES thresholds for every tensor (slower)."""

    ties_density: float = DEFAULT_TIES_DENSITY
    ties_sample: int | None = DEFAULT_TIES_SAMPLE
    seed: int = 0
    use_numba: bool = True  # False: the plain-torch kernel (same sums up to float rounding; slower)

    def __post_init__(self) -> None:
        if not 0.0 < self.ties_density <= 1.0:
            raise MergeAlignError(f"ties_density: must be in (0, 1], got {self.ties_density!r}")
        if self.ties_sample is not None and self.ties_sample < 1:
            raise MergeAlignError(
                f"ties_sample: must be a positive integer or None, got {self.ties_sample!r}"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "ties_density": self.ties_density,
            "ties_sample": self.ties_sample,
            "seed": self.seed,
        }


@dataclass
class TensorSums:
    """The sums of one tensor (see mergealign.similarity); ``merged[label]`` holds mb, md, ma, mm."""

    name: str
    shape: tuple[int, ...]
    layer: int | None
    module: str
    sums: dict[str, float]
    merged: dict[str, dict[str, float]] = field(default_factory=dict)
    thr_d: float = 0.0
    thr_a: float = 0.0


def _sample_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}\x00similarity\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _keep(density: float, n: int) -> int:
    # Same rule as the engine's TIES trim (mergealign.methods.selection.keep_count).
    return max(1, int(density * n))


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


N_PAIR = 14  # length of the pair part of a kernel's sums vector (see mergealign.similarity.kernels)


def _numba_kernel():
    """The fused numba kernel, or None when numba is not installed (the torch kernel then runs)."""
    global _NUMBA
    if _NUMBA is None:
        try:
            from mergealign.similarity import kernels

            _NUMBA = kernels.tensor_sums
        except ImportError:
            log.warning("numba is not installed: the similarity pass uses the slower torch kernel")
            _NUMBA = False
    return _NUMBA or None


_NUMBA: Any = None


def _kernel_array(t: Tensor):
    """A numpy view the numba kernel reads: bfloat16 as its uint16 bits, float32 as is, others as float32."""
    import numpy as np

    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype != torch.float32:
        t = t.float()
    return t.numpy()


def _thresholds(name: str, b: Tensor, e: Tensor, a: Tensor, opts: SimilarityOptions) -> tuple[float, float]:
    """Per-tensor TIES thresholds t_D, t_A: exact, or the same order statistic of a seeded sample.

    numpy (single-threaded) rather than torch: small torch ops stall badly on a loaded machine when their
    OpenMP threads wait for each other.
    """
    import numpy as np

    n = b.numel()
    k = _keep(opts.ties_density, n)
    if opts.ties_sample is None and n > (1 << 22):
        from mergealign.methods.selection import kth_largest_abs

        bf = b.float()
        return kth_largest_abs(e.float() - bf, [k])[0], kth_largest_abs(a.float() - bf, [k])[0]
    bn, en, an = (_f32_numpy(t) for t in (b, e, a))
    if opts.ties_sample is not None and n > opts.ties_sample:
        rng = np.random.Generator(np.random.PCG64(_sample_seed(opts.seed, name)))
        idx = np.sort(rng.integers(0, n, size=opts.ties_sample))
        bn, en, an = bn[idx], en[idx], an[idx]
        k = _keep(opts.ties_density, opts.ties_sample)
    return _kth_largest_np(np.abs(en - bn), k), _kth_largest_np(np.abs(an - bn), k)


def _f32_numpy(t: Tensor):
    """float32 numpy array of a flat tensor; bfloat16 is decoded lazily (index first, then decode)."""
    arr = _kernel_array(t)
    return _Bf16View(arr) if arr.dtype.kind == "u" else arr


class _Bf16View:
    """bfloat16 bits (uint16) that decode to float32 when indexed or subtracted."""

    def __init__(self, bits) -> None:
        self.bits = bits

    def __getitem__(self, idx) -> _Bf16View:
        return _Bf16View(self.bits[idx])

    def f32(self):
        import numpy as np

        return (self.bits.astype(np.uint32) << np.uint32(16)).view(np.float32)

    def __sub__(self, other):
        return self.f32() - (other.f32() if isinstance(other, _Bf16View) else other)

    def __rsub__(self, other):
        return other - self.f32()


def _kth_largest_np(values, k: int) -> float:
    import numpy as np

    n = values.size
    return float(np.partition(values, n - k)[n - k])


class _Running:
    """Running sums of one tensor (possibly fed in consecutive row blocks)."""

    def __init__(self, name: str, shape: tuple[int, ...], n_merged: int, thr_d: float, thr_a: float) -> None:
        import numpy as np

        self.name, self.shape = name, shape
        self.numel = math.prod(shape)
        self.row_len = math.prod(shape[1:]) if len(shape) >= 2 else max(self.numel, 1)
        self.thr_d, self.thr_a = thr_d, thr_a
        self.seen = 0
        self.acc = np.zeros(8, np.float64)
        self.cnt = np.zeros(6, np.int64)
        self.macc = np.zeros(4 * max(n_merged, 1), np.float64)

    def add(self, b: Tensor, e: Tensor, a: Tensor, merged: Sequence[Tensor], use_numba: bool) -> None:
        kernel = _numba_kernel() if use_numba else None
        if kernel is not None:
            arrays = [_kernel_array(t) for t in (b, e, a)]
            ms = [_kernel_array(m) for m in merged]
            if len({m.dtype for m in ms}) > 1:  # one tuple type for all merged models
                ms = [_kernel_array(m.float()) for m in merged]
            tup = tuple(ms) if ms else (arrays[0],)
            kernel(*arrays, tup, len(ms), self.row_len, self.thr_d, self.thr_a, self.acc, self.cnt, self.macc)
        else:
            x = _torch_sums(b, e, a, merged, self.thr_d, self.thr_a)
            self.acc += x[:8]
            self.cnt += [int(v) for v in x[8:N_PAIR]]
            self.macc[: 4 * len(merged)] += x[N_PAIR:]
        self.seen += b.numel()

    def record(self, merged_labels: Sequence[str]) -> TensorSums:
        acc, cnt, macc = self.acc.tolist(), [int(c) for c in self.cnt.tolist()], self.macc.tolist()
        sums: dict[str, float] = {
            "numel": self.seen,
            "bb": acc[0],
            "bd": acc[1],
            "ba": acc[2],
            "dd": acc[3],
            "da": acc[4],
            "aa": acc[5],
            "both_nonzero": cnt[0],
            "conflicts": cnt[1],
            "top_d": cnt[2],
            "top_a": cnt[3],
            "top_energy_d": acc[6],
            "top_energy_a": acc[7],
            "top_both": cnt[4],
            "top_both_conflicts": cnt[5],
        }
        merged = {
            label: dict(zip(MERGED_SUMS, macc[4 * j : 4 * j + 4], strict=True))
            for j, label in enumerate(merged_labels)
        }
        name = self.name
        return TensorSums(
            name, self.shape, layer_index(name), module_type(name), sums, merged, self.thr_d, self.thr_a
        )


def _torch_sums(
    b: Tensor,
    e: Tensor,
    a: Tensor,
    merged: Sequence[Tensor],
    thr_d: float,
    thr_a: float,
    chunk: int = 1 << 20,
) -> list[float]:
    """The kernel's sums with plain torch ops: [acc (8), cnt (6), macc (4 per merged)] as floats.

    The fallback when numba is missing (equal to the numba kernel up to float64 rounding), and the tests'
    second implementation.
    """
    b, e, a = _flat(b), _flat(e), _flat(a)
    merged = [_flat(m) for m in merged]
    n = b.numel()
    out = [0.0] * (N_PAIR + 4 * len(merged))
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        cb = b[sl].float()
        d = e[sl].float() - cb
        a_ = a[sl].float() - cb
        cb64, d64, a64 = cb.double(), d.double(), a_.double()
        in_d, in_a = d.abs() >= thr_d, a_.abs() >= thr_a
        both = (d != 0) & (a_ != 0)
        conf = both & ((d < 0) != (a_ < 0))
        vals = [
            cb64 @ cb64,
            cb64 @ d64,
            cb64 @ a64,
            d64 @ d64,
            d64 @ a64,
            a64 @ a64,
            (d64 * d64)[in_d].sum(),
            (a64 * a64)[in_a].sum(),
            both.sum(),
            conf.sum(),
            in_d.sum(),
            in_a.sum(),
            (in_d & in_a).sum(),
            (in_d & in_a & conf).sum(),
        ]
        for m in merged:
            x = (m[sl].float() - cb).double()
            vals += [x @ cb64, x @ d64, x @ a64, x @ x]
        for i, v in enumerate(vals):
            out[i] += float(v)
    return out
