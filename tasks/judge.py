"""Step `judge`: one judge's verdicts on one generations file (refusal keywords, llama-guard-3, ...).

Model judges run on the same backends (and child processes) as generation; the judge checkpoint is pinned and
fetched by the `models` step like every other model, so its content hash is part of the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergealign.generation import RuntimeSettings
from mergealign.judges import JudgeSettings, judge
from mergealign.study.plan import Step
from tasks.steps import StepKind, StepRun, register

FILE = "judged.jsonl"


def judge_settings(entry: Mapping[str, Any], *, model_dir: str | None = None) -> JudgeSettings:
    """The judge module's settings from a run config's judge entry (as plain data)."""
    opts = dict(entry.get("options") or {})
    runtime = dict(opts.pop("runtime", {}) or {})
    if entry.get("backend"):
        runtime["backend"] = entry["backend"]
    return JudgeSettings(model=model_dir, runtime=RuntimeSettings(**runtime), **opts)


def _build(run: StepRun, staging: Path) -> dict[str, Any]:
    entry = run.step.params["judge"]
    model_dir = str(run.dir("judge_model")) if run.inputs.get("judge_model") is not None else None
    settings = judge_settings(entry, model_dir=model_dir)
    summary = judge(entry["name"], run.dir("generations") / "generations.jsonl", staging / FILE, settings)
    n = max(summary.n_rows, 1)
    metrics: dict[str, Any] = {"rows": summary.n_rows, "refused_pct": round(100 * summary.n_refused / n, 2),
                               "empty_responses": summary.n_empty_responses}  # fmt: skip
    if summary.n_safe is not None:
        metrics.update(safe_pct=round(100 * summary.n_safe / n, 2), unparseable=summary.n_unparseable)
    run.logger.info("judge %s on %s: %s", entry["name"], _answers(run.step), metrics)
    return {
        "metrics": metrics,
        "extra": {"judge": entry["name"], "version": summary.version, "model": summary.model},
    }


def _answers(step: Step) -> str:
    return f"{step.info['model']}/{step.info['prompt_set']}"


def _uses_gpu(step: Step) -> bool:
    return "judge_model" in step.inputs and judge_settings(step.params["judge"]).runtime.backend == "vllm"


def _remote(step: Step) -> dict[str, Any]:
    return {"models": [step.info["model"]], "prompt_sets": [step.info["prompt_set"]],
            "stages": ["generate", "judge"], "judges": [step.info["judge"]]}  # fmt: skip


JUDGE = register(StepKind(
    "judge", "judge-1", build=_build,
    title=lambda step: f"Judge {step.info['judge']}: {_answers(step)}",
    label=lambda step: f"{step.info['judge']}-{_answers(step)}",
    manifest_params=lambda step: {"judge": step.info["judge"], "answers": _answers(step)},
    key_params=lambda step: {"judge": judge_settings(step.params["judge"]).cache_fingerprint(step.info["judge"])},
    uses_gpu=_uses_gpu, versions=("mergealign", "transformers", "vllm"), remote=_remote,
))  # fmt: skip
