"""Executes a StudyPlan inside a flow: each planned step becomes a Prefect task run, or a flow run of the
deployment `execution.deployments` names for its kind, submitted in plan order.

Every step is submitted (`.submit`) to the flow's thread-pool task runner with the futures of its inputs;
Prefect starts a task as soon as those are done, so independent branches (similarity beside generation, one
model's answers beside another's merge) run at once. Nothing here knows what a step does: the step kinds in
tasks/ do. The study, merge and evaluate flows all go through here, so a step has the same key whichever runs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.futures import PrefectFuture, wait

from mergealign.errors import MergeAlignError
from mergealign.study import RunConfig, Step, StudyPlan, check_inputs, coerce_config, plan_study
from tasks.cache import bind
from tasks.context import StepContext, context_for
from tasks.publish import publish_table
from tasks.runtime import run_logger
from tasks.steps import Pins, kind_of, remote_step_task, step_task


def _result(fut: PrefectFuture[Any] | None) -> Any:
    """The result of a finished future, or None if it failed (a tolerant step says what is missing)."""
    return fut.result() if fut is not None and fut.state.is_completed() else None


@dataclass
class PlanRun:
    """One flow run's execution of (part of) a study plan: config, context, and every submitted future."""

    cfg: RunConfig
    plan: StudyPlan
    ctx: StepContext
    futures: dict[str, PrefectFuture[Any]] = field(default_factory=dict)
    _tasks: dict[tuple[str, bool], Task[..., Any]] = field(default_factory=dict)
    _memo: dict[str, Any] = field(default_factory=dict)  # pinned sources, shared by the steps of this run

    @classmethod
    def start(cls, config: RunConfig | Mapping[str, Any] | str) -> PlanRun:
        """Validate the config and the world (paths, writable root) before any step; build the tiny zoo."""
        cfg = coerce_config(config)
        if cfg.zoo_tiny is not None:
            from mergealign.zoo_tiny import build_tiny_zoo

            z = cfg.zoo_tiny
            build_tiny_zoo(z.dir, seed=z.seed, arch=z.arch, size=z.size, dtype=z.dtype)
        check_inputs(cfg)
        ctx = context_for(cfg)
        run_logger().info("study %s: artifacts under %s", cfg.name, ctx.artifact_root)
        return cls(cfg=cfg, plan=plan_study(cfg), ctx=ctx)

    def _task(self, step: Step, remote: bool) -> Task[..., Any]:
        kind = kind_of(step)
        if (kind.name, remote) not in self._tasks:
            ex = self.cfg.execution
            base = remote_step_task if remote else step_task
            named = base.with_options(name=f"{kind.name}-remote" if remote else kind.name)
            self._tasks[(kind.name, remote)] = bind(named, self.ctx, retries=ex.retries,
                                                    retry_delay_seconds=ex.retry_delay_seconds)  # fmt: skip
        return self._tasks[(kind.name, remote)]

    def _inputs(self, step: Step, tolerant: bool) -> dict[str, Any]:
        def one(step_id: str) -> Any:
            fut = self.futures[step_id]
            return _result(fut) if tolerant else fut

        return {role: one(v) if isinstance(v, str) else {k: one(i) for k, i in v.items()}
                for role, v in step.inputs.items()}  # fmt: skip

    def submit(self, steps: Iterable[Step], *, allow_remote: bool = True) -> dict[str, PrefectFuture[Any]]:
        """Submit `steps` (plan order; each one's inputs among them or submitted before)."""
        out = {}
        for step in steps:
            kind = kind_of(step)
            if kind.tolerant:  # it runs on whatever finished: wait for its inputs, pass None for failed ones
                wait([self.futures[i] for i in step.input_ids()])
            pins = kind.pin(self.ctx, step, self._memo) if kind.pin is not None else Pins()
            deployment = getattr(self.cfg.execution.deployments, step.kind, None) if allow_remote else None
            args: dict[str, Any] = dict(
                ctx=self.ctx, step=step, inputs=self._inputs(step, kind.tolerant), pins=pins
            )
            if deployment and kind.remote is not None:
                args.update(deployment=deployment, config=self.cfg.portable())
            after = [self.futures[a] for a in step.after if a in self.futures]
            task = self._task(step, remote="deployment" in args)
            out[step.id] = self.futures[step.id] = task.submit(**args, wait_for=after)
        return out

    def finish(self) -> dict[str, Any]:
        """Wait for every step; publish a table of them; raise (failing the flow) if any step failed."""
        wait(list(self.futures.values()))
        rows, failed = [], []
        for sid, fut in self.futures.items():
            step = self.plan[sid]
            state = fut.state
            row: dict[str, Any] = {"step": step.kind, "label": step.name, "state": state.name}
            if state.is_completed():
                manifest = fut.result()
                row.update(location=manifest.location, seconds=manifest.duration_s, key=manifest.key[:16])
            else:
                failed.append(
                    f"{step.kind} {step.name}: {state.name} ({(state.message or '').strip()[:300]})"
                )
            rows.append(row)
        name = self.cfg.name
        publish_table(rows, key=f"study-{name}", description=f"steps of study {name}")
        cached = sum(1 for r in rows if r["state"] == "Cached")
        run_logger().info("study %s: %d steps, %d cached, %d failed; artifacts under %s", name, len(rows), cached,
                          len(failed), self.ctx.artifact_root)  # fmt: skip
        if failed:
            raise MergeAlignError(
                f"study {name}: {len(failed)} step(s) did not finish:\n  - " + "\n  - ".join(failed)
            )
        out: dict[str, Any] = {"study": name, "artifact_root": self.ctx.artifact_root, "steps": rows}
        report = next((f for sid, f in self.futures.items() if self.plan[sid].kind == "report"), None)
        if report is not None:
            out["report"] = str(Path(report.result().location) / "report" / "report.html")
        return out
