"""Step `models`: pin each input checkpoint and record its files (hub snapshot or local directory).

`resolve_source` (a plain function the flow calls, cheap) pins a hub id + revision to a commit sha, or
fingerprints a local directory from its headers, sizes and mtimes. `fetch_model` (a task keyed on that) downloads
the pinned snapshot with allow-patterns (or, for a local directory, hashes its files in place) and publishes a
manifest whose files stay where they are (the HF cache or the user's folder).
"""

from __future__ import annotations

import fnmatch
import hashlib
import time
from pathlib import Path
from typing import Any, Literal

from prefect import task
from pydantic import BaseModel, ConfigDict

from mergealign import hub
from mergealign.artifacts import Manifest, library_versions, step_key
from mergealign.checkpoint import Checkpoint
from mergealign.config import ModelSource, RunConfig
from mergealign.errors import MergeAlignError
from tasks.common import ArtifactCachePolicy, StepContext, hf_token, publish_markdown, run_logger

STEP = "models"
CODE_VERSION = "models-1"


class ResolvedSource(BaseModel):
    """A checkpoint pinned for this run: a hub commit sha, or a local folder's fingerprint."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["local", "hub"]
    path: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    sha: str | None = None
    fingerprint: str | None = None

    @property
    def describe(self) -> str:
        return f"{self.repo_id}@{(self.sha or '')[:12]}" if self.kind == "hub" else str(self.path)

    @property
    def identity(self) -> str:
        return (self.sha if self.kind == "hub" else self.fingerprint) or ""


def _local_files(path: Path) -> list[str]:
    return sorted(
        p.name
        for p in path.iterdir()
        if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in hub.ALLOW_PATTERNS)
    )


def local_fingerprint(path: Path) -> str:
    """Cheap identity of a local model folder: tensor headers, config, and every file's size and mtime."""
    h = hashlib.sha256(Checkpoint(path).header_fingerprint().encode())
    for name in _local_files(path):
        st = (path / name).stat()
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resolve_source(cfg: RunConfig, src: ModelSource, *, token: str | None = None) -> ResolvedSource:
    """Pin a model source (no weights downloaded). Errors name the model and say what to do."""
    if src.path is not None:
        path = cfg.resolve_path(src.path)
        if not path.is_dir():
            raise MergeAlignError(f"model {src.path!r}: no such directory {path}")
        return ResolvedSource(kind="local", path=str(path), fingerprint=local_fingerprint(path))
    spec = f"{src.hub}@{src.revision}" if src.revision else str(src.hub)
    ref = hub.resolve(spec, token=token)
    return ResolvedSource(kind="hub", repo_id=ref.repo_id, revision=src.revision, sha=ref.sha)


def model_key(source: ResolvedSource) -> str:
    params: dict[str, Any] = {"kind": source.kind}
    if source.kind == "hub":
        params.update(repo=source.repo_id, allow=hub.ALLOW_PATTERNS)
    else:
        params.update(path=source.path)
    return step_key(STEP, shas={"model": source.identity}, params=params, code_version=CODE_VERSION)


def _key(inputs: dict[str, Any]) -> str:
    return model_key(inputs["source"])


@task(name="models", cache_policy=ArtifactCachePolicy(step=STEP, key_fn=_key), task_run_name="models-{label}")
def fetch_model(ctx: StepContext, source: ResolvedSource, label: str) -> Manifest:
    """Download a pinned hub snapshot (or take a local folder as it is) and publish its manifest."""
    logger = run_logger()
    store = ctx.store()
    key = model_key(source)
    existing = store.lookup(STEP, key, ctx.verify)
    if existing is not None:
        return existing
    started = time.time()
    if source.kind == "hub":
        ref = hub.ResolvedRef(repo_id=source.repo_id or "", revision=source.revision, sha=source.sha or "")
        logger.info("downloading %s (%s)", source.describe, ", ".join(hub.ALLOW_PATTERNS[:3]) + ", ...")
        location = hub.download(ref, token=hf_token(ctx), cache_dir=ctx.hf_cache_dir)
        files = hub.snapshot_files(location)
        shas = {"model": source.sha or ""}
        extra = {"repo_id": source.repo_id, "revision": source.revision, "sha": source.sha}
    else:
        location = Path(source.path or "")
        files = _local_files(location)
        shas = {"model": source.fingerprint or ""}
        extra = {"path": source.path}
    ckpt = Checkpoint(location)
    metrics = {
        "tensors": len(ckpt.tensors),
        "parameters": sum(t.numel for t in ckpt.tensors.values()),
        "architecture": ",".join(ckpt.architectures) or ckpt.model_type or "?",
        "chat_template": ckpt.has_chat_template(),
    }
    ckpt.close()
    manifest = store.publish_external(
        STEP, key, location, files, params={"label": label, "kind": source.kind}, shas=shas, metrics=metrics,
        extra=extra, code_version=CODE_VERSION, versions=library_versions(("mergealign", "huggingface_hub")),
        started=started,
    )  # fmt: skip
    publish_markdown(manifest, f"Model {label}: {source.describe}", label=label)
    return manifest


def model_dir(ctx: StepContext, manifest: Manifest) -> Path:
    """The local folder of a `models` manifest (or any model-producing step)."""
    return ctx.store().local_dir(manifest)


__all__ = ["ResolvedSource", "fetch_model", "model_dir", "model_key", "resolve_source", "local_fingerprint"]
