"""One way to declare a step: a StepKind says how one kind of planned step is keyed, built and shown.

    MERGE = register(StepKind("merge", "merge-2", build=_build, title=lambda s: f"Merge {s.name}", ...))

Every kind runs through the same two Prefect tasks below (`step_task`, and `remote_step_task` when the run
config names a deployment for it): the task's cache key is the step's artifact key (its kind, code version,
parameters, pinned shas and its inputs' content hashes; no run id), a finished step is reused only if its
files verify, and a GPU step holds the GPU slot. A kind module (tasks/merge.py, tasks/generate.py, ...) only
turns input manifests into folders and calls mergealign.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prefect import task

from mergealign.artifacts import Manifest, library_versions, step_key
from mergealign.study.plan import Step
from tasks.cache import ArtifactCachePolicy
from tasks.context import StepContext
from tasks.publish import publish_markdown, run_step
from tasks.runtime import gpu_slot, run_logger

Inputs = Mapping[str, "Manifest | Mapping[str, Manifest] | None"]


@dataclasses.dataclass(frozen=True)
class Pins:
    """What a step pins when it is submitted (cheap, in the flow): identities that enter its key, and data its
    task needs of that pinning (a resolved hub source)."""

    shas: Mapping[str, str] = dataclasses.field(default_factory=dict)
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StepRun:
    """What a kind's build function gets: the context, the planned step, its input manifests, its pins."""

    ctx: StepContext
    step: Step
    inputs: Inputs
    pins: Pins
    key: str = ""

    def manifest(self, role: str) -> Manifest:
        value = self.inputs[role]
        assert isinstance(value, Manifest), role
        return value

    def manifests(self, role: str) -> dict[str, Manifest]:
        return dict(self.inputs.get(role) or {})  # type: ignore[arg-type]

    def dir(self, role_or_manifest: str | Manifest) -> Path:
        """The local folder of an input (downloaded from a remote store first)."""
        m = self.manifest(role_or_manifest) if isinstance(role_or_manifest, str) else role_or_manifest
        return self.ctx.store().local_dir(m)

    @property
    def logger(self) -> Any:
        return run_logger()


def _no_gpu(step: Step) -> bool:
    return False


def _params_of(step: Step) -> Any:
    return step.params


def _name_of(step: Step) -> str:
    return step.name


@dataclasses.dataclass(frozen=True)
class StepKind:
    """How one kind of planned step is keyed, built, published and shown."""

    name: str  # the plan's step kind, and the artifact folder <root>/<name>/<key>/
    code_version: str  # bump when the same inputs and parameters give other output
    build: Callable[[StepRun, Path], Mapping[str, Any] | None] | None = (
        None  # files into staging -> metrics/extra
    )
    title: Callable[[Step], str] = _name_of  # of its Prefect artifact
    label: Callable[[Step], str] = _name_of  # of its Prefect artifact's key
    manifest_params: Callable[[Step], Mapping[str, Any]] = lambda step: {}
    key_params: Callable[[Step], Any] = _params_of  # the part of the parameters its output depends on
    pin: Callable[[StepContext, Step, dict[str, Any]], Pins] | None = None  # run in the flow, memo shared
    uses_gpu: Callable[[Step], bool] = _no_gpu
    versions: tuple[str, ...] = ("mergealign",)
    remote: Callable[[Step], dict[str, Any]] | None = None  # its deployment's parameters besides `config`
    execute: Callable[[StepRun], Manifest] | None = None  # instead of build + publish (files kept in place)
    publish: Callable[[Manifest, StepRun], None] | None = None  # instead of the markdown artifact
    tolerant: bool = False  # runs when some inputs failed (they come as None): the report

    def key(self, step: Step, inputs: Inputs, pins: Pins) -> str:
        return step_key(self.name, inputs=content_hashes(inputs), shas=dict(pins.shas),
                        params=self.key_params(step), code_version=self.code_version)  # fmt: skip


KINDS: dict[str, StepKind] = {}


def register(kind: StepKind) -> StepKind:
    KINDS[kind.name] = kind
    return kind


def kind_of(step: Step) -> StepKind:
    if step.kind not in KINDS:
        import tasks.kinds  # noqa: F401  (imports every kind module, which registers itself)
    return KINDS[step.kind]


def content_hashes(inputs: Inputs) -> dict[str, str]:
    """Input manifests' content hashes by role (`role:name` for a mapping of manifests); absent ones left out."""
    out: dict[str, str] = {}
    for role, value in inputs.items():
        if isinstance(value, Manifest):
            out[role] = value.content_hash
        elif isinstance(value, Mapping):
            out.update({f"{role}:{k}": m.content_hash for k, m in sorted(value.items()) if m is not None})
    return out


def execute_step(ctx: StepContext, step: Step, inputs: Inputs, pins: Pins) -> Manifest:
    """The body of every step task: reuse the published step if it verifies, else build and publish it."""
    kind = kind_of(step)
    run = StepRun(ctx, step, inputs, pins, kind.key(step, inputs, pins))
    if kind.execute is not None:
        manifest = kind.execute(run)
    else:
        assert kind.build is not None, kind.name

        def build(staging: Path) -> Mapping[str, Any] | None:
            with gpu_slot(ctx) if kind.uses_gpu(step) else contextlib.nullcontext():
                return kind.build(run, staging)  # type: ignore[misc]

        manifest = run_step(ctx, kind.name, run.key, build, params=kind.manifest_params(step),
                            inputs=content_hashes(inputs), shas=dict(pins.shas), code_version=kind.code_version,
                            versions=library_versions(kind.versions))  # fmt: skip
    if kind.publish is not None:
        kind.publish(manifest, run)
    else:
        publish_markdown(manifest, kind.title(step), label=kind.label(step))
    return manifest


# --------------------------------------------------------------------------- the Prefect tasks
@dataclasses.dataclass
class StepCachePolicy(ArtifactCachePolicy):
    """The cache policy of the generic step tasks: the step (and so the key) comes with each call."""

    remote: bool = False

    def step_and_key(self, inputs: dict[str, Any]) -> tuple[str, str, str] | None:
        step: Step = inputs["step"]
        kind = kind_of(step)
        key = kind.key(step, inputs["inputs"], inputs["pins"])
        return kind.name, key, f"{kind.name}-remote" if self.remote else kind.name


@task(name="step", cache_policy=StepCachePolicy(), task_run_name="{step.run_name}")
def step_task(ctx: StepContext, step: Step, inputs: Inputs, pins: Pins) -> Manifest:
    """Run one planned step (or reuse it); returns its manifest."""
    return execute_step(ctx, step, inputs, pins)


@task(name="step-remote", cache_policy=StepCachePolicy(remote=True), task_run_name="{step.run_name}")
def remote_step_task(ctx: StepContext, step: Step, inputs: Inputs, pins: Pins, deployment: str,
                     config: dict[str, Any]) -> Manifest:  # fmt: skip
    """Run one planned step as a flow run of `deployment` on a work pool, wait, return its manifest."""
    from tasks.remote import run_remote

    kind = kind_of(step)
    assert kind.remote is not None, kind.name
    key = kind.key(step, inputs, pins)
    return run_remote(ctx, kind.name, key, deployment, {"config": config, **kind.remote(step)}, step.name)
