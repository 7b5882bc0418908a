"""The merge flow on its own: pin and fetch the inputs, then run the study's merges (all or some).

It is also the `merge` deployment the study calls on a GPU work pool, with `merges=[one id]`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.runner import StudyRun


@flow(name="merge-flow", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def merge_flow(config: dict[str, Any] | str, merges: list[str] | None = None) -> dict[str, Any]:
    """Merge the config's jobs (ids as `mergealign validate` lists them; all if None), locally."""
    run = StudyRun.start(config)
    known = [j.id for j in run.cfg.merge_jobs()]
    unknown = sorted(set(merges or []) - set(known))
    if unknown:
        from mergealign.errors import ConfigError

        raise ConfigError(
            [f"merges: no merge {u!r} in this config (merges: {', '.join(known)})" for u in unknown]
        )
    models = run.models()
    done = run.merges(models, merges, allow_remote=False)
    summary = run.finish()
    summary["merged"] = {jid: fut.result().location for jid, fut in done.items()}
    return summary
