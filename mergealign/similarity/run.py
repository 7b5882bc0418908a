"""The two passes of the similarity analysis: standalone over checkpoints, and fused into a merge (observer)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergealign.checkpoint import FLOAT_CODES, Checkpoint, dtype_from_name
from mergealign.errors import MergeAlignError
from mergealign.similarity.accumulate import SimilarityAccumulator
from mergealign.similarity.result import SimilarityResult
from mergealign.similarity.sums import SimilarityOptions, _thresholds

log = logging.getLogger(__name__)


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
            thresholds = _thresholds(
                name,
                *(self.cks[k].view(name).reshape(-1) for k in ("base", "expert", "aligned")),
                self.accumulator.options,
            )
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
