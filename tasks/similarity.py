"""Step `similarity`: streamed similarity of τ_D, τ_A and the merged models, per expert (one pass).

Runs beside generation: it needs the merges of its expert, nothing downstream waits for it but the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergealign.similarity import SimilarityOptions, compute_similarity
from tasks.steps import StepKind, StepRun, register


def _build(run: StepRun, staging: Path) -> dict[str, Any]:
    merged = run.manifests("merged")
    result = compute_similarity(run.dir("base"), run.dir("expert"), run.dir("aligned"),
                                {label: run.dir(m) for label, m in sorted(merged.items())}, staging,
                                progress=False)  # fmt: skip
    metrics = {
        k: v for k, v in result.overall().items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    run.logger.info("similarity %s: %s", run.step.name, {k: metrics[k] for k in list(metrics)[:6]})
    return {"metrics": dict(list(metrics.items())[:20]), "extra": {"merged": sorted(merged)}}


SIMILARITY = register(StepKind(
    "similarity", "similarity-1", build=_build,
    title=lambda step: f"Similarity of τ_D and τ_A: {step.name}",
    manifest_params=lambda step: {"expert": step.name, "merged": sorted(step.inputs["merged"])},
    key_params=lambda step: {"options": SimilarityOptions().as_dict()}, versions=("mergealign", "torch"),
))  # fmt: skip
