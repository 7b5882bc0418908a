"""Step `vectors` (optional, `vectors.persist`): τ_D of each expert and τ_A persisted as safetensors with
per-tensor statistics (mergealign.vectors). Merges read the models directly (same result as from float32
vectors); the vectors are kept for inspection and for `mergealign merge` configs that name them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergealign.merge import ENGINE_VERSION
from mergealign.vectors import compute_vector
from tasks.steps import StepKind, StepRun, register


def _build(run: StepRun, staging: Path) -> dict[str, Any]:
    summary = compute_vector(run.dir("base"), run.dir("model"), staging, dtype=run.step.params["dtype"],
                             progress=False)  # fmt: skip
    run.logger.info("%s", summary.line())
    return {"metrics": {"tensors": summary.n_tensors, "bytes_written": summary.bytes_written,
                        "seconds": round(summary.wall_s, 3)}}  # fmt: skip


VECTORS = register(StepKind(
    "vectors", f"vectors-1-engine{ENGINE_VERSION}", build=_build, title=lambda step: f"Task vector of {step.name}",
    manifest_params=lambda step: {"label": step.name, **step.params},
    versions=("mergealign", "torch", "safetensors"),
))  # fmt: skip
