"""Step `judge`: one judge's verdicts on one generations file (refusal keywords, llama-guard-3, ...).

Model judges run on the same backends (and child processes) as generation; the judge checkpoint is pinned and
fetched by the `models` step like every other model, so its content hash is part of the key.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prefect import task

from mergealign.artifacts import Manifest, library_versions, step_key
from mergealign.config import JudgeEntry
from mergealign.generation import RuntimeSettings
from mergealign.judges import JudgeSettings, judge
from tasks.common import ArtifactCachePolicy, StepContext, gpu_slot, publish_markdown, run_logger, run_step

STEP = "judge"
CODE_VERSION = "judge-1"
FILE = "judged.jsonl"


def judge_settings(entry: JudgeEntry, *, model_dir: str | None = None) -> JudgeSettings:
    opts = dict(entry.options)
    runtime = dict(opts.pop("runtime", {}) or {})
    if entry.backend:
        runtime["backend"] = entry.backend
    return JudgeSettings(model=model_dir, runtime=RuntimeSettings(**runtime), **opts)


def judge_key(entry: JudgeEntry, generations: Manifest, judge_model: Manifest | None) -> str:
    inputs = {"generations": generations.content_hash}
    if judge_model is not None:
        inputs["judge_model"] = judge_model.content_hash
    return step_key(STEP, inputs=inputs, params={"judge": judge_settings(entry).cache_fingerprint(entry.name)},
                    code_version=CODE_VERSION)  # fmt: skip


def _key(inputs: dict[str, Any]) -> str:
    return judge_key(inputs["entry"], inputs["generations"], inputs.get("judge_model"))


def judge_answers(ctx: StepContext, label: str, entry: JudgeEntry, generations: Manifest,
                  judge_model: Manifest | None = None) -> Manifest:  # fmt: skip
    logger = run_logger()
    store = ctx.store()
    key = judge_key(entry, generations, judge_model)

    def build(staging):
        model_dir = str(store.local_dir(judge_model)) if judge_model is not None else None
        settings = judge_settings(entry, model_dir=model_dir)
        source = store.local_dir(generations) / "generations.jsonl"
        guard = gpu_slot(ctx) if judge_model is not None and settings.runtime.backend == "vllm" else None
        with guard or contextlib.nullcontext():
            summary = judge(entry.name, source, staging / FILE, settings)
        n = max(summary.n_rows, 1)
        metrics: dict[str, Any] = {"rows": summary.n_rows, "refused_pct": round(100 * summary.n_refused / n, 2),
                                   "empty_responses": summary.n_empty_responses}  # fmt: skip
        if summary.n_safe is not None:
            metrics.update(safe_pct=round(100 * summary.n_safe / n, 2), unparseable=summary.n_unparseable)
        logger.info("judge %s on %s: %s", entry.name, label, metrics)
        return {
            "metrics": metrics,
            "extra": {"judge": entry.name, "version": summary.version, "model": summary.model},
        }

    manifest = run_step(ctx, STEP, key, build, params={"judge": entry.name, "answers": label},
                        inputs={"generations": generations.content_hash}, code_version=CODE_VERSION,
                        versions=library_versions(("mergealign", "transformers", "vllm")))  # fmt: skip
    publish_markdown(manifest, f"Judge {entry.name}: {label}", label=f"{entry.name}-{label}")
    return manifest


@task(
    name="judge",
    cache_policy=ArtifactCachePolicy(step=STEP, key_fn=_key),
    task_run_name="judge-{entry.name}-{label}",
)
def judge_task(ctx: StepContext, label: str, entry: JudgeEntry, generations: Manifest,
               judge_model: Manifest | None = None) -> Manifest:  # fmt: skip
    """Verdicts of one judge on one model's answers to one prompt set (judged.jsonl)."""
    return judge_answers(ctx, label, entry, generations, judge_model)


@task(name="judge-remote", cache_policy=ArtifactCachePolicy(step=STEP, key_fn=_key, record_prefix="judge-remote"),
      task_run_name="judge-{entry.name}-{label}")  # fmt: skip
def judge_remote_task(ctx: StepContext, label: str, entry: JudgeEntry, generations: Manifest,
                      judge_model: Manifest | None, deployment: str, config: dict[str, Any], model: str,
                      prompt_set: str) -> Manifest:  # fmt: skip
    """The judge step on a work pool: the `evaluate_flow` deployment restricted to this model, set and judge."""
    from tasks.remote import run_remote

    key = judge_key(entry, generations, judge_model)
    params = {"config": config, "models": [model], "prompt_sets": [prompt_set], "stages": ["generate", "judge"],
              "judges": [entry.name]}  # fmt: skip
    return run_remote(ctx, STEP, key, deployment, params, label)
