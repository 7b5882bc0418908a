"""The evaluation flow on its own: answers, verdicts, safety metrics and domain scores for some or all models
of a study.

Models are labels (`base`, `aligned`, `expert:<name>`, `merge:<id>`); a merged model is made first if it is
not there yet (the merge step is cached like everywhere else). With `stages` (and `prompt_sets`, `judges`) it
is also the `generate`, `judge` and `domain-eval` deployments the study calls on work pools.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runner import StudyRun

STAGES = ("generate", "judge", "domain_eval")


@flow(name="evaluate-flow", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def evaluate_flow(config: dict[str, Any] | str, models: list[str] | None = None, prompt_sets: list[str] | None = None,
                  stages: list[str] | None = None, judges: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Evaluate the chosen models (default: every model of the study) locally; stages default to all three."""
    from mergealign.errors import ConfigError

    run = StudyRun.start(config)
    cfg = run.cfg
    wanted = set(stages or STAGES)
    problems = [
        f"stages: unknown stage {s!r} (stages: {', '.join(STAGES)})" for s in wanted if s not in STAGES
    ]
    if problems:
        raise ConfigError(problems)
    fetched = run.models()
    needed = None if models is None else [m.removeprefix("merge:") for m in models if m.startswith("merge:")]
    merges = run.merges(fetched, needed, allow_remote=False)
    everything = run.all_models(fetched, merges)
    labels = list(models) if models is not None else [k for k in everything]
    unknown = [m for m in labels if m not in everything]
    if unknown:
        raise ConfigError([f"models: no model {m!r} (models: {', '.join(everything)})" for m in unknown])
    if cfg.generation.enabled and wanted & {"generate", "judge"}:
        prompts = run.prompts()
        if prompt_sets is not None:
            prompts = {k: v for k, v in prompts.items() if k in prompt_sets}
        gens = run.generations(everything, prompts, labels, allow_remote=False)
        if "judge" in wanted:
            judged = run.judgments(gens, run.judge_models(), judges, allow_remote=False)
            if judges is None and prompt_sets is None:
                run.safety(judged)
    if "domain_eval" in wanted:
        run.domain(everything, labels, allow_remote=False)
    return run.finish()
