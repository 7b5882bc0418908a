"""Step `zoo-<step>`: one step of the demo zoo (mergealign.demo.zoo_steps) as a cached Prefect task.

The cache key of a step is its record key (zoo_record_key: the keys of its upstream steps, its options and
seed, the code fingerprint), never a run id, so a second `make demo` finds every task Cached. Before a hit is
trusted the published folder must still hold the very step (same step key) the cached result names, else
the record is dropped and the step runs again (and itself reuses what is valid). Records and locks live in
`<dir>/.prefect/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from prefect import Task, task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from mergealign.demo.zoo_steps import ZooContext, build_step, published_key, zoo_record_key
from mergealign.files import atomic_write_text
from tasks.locks import ArtifactLockManager
from tasks.publish import artifact_key
from tasks.runtime import run_logger

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ZooStepPolicy(CachePolicy):
    """Cache key = zoo_record_key; a hit is trusted only if the step's folder still holds the step it names."""

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        zoo: ZooContext = inputs["zoo"]
        step: str = inputs["step"]
        record_key = zoo_record_key(zoo, step, inputs.get("options") or {}, inputs.get("upstream") or {})
        expected = zoo.paths.step_keys_dir / record_key
        have = published_key(zoo.paths.step(step))
        if not expected.is_file() or have is None or expected.read_text().strip() != have:
            record = zoo.paths.results_dir / record_key
            if record.exists():
                log.warning("zoo %s: cached record found but %s no longer holds that step; rebuilding",
                            step, zoo.paths.step(step))  # fmt: skip
                record.unlink(missing_ok=True)
        return record_key


def _publish(manifest: dict[str, Any], step: str) -> None:
    """A markdown artifact per zoo step: where, key, time, the step's own metrics."""
    from prefect.artifacts import create_markdown_artifact

    lines = [f"# Demo zoo: {step}", "", "| | |", "|---|---|", f"| folder | `{manifest.get('out_dir')}` |",
             f"| step key | `{str(manifest.get('key'))[:16]}` |", f"| files | {len(manifest.get('files') or {})} |",
             f"| time | {manifest.get('seconds', 0)} s |"]  # fmt: skip
    metrics = manifest.get("metrics") or {}
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {json.dumps(v)[:200]} |" for k, v in metrics.items()]
    try:
        create_markdown_artifact(
            "\n".join(lines), key=artifact_key("zoo", step), description=f"demo zoo: {step}"
        )
    except Exception as exc:  # an artifact is a report, never a reason to fail the step
        log.warning("could not publish the Prefect artifact of zoo step %s: %s", step, exc)


@task(name="zoo-step", cache_policy=ZooStepPolicy(), task_run_name="zoo-{step}")
def zoo_step_task(
    zoo: ZooContext, step: str, options: dict[str, Any], upstream: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Build (or reuse) one zoo step; returns its manifest (step, key, out_dir, files, metrics, seconds)."""
    logger = run_logger()
    manifest = build_step(zoo, step, options, upstream)
    manifest = json.loads(json.dumps(manifest, default=str))
    manifest["out_dir"] = str(zoo.paths.step(step))
    record_key = zoo_record_key(zoo, step, options, upstream)
    atomic_write_text(zoo.paths.step_keys_dir / record_key, manifest["key"])
    logger.info("zoo %s: %s (key %s, %s s)", step, manifest["out_dir"], manifest["key"][:12],
                manifest.get("seconds", 0))  # fmt: skip
    _publish(manifest, step)
    return manifest


def bound_zoo_step(zoo: ZooContext) -> Task[..., dict[str, Any]]:
    """zoo_step_task with its records under `<dir>/.prefect/results` and its locks under `.prefect/locks`."""
    policy = ZooStepPolicy().configure(
        isolation_level="SERIALIZABLE", lock_manager=ArtifactLockManager(zoo.paths.locks_dir)
    )
    zoo.paths.results_dir.mkdir(parents=True, exist_ok=True)
    return zoo_step_task.with_options(
        cache_policy=policy,
        result_storage=zoo.paths.results_dir,
        persist_result=True,
        cache_result_in_memory=False,
    )
