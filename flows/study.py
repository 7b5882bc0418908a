"""The study flow: the whole DAG of a run config, from pinned checkpoints to the report.

    models (pin, preflight, fetch) ─┬─ merges ─┬─ answers ─ verdicts ─ safety ─┐
                                    │          └─ similarity ────────────────────┤
                                    └─ (base, aligned, experts are evaluated too) ─ domain eval ─ report

Run it with `mergealign run CONFIG`, as a deployment (deployments/prefect.yaml), or from Python:
`mergealign_study("configs/smoke.yaml")`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runner import StudyRun
from mergealign.config import coerce_config


@flow(name="mergealign-study", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def mergealign_study(config: dict[str, Any] | str) -> dict[str, Any]:
    """Run every step of a study; finished steps are reused (cache key = artifact key, no run id).

    config: a run config as a YAML path (relative paths inside it are taken from the file's folder) or a
    mapping. Returns where the artifacts and the report are, and every step's state.
    """
    cfg = coerce_config(config)
    if cfg.zoo_demo is not None:  # the demo trio is an input: build (or reuse) it first, as a subflow
        from flows.zoo import demo_zoo_flow

        z = cfg.zoo_demo
        demo_zoo_flow(directory=str(cfg.resolve_path(z.dir)), seed=z.seed, steps=z.steps,
                      base=str(cfg.resolve_path(z.base)) if z.base else None)  # fmt: skip
    run = StudyRun.start(cfg)
    cfg = run.cfg
    models = run.models()
    judge_models = run.judge_models()
    run.vectors(models)
    merges = run.merges(models)
    similarity = run.similarity(models, merges)
    everything = run.all_models(models, merges)
    safety: dict[str, Any] = {}
    if cfg.generation.enabled:
        gens = run.generations(everything, run.prompts())
        safety = run.safety(run.judgments(gens, judge_models))
    domain = run.domain(everything)
    report = run.report(everything, safety, domain, similarity)
    extra = {}
    if report is not None:
        extra["report_future"] = report
    return run.finish(extra=extra)
