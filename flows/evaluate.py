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

STAGES = ("generate", "judge", "domain_eval")


@flow(name="evaluate-flow", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def evaluate_flow(config: dict[str, Any] | str, models: list[str] | None = None, prompt_sets: list[str] | None = None,
                  stages: list[str] | None = None, judges: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Evaluate the chosen models (default: every model of the study) locally; stages default to all three."""
    run = PlanRun.start(config)
    wanted = set(stages or STAGES)
    problems = [
        f"stages: unknown stage {s!r} (stages: {', '.join(STAGES)})" for s in sorted(wanted - set(STAGES))
    ]
    labels = list(run.plan.models)
    problems += [
        f"models: no model {m!r} (models: {', '.join(labels)})" for m in models or [] if m not in labels
    ]
    if problems:
        raise ConfigError(problems)
    run.submit(run.plan.closure(run.plan.evaluation(models, prompt_sets, wanted, judges)), allow_remote=False)
    return run.finish()
