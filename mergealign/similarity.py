"""Streamed weight-space similarity of the domain vector τ_D, the alignment vector τ_A and merged models.

With θ_0 the base, τ_D = θ_expert − θ_0, τ_A = θ_aligned − θ_0 and, for each merged model m, δ_m = θ_m − θ_0,
one pass over the checkpoints (one tensor at a time from each, walked in small blocks by a fused kernel —
mergealign.similarity_kernels — so memory stays flat in model size) collects per tensor only *sums*:

- inner products of (θ_0, τ_D, τ_A, δ_m): ``bb, bd, ba, dd, da, aa`` and per merged model ``mb, md, ma, mm``
  (τ and δ formed in float32 as the merge engine does, products accumulated in float64);
- ``both_nonzero`` (entries where τ_D ≠ 0 and τ_A ≠ 0) and ``conflicts`` (entries where they have opposite
  signs);
- TIES trim statistics at density k (``ties_density``, default 0.2): T_D is the set of entries that a per-tensor
  TIES trim keeps, {i : |τ_D,i| ≥ t_D} with t_D the k'-th largest |τ_D| and k' = max(1, int(k·n)) (the engine's
  convention, see mergealign.methods.selection); likewise T_A. Counted: ``top_d`` = |T_D|, ``top_a``,
  ``top_energy_d`` = Σ_{T_D} τ_D², ``top_energy_a``, ``top_both`` = |T_D ∩ T_A| and ``top_both_conflicts``
  (entries of T_D ∩ T_A with opposite signs). t_D is exact for tensors of at most ``ties_sample`` entries;
  for larger ones it is the same order statistic of a seeded random sample of ``ties_sample`` entries (rank
  error ≈ ±0.2 % of n at the default 65 536; ``ties_sample=None`` makes every threshold exact at the cost of
  extra passes). Counts are exact for the recorded thresholds (``thr_d``, ``thr_a``).

Every figure at every level (tensor, layer, module type, layer × module, overall) is derived from these sums
summed over the level's tensors, so aggregates are exact, never averages of per-tensor ratios:

======================  ===========================================================================
``norm_d``, ``norm_a``  ‖τ_D‖ = √dd, ‖τ_A‖ = √aa; ``norm_base`` = ‖θ_0‖; ``rel_norm_d`` = ‖τ_D‖/‖θ_0‖
``cos_da``              cos(τ_D, τ_A) = da / √(dd·aa)
``sign_conflict``       conflicts / both_nonzero: share of opposite signs where both vectors are non-zero
``both_nonzero``        both_nonzero / n
``ties_energy_d``       top_energy_d / dd: share of ‖τ_D‖² that a TIES trim at density k keeps (same for a)
``ties_overlap``        top_both / n (independent masks would give ≈ k²)
``ties_jaccard``        top_both / (top_d + top_a − top_both)
``ties_conflict``       top_both_conflicts / top_both: sign conflicts that TIES's election must resolve
``cos_expert_aligned``  cos(θ_expert, θ_aligned), from the Gram; > 0.9995 means SLERP ≡ linear interpolation
======================  ===========================================================================

Per merged model m (δ = δ_m):

======================  ===========================================================================
``cos_d``, ``cos_a``    cos(δ, τ_D), cos(δ, τ_A); ``norm_delta`` = ‖δ‖
``coef_d``, ``coef_a``  least-squares coefficients of δ ≈ c_D·τ_D + c_A·τ_A (the effective λ_D, λ_A: a
                        MergeAlign merge gives its λs back, up to the output rounding)
``share_d``             c_D·⟨τ_D, δ⟩ / ‖δ‖²: τ_D's share of ‖δ‖² (same for a). share_d + share_a +
                        ``share_residual`` = 1, where share_residual = ‖δ − c_D·τ_D − c_A·τ_A‖² / ‖δ‖² is the
                        part of the merged delta that neither vector explains (TIES, DARE, SLERP)
``cos_expert``          cos(θ_m, θ_expert); ``cos_aligned`` = cos(θ_m, θ_aligned)
======================  ===========================================================================

The standalone pass (:func:`compute_similarity`) reads the checkpoints; :class:`SimilarityObserver` computes
the same sums inside a merge pass from the tensors the engine already holds (whole, or in row blocks). Both use
one kernel that sums row by row into running accumulators, and aggregate tensors in name order, so they give
bit-identical numbers. Merged tensors are rounded to the output dtype first, as the standalone pass reads them
from disk. Without numba (the ``report`` extra) a plain-torch kernel gives the same sums up to float64 rounding.

Outputs of :meth:`SimilarityResult.write` (atomic): ``similarity.json`` (inputs, options, and per level the
sums and metrics), ``tensors.parquet`` (one row per tensor) and ``merged.parquet`` (one row per tensor and
merged model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergealign.checkpoint import FLOAT_CODES, Checkpoint, dtype_from_name
from mergealign.errors import MergeAlignError, PreflightError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_TIES_DENSITY = 0.2
DEFAULT_TIES_SAMPLE = 1 << 16

MODULE_TYPES = (
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_o",
    "mlp_gate",
    "mlp_up",
    "mlp_down",
    "norm",
    "embed",
    "lm_head",
    "other",
)
# Coarse groups used by contribution variants and plots.
MODULE_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("attn_q", "attn_k", "attn_v", "attn_o"),
    "mlp": ("mlp_gate", "mlp_up", "mlp_down"),
    "norm": ("norm",),
    "embed": ("embed",),
    "lm_head": ("lm_head",),
}

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
_INT_SUMS = {"numel", "both_nonzero", "conflicts", "top_d", "top_a", "top_both", "top_both_conflicts"}

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
# Checked in order; the first whose pattern matches the tensor name wins.
_MODULE_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("norm", re.compile(r"(norm|(^|\.)ln_?\w*\.)", re.IGNORECASE)),
    ("lm_head", re.compile(r"(^|\.)(lm_head|embed_out|output)\.")),
    ("embed", re.compile(r"(embed_tokens|embeddings?|wte|wpe|tok_embeddings)\.")),
    ("attn_q", re.compile(r"\.(q_proj|query|wq)\.")),
    ("attn_k", re.compile(r"\.(k_proj|key|wk)\.")),
    ("attn_v", re.compile(r"\.(v_proj|value|wv)\.")),
    ("attn_o", re.compile(r"\.(o_proj|out_proj|wo|attn\.c_proj|attention\.dense|dense_out)\.")),
    ("mlp_gate", re.compile(r"\.(gate_proj|w1|fc_gate)\.")),
    ("mlp_up", re.compile(r"\.(up_proj|w3|fc1|fc_in|c_fc|dense_h_to_4h)\.")),
    ("mlp_down", re.compile(r"\.(down_proj|w2|fc2|fc_out|mlp\.c_proj|dense_4h_to_h)\.")),
)


def layer_index(name: str) -> int | None:
    """Transformer block index from a tensor name (``model.layers.7.mlp.up_proj.weight`` → 7), else None."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """One of MODULE_TYPES for a tensor name (Llama/Qwen/Mistral names; GPT-2/NeoX/Falcon best effort)."""
    for kind, pattern in _MODULE_RULES:
        if pattern.search(name):
            return kind
    return "other"


# --------------------------------------------------------------------------- options and sums
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
            raise MergeAlignError(f"ties_sample: must be a positive integer or None, got {self.ties_sample!r}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "ties_density": self.ties_density,
            "ties_sample": self.ties_sample,
            "seed": self.seed,
        }


@dataclass
class TensorSums:
    """The sums of one tensor (see the module docstring); ``merged[label]`` holds mb, md, ma, mm."""

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


N_PAIR = 14  # length of the pair part of a kernel's sums vector (see mergealign.similarity_kernels)


def _numba_kernel():
    """The fused numba kernel, or None when numba is not installed (the torch kernel then runs)."""
    global _NUMBA
    if _NUMBA is None:
        try:
            from mergealign import similarity_kernels

            _NUMBA = similarity_kernels.tensor_sums
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
            label: dict(zip(MERGED_SUMS, macc[4 * j : 4 * j + 4], strict=True)) for j, label in enumerate(merged_labels)
        }
        name = self.name
        return TensorSums(name, self.shape, layer_index(name), module_type(name), sums, merged, self.thr_d, self.thr_a)


def _torch_sums(
    b: Tensor, e: Tensor, a: Tensor, merged: Sequence[Tensor], thr_d: float, thr_a: float, chunk: int = 1 << 20
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


class SimilarityAccumulator:
    """Collects per-tensor sums; one instance per pass.

    ``add`` takes one tensor of every model — whole, or in consecutive row blocks (rows in order; then give
    ``shape`` of the whole tensor and its TIES ``thresholds``, which need the whole tensor). A tensor is complete
    when its rows are all in; :meth:`result` closes any that is not (e.g. vocabulary rows a merge left out).
    """

    def __init__(self, merged_labels: Sequence[str] = (), options: SimilarityOptions | None = None) -> None:
        self.options = options or SimilarityOptions()
        self.merged_labels = list(merged_labels)
        if len(set(self.merged_labels)) != len(self.merged_labels):
            raise MergeAlignError(f"merged model labels must be unique, got {self.merged_labels}")
        self._tensors: dict[str, TensorSums] = {}
        self._open: dict[str, _Running] = {}
        self.seconds = 0.0

    def add(
        self,
        name: str,
        base: Tensor,
        expert: Tensor,
        aligned: Tensor,
        merged: Mapping[str, Tensor] | None = None,
        *,
        shape: Sequence[int] | None = None,
        thresholds: tuple[float, float] | None = None,
    ) -> TensorSums | None:
        """Add a tensor or its next row block; returns its record once complete. Non-float tensors: None."""
        t0 = time.perf_counter()
        if not base.is_floating_point():
            return None
        merged = dict(merged or {})
        if set(merged) != set(self.merged_labels):
            raise MergeAlignError(
                f"tensor {name}: merged tensors for {sorted(merged)}, expected {sorted(self.merged_labels)}"
            )
        block_shape = tuple(base.shape)
        for label, t in [("expert", expert), ("aligned", aligned), *merged.items()]:
            if tuple(t.shape) != block_shape:
                raise PreflightError([f"tensor {name!r}: shape {tuple(t.shape)} in {label}, {block_shape} in base"])
        if name in self._tensors:
            raise MergeAlignError(f"tensor {name}: added twice")
        b, e, a = (_flat(t.detach().cpu()) for t in (base, expert, aligned))
        ms = [_flat(merged[label].detach().cpu()) for label in self.merged_labels]
        run = self._open.get(name)
        if run is None:
            full = tuple(shape) if shape is not None else block_shape
            if thresholds is None:
                if full != block_shape:
                    raise MergeAlignError(f"tensor {name}: a row block needs the TIES thresholds of the whole tensor")
                thresholds = _thresholds(name, b, e, a, self.options)
            run = self._open[name] = _Running(name, full, len(ms), *thresholds)
        if run.seen + b.numel() > run.numel or block_shape[1:] != run.shape[1:]:
            raise MergeAlignError(f"tensor {name}: block of shape {block_shape} does not fit shape {run.shape}")
        run.add(b, e, a, ms, self.options.use_numba)
        self.seconds += time.perf_counter() - t0
        if run.seen == run.numel:
            return self._close(name)
        return None

    def _close(self, name: str) -> TensorSums:
        rec = self._open.pop(name).record(self.merged_labels)
        self._tensors[name] = rec
        return rec

    def result(self, inputs: Mapping[str, Any] | None = None) -> SimilarityResult:
        for name in list(self._open):
            log.warning("similarity: tensor %s was seen only in part (%d rows)", name, self._open[name].seen)
            self._close(name)
        return SimilarityResult(
            tensors=[self._tensors[n] for n in sorted(self._tensors)],
            merged_labels=list(self.merged_labels),
            options=self.options,
            inputs=dict(inputs or {}),
            seconds=self.seconds,
        )


# --------------------------------------------------------------------------- metrics
def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _cos(dot: float, sq1: float, sq2: float) -> float | None:
    den = math.sqrt(sq1) * math.sqrt(sq2)
    return max(-1.0, min(1.0, dot / den)) if den > 0 else None


def pair_metrics(s: Mapping[str, float]) -> dict[str, float | None]:
    """Figures of τ_D vs τ_A from summed PAIR_SUMS (any level)."""
    n = s["numel"]
    ee = s["bb"] + 2 * s["bd"] + s["dd"]
    aa_full = s["bb"] + 2 * s["ba"] + s["aa"]
    ea = s["bb"] + s["bd"] + s["ba"] + s["da"]
    union = s["top_d"] + s["top_a"] - s["top_both"]
    return {
        "norm_d": math.sqrt(s["dd"]),
        "norm_a": math.sqrt(s["aa"]),
        "norm_base": math.sqrt(s["bb"]),
        "rel_norm_d": _ratio(math.sqrt(s["dd"]), math.sqrt(s["bb"])),
        "rel_norm_a": _ratio(math.sqrt(s["aa"]), math.sqrt(s["bb"])),
        "cos_da": _cos(s["da"], s["dd"], s["aa"]),
        "sign_conflict": _ratio(s["conflicts"], s["both_nonzero"]),
        "both_nonzero": _ratio(s["both_nonzero"], n),
        "ties_energy_d": _ratio(s["top_energy_d"], s["dd"]),
        "ties_energy_a": _ratio(s["top_energy_a"], s["aa"]),
        "ties_overlap": _ratio(s["top_both"], n),
        "ties_jaccard": _ratio(s["top_both"], union),
        "ties_conflict": _ratio(s["top_both_conflicts"], s["top_both"]),
        "cos_expert_aligned": _cos(ea, ee, aa_full),
    }


def merged_metrics(s: Mapping[str, float], m: Mapping[str, float]) -> dict[str, float | None]:
    """Figures of one merged model's delta δ against τ_D and τ_A from summed sums (any level)."""
    dd, da, aa = s["dd"], s["da"], s["aa"]
    md, ma, mm = m["md"], m["ma"], m["mm"]
    coef_d, coef_a = _least_squares(dd, da, aa, md, ma)
    share_d = _ratio(coef_d * md, mm) if coef_d is not None else None
    share_a = _ratio(coef_a * ma, mm) if coef_a is not None else None
    bb, bd, ba, mb = s["bb"], s["bd"], s["ba"], m["mb"]
    theta_m = bb + 2 * mb + mm
    return {
        "norm_delta": math.sqrt(mm),
        "cos_d": _cos(md, mm, dd),
        "cos_a": _cos(ma, mm, aa),
        "coef_d": coef_d,
        "coef_a": coef_a,
        "share_d": share_d,
        "share_a": share_a,
        "share_residual": (1.0 - share_d - share_a) if share_d is not None and share_a is not None else None,
        "cos_expert": _cos(bb + bd + mb + md, theta_m, bb + 2 * bd + dd),
        "cos_aligned": _cos(bb + ba + mb + ma, theta_m, bb + 2 * ba + aa),
    }


