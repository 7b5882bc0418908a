"""Step `similarity`: streamed similarity of τ_D, τ_A and the merged models, per expert (one pass).

Runs beside generation: it needs the merges of its expert, nothing downstream waits for it but the report.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from mergealign.artifacts import Manifest, library_versions, step_key
from mergealign.similarity import SimilarityOptions, compute_similarity
from tasks.common import ArtifactCachePolicy, StepContext, publish_markdown, run_logger, run_step

STEP = "similarity"
CODE_VERSION = "similarity-1"


def similarity_key(expert_name: str, base: Manifest, expert: Manifest, aligned: Manifest,
                   merged: dict[str, Manifest]) -> str:  # fmt: skip
    inputs = {"base": base.content_hash, "expert": expert.content_hash, "aligned": aligned.content_hash}
    inputs.update({f"merged:{k}": m.content_hash for k, m in sorted(merged.items())})
    return step_key(
        STEP, inputs=inputs, params={"options": SimilarityOptions().as_dict()}, code_version=CODE_VERSION
    )


def _key(inputs: dict[str, Any]) -> str:
    return similarity_key(
        inputs["expert_name"], inputs["base"], inputs["expert"], inputs["aligned"], inputs["merged"]
    )


@task(name="similarity", cache_policy=ArtifactCachePolicy(step=STEP, key_fn=_key),
      task_run_name="similarity-{expert_name}")  # fmt: skip
def similarity_task(ctx: StepContext, expert_name: str, base: Manifest, expert: Manifest, aligned: Manifest,
                    merged: dict[str, Manifest]) -> Manifest:  # fmt: skip
    """cos(τ_D, τ_A), norms, sign conflicts per tensor/layer/module, and each merge's share of both vectors."""
    logger = run_logger()
    store = ctx.store()
    key = similarity_key(expert_name, base, expert, aligned, merged)

    def build(staging):
        result = compute_similarity(
            store.local_dir(base), store.local_dir(expert), store.local_dir(aligned),
            {label: store.local_dir(m) for label, m in sorted(merged.items())}, staging, progress=False,
        )  # fmt: skip
        overall = result.overall()
        metrics = {k: v for k, v in overall.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        logger.info("similarity %s: %s", expert_name, {k: metrics[k] for k in list(metrics)[:6]})
        return {"metrics": dict(list(metrics.items())[:20]), "extra": {"merged": sorted(merged)}}

    manifest = run_step(ctx, STEP, key, build, params={"expert": expert_name, "merged": sorted(merged)},
                        code_version=CODE_VERSION, versions=library_versions(("mergealign", "torch")))  # fmt: skip
    publish_markdown(manifest, f"Similarity of τ_D and τ_A: {expert_name}", label=expert_name)
    return manifest
