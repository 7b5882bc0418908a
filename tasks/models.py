"""Step `models`: record a pinned checkpoint's files (a hub snapshot, downloaded with allow-patterns, or a local
folder hashed in place). Its manifest's files stay where they are (the HF cache or the user's folder)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mergealign import hub
from mergealign.artifacts import Manifest, library_versions
from mergealign.checkpoint import Checkpoint
from mergealign.files import sha256_json
from mergealign.study.plan import Step
from mergealign.study.sources import ResolvedSource, local_files, resolve_source
from tasks.context import StepContext
from tasks.runtime import hf_token
from tasks.steps import Pins, StepKind, StepRun, register


def pinned_source(ctx: StepContext, source: dict[str, Any], memo: dict[str, Any]) -> ResolvedSource:
    """A model source pinned once per flow run (the preflight and the model's own step share it)."""
    key = f"source:{sha256_json(source)}"
    if key not in memo:
        memo[key] = resolve_source(source, token=hf_token(ctx) if source.get("hub") else None)
    return memo[key]


def _pin(ctx: StepContext, step: Step, memo: dict[str, Any]) -> Pins:
    resolved = pinned_source(ctx, dict(step.params["source"]), memo)
    return Pins(shas={"model": resolved.identity}, data={"source": resolved})


def _key_params(step: Step) -> dict[str, Any]:
    source = step.params["source"]
    if source.get("hub"):
        return {"kind": "hub", "repo": source["hub"], "allow": hub.ALLOW_PATTERNS}
    return {"kind": "local", "path": source["path"]}


def _execute(run: StepRun) -> Manifest:
    ctx, label = run.ctx, run.step.name
    source: ResolvedSource = run.pins.data["source"]
    store = ctx.store()
    existing = store.lookup(MODELS.name, run.key, ctx.verify)
    if existing is not None:
        return existing
    started = time.time()
    if source.kind == "hub":
        ref = hub.ResolvedRef(repo_id=source.repo_id or "", revision=source.revision, sha=source.sha or "")
        run.logger.info("downloading %s (%s)", source.describe, ", ".join(hub.ALLOW_PATTERNS[:3]) + ", ...")
        location = hub.download(ref, token=hf_token(ctx), cache_dir=ctx.hf_cache_dir)
        files = hub.snapshot_files(location)
        extra = {"repo_id": source.repo_id, "revision": source.revision, "sha": source.sha}
    else:
        location = Path(source.path or "")
        files = local_files(location)
        extra = {"path": source.path}
    ckpt = Checkpoint(location)
    metrics = {
        "tensors": len(ckpt.tensors),
        "parameters": sum(t.numel for t in ckpt.tensors.values()),
        "architecture": ",".join(ckpt.architectures) or ckpt.model_type or "?",
        "chat_template": ckpt.has_chat_template(),
    }
    ckpt.close()
    return store.publish_external(
        MODELS.name, run.key, location, files, params={"label": label, "kind": source.kind},
        shas=dict(run.pins.shas), metrics=metrics, extra=extra, code_version=MODELS.code_version,
        versions=library_versions(("mergealign", "huggingface_hub")), started=started,
    )  # fmt: skip


def _title(step: Step) -> str:
    source = step.params["source"]
    return f"Model {step.name}: {source.get('hub') or source.get('path')}"


MODELS = register(
    StepKind("models", "models-1", title=_title, key_params=_key_params, pin=_pin, execute=_execute)
)
