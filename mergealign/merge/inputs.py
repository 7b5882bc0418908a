"""The inputs of a merge: each model string located (a local directory, or a hub id in the local HF cache) and
opened from its headers as a base, a model, or a persisted task vector."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergealign.checkpoint import Checkpoint
from mergealign.errors import CheckpointError, MergeAlignError, PreflightError
from mergealign.merge.config import MergeConfig
from mergealign.model_refs import parse_model_ref

VECTOR_META = "vector.json"  # written by mergealign.vectors next to a task vector's tensors


@dataclass
class MergeInput:
    """One opened input: the base, a model, or a persisted task vector."""

    label: str
    spec: str  # as written in the config
    path: Path
    checkpoint: Checkpoint
    kind: str  # "base" | "model" | "vector"
    commit: str | None = None  # hub commit sha when the spec is a hub id
    vector_meta: dict[str, Any] = field(default_factory=dict)
    role: str | None = None

    def identity(self, input_hashes: Mapping[str, str] | None) -> str:
        if input_hashes and self.spec in input_hashes:
            return input_hashes[self.spec]
        if self.commit:
            return f"commit {self.commit}"
        return f"sampled-sha256 {self.checkpoint.content_fingerprint()}"


def locate(spec: str, config_dir: Path | None = None) -> tuple[Path, str | None]:
    """A model string -> (local directory, commit sha or None). Hub ids are looked up in the local HF cache
    only (no network: downloading is the pipeline's job)."""
    # The current directory first (as mergekit), then the config file's directory.
    bases = [None] if config_dir is None else [None, config_dir]
    ref = None
    error: MergeAlignError | None = None
    for base_dir in bases:
        try:
            candidate = parse_model_ref(spec, base_dir=base_dir)
        except MergeAlignError as exc:
            error = error or exc
            continue
        if ref is None or candidate.is_local:
            ref = candidate
        if ref.is_local:
            break
    if ref is None:
        assert error is not None
        raise error
    if ref.is_local:
        assert ref.local_path is not None
        return ref.local_path, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True)  # type: ignore[arg-type]
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise CheckpointError(
            f"model {spec!r}: not a local directory and not in the local Hugging Face cache; download it first "
            "(the pipeline's download step) or name a local directory"
        ) from None
    return Path(path), Path(path).name


def open_inputs(cfg: MergeConfig) -> tuple[MergeInput | None, list[MergeInput]]:
    """Open the base and every model / vector from headers only. CheckpointErrors are collected."""
    config_dir = cfg.source_path.parent if cfg.source_path else None
    errors: list[str] = []

    def _open(spec: str, label: str, kind: str, role: str | None = None) -> MergeInput | None:
        try:
            path, commit = locate(spec, config_dir)
            ckpt = Checkpoint(path, label=label)
            meta: dict[str, Any] = {}
            if kind == "vector":
                meta_path = path / VECTOR_META
                if not meta_path.exists():
                    raise CheckpointError(
                        f"{path}: not a task vector directory (no {VECTOR_META}; see `mergealign diff`)"
                    )
                try:
                    meta = json.loads(meta_path.read_text())
                except (OSError, json.JSONDecodeError) as exc:
                    raise CheckpointError(f"{meta_path}: unreadable ({exc})") from None
            return MergeInput(label, spec, path, ckpt, kind, commit, meta, role)
        except MergeAlignError as exc:
            errors.append(f"{label}: {exc}")
            return None

    base = _open(cfg.base_model, "base", "base") if cfg.base_model else None
    models = []
    for entry, label in zip(cfg.models, cfg.labels(), strict=True):
        kind = "vector" if entry.vector is not None else "model"
        models.append(_open(entry.ref, label, kind, entry.role))
    if errors:
        raise PreflightError(errors)
    return base, [m for m in models if m is not None]


def find_input(
    ref: str | None, cfg: MergeConfig, base: MergeInput | None, models: Sequence[MergeInput]
) -> MergeInput | None:
    """The opened input a reference names ('base', a role, a model or vector string), or None."""
    if ref is None:
        return None
    target = cfg.resolve_ref(ref)
    if base is not None and target == base.spec:
        return base
    return next((m for m in models if m.spec == target), None)
