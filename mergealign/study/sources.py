"""Pinning the study's checkpoints: a hub id + revision to its commit sha, a local folder to a fingerprint.

Cheap (no weights read or downloaded): the flow pins every model before it submits a step, and the pinned
identity is part of every key downstream, so a new commit of `revision: main` reruns what depends on it.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from mergealign import hub
from mergealign.checkpoint import Checkpoint
from mergealign.errors import MergeAlignError


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


def local_files(path: Path) -> list[str]:
    """The files of a local model folder that a study reads (weights, config, tokenizer, templates)."""
    return sorted(p.name for p in path.iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in hub.ALLOW_PATTERNS))  # fmt: skip


def local_fingerprint(path: Path) -> str:
    """Cheap identity of a local model folder: tensor headers, config, and every file's size and mtime."""
    h = hashlib.sha256(Checkpoint(path).header_fingerprint().encode())
    for name in local_files(path):
        st = (path / name).stat()
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resolve_source(source: Mapping[str, Any], *, token: str | None = None) -> ResolvedSource:
    """Pin a model source ({path} or {hub, revision}); no weights downloaded. Errors name the model."""
    if source.get("path") is not None:
        path = Path(source["path"])
        if not path.is_dir():
            raise MergeAlignError(f"model {source['path']!r}: no such directory {path}")
        return ResolvedSource(kind="local", path=str(path), fingerprint=local_fingerprint(path))
    revision = source.get("revision")
    spec = f"{source['hub']}@{revision}" if revision else str(source["hub"])
    ref = hub.resolve(spec, token=token)
    return ResolvedSource(kind="hub", repo_id=ref.repo_id, revision=revision, sha=ref.sha)
