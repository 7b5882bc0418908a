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

from flows.executor import PlanRun
from mergealign.errors import ConfigError
from mergealign.study.plan import Step, StudyPlan

STAGES = ("generate", "judge", "domain_eval")


def targets(plan: StudyPlan, models: list[str] | None, prompt_sets: list[str] | None, stages: set[str],
            judges: list[str] | None) -> list[str]:  # fmt: skip
    """The steps of `plan` an evaluation of these models, prompt sets, stages and judges asks for."""

    def wanted(step: Step, key: str, chosen: list[str] | None) -> bool:
        return chosen is None or step.info.get(key) in chosen

    ids = []
    for step in plan.steps:
        model, prompts = wanted(step, "model", models), wanted(step, "prompt_set", prompt_sets)
        if step.kind == "generate" and "generate" in stages and model and prompts:
            ids.append(step.id)
        elif step.kind == "judge" and "judge" in stages and model and prompts and wanted(step, "judge", judges):
            ids.append(step.id)
        elif step.kind == "safety" and "judge" in stages and judges is None and prompt_sets is None and model:
            ids.append(step.id)
        elif step.kind == "domain_eval" and "domain_eval" in stages and model:
            ids.append(step.id)
    return ids


@flow(name="evaluate-flow", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def evaluate_flow(config: dict[str, Any] | str, models: list[str] | None = None, prompt_sets: list[str] | None = None,
                  stages: list[str] | None = None, judges: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Evaluate the chosen models (default: every model of the study) locally; stages default to all three."""
    run = PlanRun.start(config)
    wanted = set(stages or STAGES)
    problems = [f"stages: unknown stage {s!r} (stages: {', '.join(STAGES)})" for s in sorted(wanted - set(STAGES))]
    labels = list(run.plan.models)
    problems += [f"models: no model {m!r} (models: {', '.join(labels)})" for m in models or [] if m not in labels]
    if problems:
        raise ConfigError(problems)
    run.submit(run.plan.closure(targets(run.plan, models, prompt_sets, wanted, judges)), allow_remote=False)
    return run.finish()