def _least_squares(dd: float, da: float, aa: float, md: float, ma: float) -> tuple[float | None, float | None]:
    """argmin_c ‖δ − c_D τ_D − c_A τ_A‖ from the normal equations; the minimum-norm solution when τ_D ∥ τ_A."""
    det = dd * aa - da * da
    scale = dd * aa
    if scale <= 0:
        if dd > 0:
            return md / dd, 0.0
        if aa > 0:
            return 0.0, ma / aa
        return None, None
    if det > 1e-12 * scale:
        return (md * aa - ma * da) / det, (ma * dd - md * da) / det
    # Collinear: minimum-norm solution along τ_D + τ_A direction (pseudo-inverse of the 2×2 Gram).
    import numpy as np

    sol = np.linalg.lstsq(np.array([[dd, da], [da, aa]]), np.array([md, ma]), rcond=1e-12)[0]
    return float(sol[0]), float(sol[1])


# --------------------------------------------------------------------------- results
def _sum_records(records: Iterable[TensorSums], merged_labels: Sequence[str]) -> tuple[dict, dict, int]:
    total = {k: 0 for k in PAIR_SUMS}
    merged = {label: {k: 0.0 for k in MERGED_SUMS} for label in merged_labels}
    count = 0
    for r in records:
        count += 1
        for k in PAIR_SUMS:
            total[k] += r.sums[k]
        for label in merged_labels:
            for k in MERGED_SUMS:
                merged[label][k] += r.merged[label][k]
    return total, merged, count


