"""Step `preflight`: the engine's preflight on every (base, expert, aligned) trio, from headers only.

Runs before any weights are downloaded: for hub models it reads config.json, the safetensors index and the
tensor headers through the hub API (a few KB), so models that do not fit together are rejected without
fetching gigabytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergealign import hub
from mergealign.checkpoint import Checkpoint
from mergealign.files import atomic_write_json
from mergealign.study.plan import Step
from mergealign.study.preflight import check_trios
from mergealign.study.sources import ResolvedSource
from tasks.context import StepContext
from tasks.models import pinned_source
from tasks.runtime import hf_token
from tasks.steps import Pins, StepKind, StepRun, register


def _pin(ctx: StepContext, step: Step, memo: dict[str, Any]) -> Pins:
    sources = {label: pinned_source(ctx, dict(src), memo) for label, src in step.info["sources"].items()}
    shas = {label: f"{s.kind}:{s.repo_id or s.path}:{s.identity}" for label, s in sorted(sources.items())}
    return Pins(shas=shas, data={"sources": sources})


def _open(ctx: StepContext, label: str, source: ResolvedSource, token: str | None) -> Checkpoint:
    if source.kind == "local":
        return Checkpoint(source.path or "", label=label)
    ref = hub.ResolvedRef(repo_id=source.repo_id or "", revision=source.revision, sha=source.sha or "")
    return hub.header_checkpoint(ref, token=token, cache_dir=ctx.hf_cache_dir, label=label)


def _build(run: StepRun, staging: Path) -> dict[str, Any]:
    sources: dict[str, ResolvedSource] = run.pins.data["sources"]
    token = hf_token(run.ctx) if any(s.kind == "hub" for s in sources.values()) else None
    checkpoints = {label: _open(run.ctx, label, src, token) for label, src in sources.items()}
    report = check_trios(checkpoints)  # PreflightError listing every problem of every trio
    atomic_write_json(staging / "preflight.json", report)
    arch = {",".join(ck.architectures) for ck in checkpoints.values()}
    run.logger.info("preflight: %s fit together", ", ".join(sorted(sources)))
    return {"metrics": {"models": len(checkpoints), "architecture": ",".join(sorted(arch)),
                        "tensors": len(checkpoints["base"].tensors)}}  # fmt: skip


PREFLIGHT = register(StepKind("preflight", "preflight-1", build=_build, pin=_pin,
                              title=lambda step: "Preflight: inputs fit together"))  # fmt: skip
