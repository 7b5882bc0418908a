"""Step `merge`: one merged model per (expert × method × λ), by the streaming engine (mergealign.merge).

The output is built in the step's deterministic staging folder, so a merge killed mid-way resumes there (the
engine keeps finished shards), then published to `<root>/merge/<key>/`: a normal Hugging Face model folder.
The key covers the three inputs' content hashes, the merge's parameters and the engine version.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from mergealign.artifacts import Manifest, library_versions, step_key
from mergealign.config import MergeSpec
from mergealign.merge import ENGINE_VERSION, run_merge
from tasks.common import ArtifactCachePolicy, StepContext, gpu_slot, publish_markdown, run_logger, run_step

STEP = "merge"
CODE_VERSION = f"merge-1-engine{ENGINE_VERSION}"


def merge_params(spec: MergeSpec) -> dict[str, Any]:
    """What the merged weights depend on besides the inputs: the engine config with placeholders for paths."""
    return spec.template


def merge_key(spec: MergeSpec, base: Manifest, expert: Manifest, aligned: Manifest) -> str:
    return step_key(
        STEP,
        inputs={"base": base.content_hash, "expert": expert.content_hash, "aligned": aligned.content_hash},
        params=merge_params(spec),
        code_version=CODE_VERSION,
    )


def _key(inputs: dict[str, Any]) -> str:
    return merge_key(inputs["spec"], inputs["base"], inputs["expert"], inputs["aligned"])


def merge_model(
    ctx: StepContext, spec: MergeSpec, base: Manifest, expert: Manifest, aligned: Manifest
) -> Manifest:
    """The body of the merge step (also used by the standalone merge flow and remote workers)."""
    logger = run_logger()
    store = ctx.store()
    key = merge_key(spec, base, expert, aligned)
    dirs = {
        name: str(store.local_dir(m))
        for name, m in (("base", base), ("expert", expert), ("aligned", aligned))
    }

    def build(staging):
        cfg = spec.engine_config(
            base=dirs["base"], expert=dirs["expert"], aligned=dirs["aligned"], device=ctx.device
        )
        hashes = {dirs["base"]: base.content_hash, dirs["expert"]: expert.content_hash,
                  dirs["aligned"]: aligned.content_hash}  # fmt: skip
        logger.info("merging %s (%s) into %s", spec.id, spec.method, staging)
        with gpu_slot(ctx):
            summary = run_merge(cfg, staging, device=ctx.device, progress=True, input_hashes=hashes)
        logger.info("%s", summary.line())
        return {
            "metrics": {
                "method": spec.method,
                **{
                    k: v for k, v in spec.info.items() if k in ("lambda", "lambda_domain", "lambda_alignment")
                },
                "tensors": summary.n_tensors_total,
                "shards_resumed": summary.shards_skipped,
                "bytes_written": summary.bytes_written,
                "merge_seconds": round(summary.wall_s, 3),
                "peak_rss_anon_mib": round(summary.peak_rss_anon_bytes / 2**20, 1),
                "device": summary.device,
            },
            "extra": {"spec": spec.model_dump(), "engine_config_hash": summary.config_hash},
        }

    manifest = run_step(
        ctx, STEP, key, build, params={"id": spec.id, **merge_params(spec)},
        inputs={"base": base.content_hash, "expert": expert.content_hash, "aligned": aligned.content_hash},
        code_version=CODE_VERSION, versions=library_versions(("mergealign", "torch", "safetensors")),
    )  # fmt: skip
    publish_markdown(manifest, f"Merge {spec.id}", label=spec.id)
    return manifest


@task(name="merge", cache_policy=ArtifactCachePolicy(step=STEP, key_fn=_key), task_run_name="merge-{spec.id}")
def merge_task(
    ctx: StepContext, spec: MergeSpec, base: Manifest, expert: Manifest, aligned: Manifest
) -> Manifest:
    """Merge one expert and the aligned model over the base as `spec` says; returns the merged model's manifest."""
    return merge_model(ctx, spec, base, expert, aligned)


@task(
    name="merge-remote",
    cache_policy=ArtifactCachePolicy(step=STEP, key_fn=_key, record_prefix="merge-remote"),
    task_run_name="merge-{spec.id}",
)
def merge_remote_task(ctx: StepContext, spec: MergeSpec, base: Manifest, expert: Manifest, aligned: Manifest,
                      deployment: str, config: dict[str, Any]) -> Manifest:  # fmt: skip
    """The merge step on a work pool: runs the `merge_flow` deployment for this one job and waits."""
    from tasks.remote import run_remote

    key = merge_key(spec, base, expert, aligned)
    return run_remote(ctx, STEP, key, deployment, {"config": config, "merges": [spec.id]}, spec.id)
