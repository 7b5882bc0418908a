"""The merge flow on its own: pin and fetch the inputs, then run the study's merges (all or some).

It is also the `merge` deployment the study calls on a GPU work pool, with `merges=[one id]`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.executor import PlanRun
from mergealign.errors import ConfigError


@flow(name="merge-flow", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def merge_flow(config: dict[str, Any] | str, merges: list[str] | None = None) -> dict[str, Any]:
    """Merge the config's merges (ids as `mergealign validate` lists them; all if None), locally."""
    run = PlanRun.start(config)
    known = [s.name for s in run.plan.of_kind("merge")]
    unknown = sorted(set(merges or []) - set(known))
    if unknown:
        raise ConfigError(
            [f"merges: no merge {u!r} in this config (merges: {', '.join(known)})" for u in unknown]
        )
    wanted = [f"merge:{m}" for m in (merges if merges is not None else known)]
    done = run.submit(run.plan.closure(wanted), allow_remote=False)
    summary = run.finish()
    summary["merged"] = {run.plan[sid].name: done[sid].result().location for sid in wanted}
    return summary
