"""Step `vectors` (optional, `vectors.persist`): τ_D of each expert and τ_A persisted as safetensors with
per-tensor statistics (mergealign.vectors). Merges read the models directly (same result as from float32
vectors); the vectors are kept for inspection and for `mergealign merge` configs that name them."""

from __future__ import annotations

from typing import Any

from prefect import task

from mergealign.artifacts import Manifest, library_versions, step_key
from mergealign.merge import ENGINE_VERSION
from mergealign.vectors import compute_vector
from tasks.common import ArtifactCachePolicy, StepContext, publish_markdown, run_logger, run_step

STEP = "vectors"
CODE_VERSION = f"vectors-1-engine{ENGINE_VERSION}"


def vector_key(base: Manifest, model: Manifest, dtype: str | None) -> str:
    return step_key(STEP, inputs={"base": base.content_hash, "model": model.content_hash}, params={"dtype": dtype},
                    code_version=CODE_VERSION)  # fmt: skip


def _key(inputs: dict[str, Any]) -> str:
    return vector_key(inputs["base"], inputs["model"], inputs["dtype"])


@task(
    name="vectors", cache_policy=ArtifactCachePolicy(step=STEP, key_fn=_key), task_run_name="vector-{label}"
)
def vector_task(
    ctx: StepContext, label: str, base: Manifest, model: Manifest, dtype: str | None = None
) -> Manifest:
    """τ = θ_model − θ_base for one fine-tune (an expert: τ_D; the aligned model: τ_A)."""
    logger = run_logger()
    store = ctx.store()
    key = vector_key(base, model, dtype)

    def build(staging):
        summary = compute_vector(
            store.local_dir(base), store.local_dir(model), staging, dtype=dtype, progress=False
        )
        logger.info("%s", summary.line())
        return {"metrics": {"tensors": summary.n_tensors, "bytes_written": summary.bytes_written,
                            "seconds": round(summary.wall_s, 3)}}  # fmt: skip

    manifest = run_step(ctx, STEP, key, build, params={"label": label, "dtype": dtype},
                        inputs={"base": base.content_hash, "model": model.content_hash}, code_version=CODE_VERSION,
                        versions=library_versions(("mergealign", "torch", "safetensors")))  # fmt: skip
    publish_markdown(manifest, f"Task vector of {label}", label=label)
    return manifest
