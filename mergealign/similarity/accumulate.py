"""The accumulator of one similarity pass: tensors whole or in row blocks, in any order, to exact records."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from mergealign.errors import MergeAlignError, PreflightError
from mergealign.similarity.result import SimilarityResult
from mergealign.similarity.sums import SimilarityOptions, TensorSums, _flat, _Running, _thresholds

log = logging.getLogger(__name__)


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
                raise PreflightError(
                    [f"tensor {name!r}: shape {tuple(t.shape)} in {label}, {block_shape} in base"]
                )
        if name in self._tensors:
            raise MergeAlignError(f"tensor {name}: added twice")
        b, e, a = (_flat(t.detach().cpu()) for t in (base, expert, aligned))
        ms = [_flat(merged[label].detach().cpu()) for label in self.merged_labels]
        run = self._open.get(name)
        if run is None:
            full = tuple(shape) if shape is not None else block_shape
            if thresholds is None:
                if full != block_shape:
                    raise MergeAlignError(
                        f"tensor {name}: a row block needs the TIES thresholds of the whole tensor"
                    )
                thresholds = _thresholds(name, b, e, a, self.options)
            run = self._open[name] = _Running(name, full, len(ms), *thresholds)
        if run.seen + b.numel() > run.numel or block_shape[1:] != run.shape[1:]:
            raise MergeAlignError(
                f"tensor {name}: block of shape {block_shape} does not fit shape {run.shape}"
            )
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
