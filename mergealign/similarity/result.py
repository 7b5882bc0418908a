"""The result of a similarity pass: per-tensor sums, and exact aggregates per layer, module type and overall."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergealign.similarity.metrics import merged_metrics, pair_metrics
from mergealign.similarity.sums import MERGED_SUMS, PAIR_SUMS, SimilarityOptions, TensorSums
from mergealign.tensor_names import MODULE_TYPES

SCHEMA_VERSION = 1


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
            _group_record({"layer": i}, [t for t in self.tensors if t.layer == i], self.merged_labels)
            for i in layers
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
        from mergealign.similarity.io import write_result

        return write_result(self, out_dir)
