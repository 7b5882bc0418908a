"""Heavy steps as Prefect deployments on a work pool: the study calls `run_deployment` and waits.

The remote flow run computes the same artifact key from the same inputs and publishes to the shared artifact
root; the local task then reads the manifest from the store. Its cache key is the step's key, so a step that
finished anywhere (locally or on a worker) is a cache hit for both.
"""

from __future__ import annotations

from typing import Any

from mergealign.artifacts import Manifest
from mergealign.errors import MergeAlignError
from tasks.context import StepContext
from tasks.runtime import run_logger


def run_remote(
    ctx: StepContext, step: str, key: str, deployment: str, parameters: dict[str, Any], label: str
) -> Manifest:
    """Run `deployment` with `parameters`, wait for it, then return the verified manifest of `<step>/<key>`."""
    from prefect.deployments import run_deployment

    logger = run_logger()
    store = ctx.store()
    existing = store.lookup(step, key, ctx.verify)
    if existing is not None:
        return existing
    logger.info("%s %s: running on deployment %s", step, label, deployment)
    flow_run = run_deployment(deployment, parameters=parameters, timeout=None, as_subflow=True)
    state = flow_run.state
    if state is None or not state.is_completed():
        raise MergeAlignError(
            f"{step} {label}: deployment {deployment} ended {state.name if state else 'without a state'} "
            f"(flow run {flow_run.name}); see its logs in the Prefect UI"
        )
    manifest = store.lookup(step, key, ctx.verify)
    if manifest is None:
        raise MergeAlignError(
            f"{step} {label}: deployment {deployment} completed but {store.url(step, key)} holds no verified "
            "artifacts; do the worker and this run share the artifact root (and the same code version)?"
        )
    return manifest