def _group_record(
    key: Mapping[str, Any], records: list[TensorSums], merged_labels: Sequence[str]
) -> dict[str, Any]:
    total, merged, count = _sum_records(records, merged_labels)
    out: dict[str, Any] = dict(key)
    out["n_tensors"] = count
    out.update(pair_metrics(total))
    out["merged"] = {label: merged_metrics(total, merged[label]) for label in merged_labels}
    out["sums"] = {"pair": total, "merged": merged}
    return out


@dataclass
class SimilarityResult:
    """Per-tensor sums of one pass, with exact aggregates on demand."""

    tensors: list[TensorSums]
    merged_labels: list[str]
    options: SimilarityOptions
    inputs: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None

    def overall(self) -> dict[str, Any]:
        return _group_record({}, self.tensors, self.merged_labels)

    def by_layer(self) -> list[dict[str, Any]]:
        layers = sorted({t.layer for t in self.tensors if t.layer is not None})
        return [
            _group_record({"layer": i}, [t for t in self.tensors if t.layer == i], self.merged_labels) for i in layers
        ]

    def by_module(self) -> list[dict[str, Any]]:
        present = [m for m in MODULE_TYPES if any(t.module == m for t in self.tensors)]
        return [
            _group_record({"module": m}, [t for t in self.tensors if t.module == m], self.merged_labels)
            for m in present
        ]

    def by_layer_module(self) -> list[dict[str, Any]]:
        keys = sorted(
            {(t.layer, t.module) for t in self.tensors if t.layer is not None},
            key=lambda k: (k[0], MODULE_TYPES.index(k[1])),
        )
        return [
            _group_record(
                {"layer": layer, "module": mod},
                [t for t in self.tensors if t.layer == layer and t.module == mod],
                self.merged_labels,
            )
            for layer, mod in keys
        ]

    def tensor_rows(self) -> list[dict[str, Any]]:
        rows = []
        for t in self.tensors:
            row: dict[str, Any] = {
                "name": t.name,
                "layer": t.layer,
                "module": t.module,
                "shape": "x".join(str(d) for d in t.shape),
                "thr_d": t.thr_d,
                "thr_a": t.thr_a,
            }
            row.update(t.sums)
            row.update(pair_metrics(t.sums))
            rows.append(row)
        return rows

    def merged_rows(self) -> list[dict[str, Any]]:
        rows = []
        for t in self.tensors:
            for label in self.merged_labels:
                row: dict[str, Any] = {"name": t.name, "layer": t.layer, "module": t.module, "merged": label}
                row.update(t.merged[label])
                row.update(merged_metrics(t.sums, t.merged[label]))
                rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        """The JSON document written as similarity.json."""
        return {
            "schema_version": SCHEMA_VERSION,
            "inputs": self.inputs,
            "options": self.options.as_dict(),
            "merged_labels": self.merged_labels,
            "seconds": self.seconds,
            "n_tensors": len(self.tensors),
            "overall": self.overall(),
            "by_layer": self.by_layer(),
            "by_module": self.by_module(),
            "by_layer_module": self.by_layer_module(),
        }

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write similarity.json, tensors.parquet and merged.parquet (if any merged model) atomically."""
        import pandas as pd

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"tensors": out / "tensors.parquet"}
        _atomic_write(paths["tensors"], lambda p: pd.DataFrame(self.tensor_rows()).to_parquet(p, index=False))
        if self.merged_labels:
            paths["merged"] = out / "merged.parquet"
            _atomic_write(paths["merged"], lambda p: pd.DataFrame(self.merged_rows()).to_parquet(p, index=False))
        paths["json"] = out / "similarity.json"
        text = json.dumps(_json_safe(self.summary()), indent=1, allow_nan=False)
        _atomic_write(paths["json"], lambda p: Path(p).write_text(text))
        return paths


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` to a temp name in the same directory, fsync, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_similarity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read similarity.json (a file, or the directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "similarity.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise MergeAlignError(f"{p}: similarity results not found") from None
    except json.JSONDecodeError as exc:
        raise MergeAlignError(f"{p}: not valid JSON ({exc})") from None


# --------------------------------------------------------------------------- the passes
def check_compatible(checkpoints: Mapping[str, Checkpoint]) -> list[str]:
    """Names of the float tensors to compare, in the first checkpoint's file order.

    Runs the engine's header-only preflight (mergealign.preflight): models that do not share tensor names or
    shapes raise its PreflightError, naming every tensor and model. Dtypes may differ (merged models are often
    saved in another dtype than their inputs).
    """
    from mergealign.preflight import Input, preflight

    result = preflight([Input(label, ck) for label, ck in checkpoints.items()], cast_dtype=torch.float32)
    ref = next(iter(checkpoints.values()))
    return [t.name for t in result.tensors if ref.tensors[t.name].dtype in FLOAT_CODES]


def split_merged_specs(specs: Sequence[str | os.PathLike[str]]) -> dict[str, str]:
    """``label=dir`` or ``dir`` (label: the directory name, made unique) -> {label: dir}."""
    out: dict[str, str] = {}
    for spec in specs:
        s = str(spec)
        if "=" in s and not Path(s).exists():
            label, path = s.split("=", 1)
        else:
            label, path = Path(s).name, s
        base, i = label, 2
        while label in out:
            label, i = f"{base}-{i}", i + 1
        out[label] = path
    return out


def compute_similarity(
    base: str | os.PathLike[str],
    expert: str | os.PathLike[str],
    aligned: str | os.PathLike[str],
    merged: Mapping[str, str | os.PathLike[str]] | Sequence[str | os.PathLike[str]] = (),
    out_dir: str | os.PathLike[str] | None = None,
    *,
    options: SimilarityOptions | None = None,
    progress: bool = True,
) -> SimilarityResult:
    """The standalone pass: each tensor read once from every checkpoint (zero-copy memory-mapped views);
    results written to ``out_dir`` if given.

    ``merged`` maps labels to model directories (a sequence of ``dir`` / ``label=dir`` is labelled by
    :func:`split_merged_specs`).
    """
    merged = dict(merged) if isinstance(merged, Mapping) else split_merged_specs(merged)
    opts = options or SimilarityOptions()
    t0 = time.perf_counter()
    cks = {"base": Checkpoint(base), "expert": Checkpoint(expert), "aligned": Checkpoint(aligned)}
    for label, path in merged.items():
        cks[f"merged {label}"] = Checkpoint(path)
    try:
        names = check_compatible(cks)
        acc = SimilarityAccumulator(list(merged), opts)
        bar = _progress(sum(cks["base"].tensors[n].nbytes for n in names) * len(cks), progress)
        for i, name in enumerate(names):
            if i + 1 < len(names):
                for ck in cks.values():
                    ck.prefetch(names[i + 1])
            views = {label: ck.view(name) for label, ck in cks.items()}
            ms = {label: views[f"merged {label}"] for label in merged}
            acc.add(name, views["base"], views["expert"], views["aligned"], ms)
            if bar is not None:
                bar.update(sum(v.numel() * v.element_size() for v in views.values()))
        if bar is not None:
            bar.close()
        inputs = {
            "base": _describe(cks["base"]),
            "expert": _describe(cks["expert"]),
            "aligned": _describe(cks["aligned"]),
            "merged": {label: _describe(cks[f"merged {label}"]) for label in merged},
        }
    finally:
        for ck in cks.values():
            ck.close()
    result = acc.result(inputs)
    result.seconds = time.perf_counter() - t0
    log.info("similarity: %d tensors in %.1f s", len(result.tensors), result.seconds)
    if out_dir is not None:
        result.write(out_dir)
    return result


def _describe(ck: Checkpoint) -> dict[str, Any]:
    return {"path": str(ck.path), "fingerprint": ck.header_fingerprint()}


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="similarity", leave=False)


class SimilarityObserver:
    """The fused path: ``run_merge(..., observers=[obs])`` adds the sums of every tensor the merge writes.

    The engine hands over float32 θ of the base and of each model (``tensors_by_label``, keyed by role when
    unique: ``domain`` / ``alignment``) and the merged block, possibly a tensor in several row blocks. The
    observer opens the base, expert and aligned checkpoints only for their headers and for the TIES
    thresholds (exact for small tensors, a 65 536-entry sample otherwise — no second pass over the data), and
    for the base rows when the merge method takes no base. ``merged_dtype``: the dtype the merge writes
    (merged blocks are rounded to it, as the standalone pass reads them from disk).

    The numbers equal the standalone pass bit for bit when the merge reads the three models themselves (not
    persisted task vectors) without a ``dtype`` cast.
    """

    def __init__(
        self,
        base: str | os.PathLike[str],
        expert: str | os.PathLike[str],
        aligned: str | os.PathLike[str],
        *,
        domain_label: str = "domain",
        alignment_label: str = "alignment",
        merged_label: str = "merged",
        merged_dtype: str | torch.dtype | None = None,
        options: SimilarityOptions | None = None,
    ) -> None:
        self.cks = {"base": Checkpoint(base), "expert": Checkpoint(expert), "aligned": Checkpoint(aligned)}
        self.names = set(check_compatible(self.cks))
        self.domain_label, self.alignment_label = domain_label, alignment_label
        self.merged_label = merged_label
        self.merged_dtype = dtype_from_name(merged_dtype) if merged_dtype is not None else None
        self.accumulator = SimilarityAccumulator([merged_label], options)
        self._rows: dict[str, int] = {}

    def observe(
        self, name: str, base: Tensor | None, tensors_by_label: Mapping[str, Tensor], merged: Tensor
    ) -> None:
        if name not in self.names:
            return
        try:
            e, a = tensors_by_label[self.domain_label], tensors_by_label[self.alignment_label]
        except KeyError as exc:
            raise MergeAlignError(
                f"similarity observer: the merge has no model labelled {exc.args[0]!r} "
                f"(labels: {', '.join(sorted(tensors_by_label))}); set domain_label / alignment_label"
            ) from None
        row0 = self._rows.get(name, 0)
        rows = merged.shape[0] if merged.dim() else 1
        self._rows[name] = row0 + rows
        if base is None:  # methods without a base (linear): take its rows from the file
            view = self.cks["base"].view(name)
            base = view[row0 : row0 + rows] if view.dim() else view
        if self.merged_dtype is not None:
            merged = merged.to(self.merged_dtype)
        info = self.cks["base"].tensors[name]
        thresholds = None
        if row0 == 0 and tuple(merged.shape) != tuple(info.shape):
            thresholds = _thresholds(name, *(self.cks[k].view(name).reshape(-1) for k in ("base", "expert", "aligned")),
                                     self.accumulator.options)
        self.accumulator.add(
            name, base, e, a, {self.merged_label: merged}, shape=info.shape, thresholds=thresholds
        )

    def result(self) -> SimilarityResult:
        inputs = {k: _describe(ck) for k, ck in self.cks.items()}
        inputs["merged"] = {self.merged_label: {"fused": True}}
        return self.accumulator.result(inputs)

    def write(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        return self.result().write(out_dir)

    def close(self) -> None:
        for ck in self.cks.values():
            ck.close()
