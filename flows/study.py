"""The study flow: every step of a run config's plan, from pinned checkpoints to the report.

Run it with `mergealign run CONFIG`, as a deployment (deployments/prefect.yaml), or from Python:
`mergealign_study("configs/smoke.yaml")`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.executor import PlanRun
from mergealign.study import coerce_config


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
        demo_zoo_flow(directory=z.dir, seed=z.seed, steps=z.steps, base=z.base)
    run = PlanRun.start(cfg)
    run.submit(run.plan.steps)
    return run.finish()
