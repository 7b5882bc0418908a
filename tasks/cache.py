"""The artifact-key cache policy of every step task, and binding a task to one study (records, locks, retries).

A step task's Prefect cache key is our artifact key (`<step>-<sha256 of inputs, shas, params, code version>`,
no run id), so a new run of the same config, a scheduled run and a retry all reuse finished steps. Before a
cache hit is trusted the policy verifies the published files against their manifest; if they are missing or
corrupt it drops the stale Prefect record, so the step runs again. Keys are locked (SERIALIZABLE isolation with
`ArtifactLockManager`), so two runs of the same config compute each step once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from mergealign.hub import is_transient
from tasks.context import StepContext
from tasks.locks import ArtifactLockManager

log = logging.getLogger(__name__)

KeyFn = Callable[[Mapping[str, Any]], str]


@dataclasses.dataclass
class ArtifactCachePolicy(CachePolicy):
    """Cache key = `<step>-<artifact key>`; a hit is trusted only if the published artifacts verify."""

    step: str = ""
    key_fn: KeyFn | None = None
    # Record and lock name prefix; remote wrappers use their own ("merge-remote"), or the wrapper (holding the
    # lock while it waits for the deployment) and the remote step (needing it to run) would deadlock.
    record_prefix: str | None = None

    def step_and_key(self, inputs: dict[str, Any]) -> tuple[str, str, str] | None:
        """(artifact step, artifact key, record prefix) of a call, or None: not cached."""
        if self.key_fn is None:
            return None
        return self.step, self.key_fn(inputs), self.record_prefix or self.step

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        found = self.step_and_key(inputs)
        if found is None:
            return None
        step, key, prefix = found
        ctx: StepContext = inputs["ctx"]
        record_key = record_key_for(prefix, key)
        if ctx.store().lookup(step, key, ctx.verify) is None:
            record = Path(ctx.results_dir) / record_key
            if record.exists():
                log.warning("%s %s: cached record found but its artifacts are missing or corrupt; recomputing",
                            step, key[:12])  # fmt: skip
                record.unlink(missing_ok=True)
        return record_key


def record_key_for(step: str, key: str) -> str:
    return f"{step}-{key}"


def bind(task: Task[..., Any], ctx: StepContext, *, retries: int = 2, retry_delay_seconds: list[float] | None = None,
         **options: Any) -> Task[..., Any]:  # fmt: skip
    """A task configured for one study: records under the context's results dir, keys locked, retries for
    transient failures only."""
    policy = task.cache_policy
    if not isinstance(policy, ArtifactCachePolicy):
        raise TypeError(f"task {task.name!r} has no ArtifactCachePolicy")
    policy = policy.configure(
        isolation_level="SERIALIZABLE", lock_manager=ArtifactLockManager(Path(ctx.locks_dir))
    )
    Path(ctx.results_dir).mkdir(parents=True, exist_ok=True)
    return task.with_options(
        cache_policy=policy,
        result_storage=Path(ctx.results_dir),
        persist_result=True,
        cache_result_in_memory=False,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds if retry_delay_seconds is not None else [5, 30],
        retry_condition_fn=retry_if_transient,
        **options,
    )


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry network failures, HTTP 5xx/429 and timeouts; never 401/404, config or
    validation errors, or out-of-memory."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # the state could not even be read: do not retry blindly
        log.debug("retry condition could not read the failed state: %r", err)
        return False
    if not isinstance(exc, BaseException):
        return False
    transient = is_transient(exc)
    if not transient:
        log.info(
            "not retrying %s: %s is not a transient failure",
            getattr(task, "name", "task"),
            type(exc).__name__,
        )
    return transient
