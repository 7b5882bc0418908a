"""Step artifacts: `<root>/<step>/<key>/` directories with a manifest, published atomically.

The artifact root is any fsspec URL (a local directory by default, s3:// or similar for a shared store).
A step writes its files into a deterministic local staging directory (so a killed step can resume there),
then `publish` hashes them, moves the directory into place and writes `manifest.json` last: a directory
without a manifest is never taken for finished work. A manifest lists every file with its size and
sha256; `verify` checks them before a finished step is trusted again.

The key of a step is a sha256 of what its output depends on: the content hashes of its input manifests,
resolved commit shas, its parameters and its code version (`step_key`). Prefect-free on purpose: the
Prefect tasks use the same key as their cache key.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import fsspec
from pydantic import BaseModel, ConfigDict, Field

from mergealign.errors import MergeAlignError
from mergealign.files import (
    atomic_write_text,
    canonical_json,
    fsync_dir,
    sha256_bytes,
    sha256_file,
    sha256_json,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
STAGING_DIR = ".staging"
SCHEMA_VERSION = 1
VerifyLevel = Literal["full", "quick", "none"]


# --------------------------------------------------------------------------- keys
def step_key(
    step: str,
    *,
    inputs: Mapping[str, str] | None = None,
    shas: Mapping[str, str] | None = None,
    params: Any = None,
    code_version: str,
) -> str:
    """sha256 over the input manifests' content hashes, resolved commit shas, parameters and code version.

    Nothing run-specific (no run id, no time, no absolute staging path) may go in, or a repeated run would
    miss its own finished steps.
    """
    payload = {
        "step": step,
        "inputs": dict(inputs or {}),
        "shas": dict(shas or {}),
        "params": params,
        "code_version": code_version,
    }
    return sha256_json(payload)


def library_versions(
    names: Iterable[str] = ("mergealign", "torch", "transformers", "safetensors"),
) -> dict[str, str]:
    """Installed versions of the libraries a step used (recorded in its manifest; absent ones skipped)."""
    import platform

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------- manifest
class FileEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")

    path: str  # relative to the manifest's location, '/'-separated
    size: int
    sha256: str
    mtime_ns: int | None = None  # local files only; lets `quick` verification skip re-hashing


class Manifest(BaseModel):
    """What a finished step produced. Small: tasks return it, never tensors or texts."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = SCHEMA_VERSION
    step: str
    key: str
    location: str  # directory holding `files`: <root>/<step>/<key>, or an external directory
    external: bool = False  # files live outside the artifact root (a user's model dir, the HF cache)
    files: list[FileEntry] = Field(default_factory=list)
    content_hash: str
    params: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, str] = Field(default_factory=dict)
    shas: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    code_version: str = ""
    versions: dict[str, str] = Field(default_factory=dict)
    started_at: str = ""
    finished_at: str = ""
    duration_s: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, relpath: str) -> FileEntry:
        for f in self.files:
            if f.path == relpath:
                return f
        raise KeyError(f"{self.step}/{self.key}: no file {relpath!r} in its manifest")

    def has_file(self, relpath: str) -> bool:
        return any(f.path == relpath for f in self.files)


def content_hash(step: str, key: str, files: Iterable[FileEntry]) -> str:
    """Identity of what a step produced: its files' paths, sizes and sha256s (timings excluded), so a
    recomputed, byte-identical output gives downstream steps the same key."""
    listing = sorted((f.path, f.size, f.sha256) for f in files)
    return sha256_json({"step": step, "key": key, "files": listing})


# --------------------------------------------------------------------------- store
class ArtifactStore:
    """Artifacts of every step under one root URL."""

    def __init__(self, root: str | os.PathLike[str], *, staging_root: str | os.PathLike[str] | None = None):
        root = os.fspath(root)
        self.fs, path = fsspec.core.url_to_fs(root)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocols or "local" in protocols
        if self.is_local:
            self._root = str(Path(path).expanduser().resolve())
            self.root = self._root
        else:
            self._root = path.rstrip("/")
            self.root = root.rstrip("/")
        self._protocol = protocols[0]
        if staging_root is not None:
            self._staging_root = Path(staging_root).expanduser().resolve()
        elif self.is_local:
            self._staging_root = Path(self._root)
        else:
            cache = Path(os.environ.get("MERGEALIGN_CACHE", Path.home() / ".cache" / "mergealign"))
            self._staging_root = cache / "stores" / sha256_bytes(self.root.encode())[:16]

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    # ---------------------------------------------------------------- paths
    def _path(self, *parts: str) -> str:
        return "/".join([self._root, *parts])

    def url(self, step: str, key: str) -> str:
        """Where a step's artifacts live, as a user would type it (a path, or protocol://...)."""
        if self.is_local:
            return str(Path(self._root, step, key))
        return f"{self._protocol}://{self._path(step, key).lstrip('/')}"

    def manifest_path(self, step: str, key: str) -> str:
        return self._path(step, key, MANIFEST_NAME)

    def staging_dir(self, step: str, key: str) -> Path:
        """A local directory to build a step's output in. Deterministic (no random part), so a step killed
        mid-way finds its partial work again and can resume; the caller holds the lock for the key."""
        if self.is_local:
            d = Path(self._root, step, STAGING_DIR, key)
        else:
            d = self._staging_root / "staging" / step / key
        d.mkdir(parents=True, exist_ok=True)
        return d

    def check_writable(self) -> None:
        """Raise a MergeAlignError naming the root if files cannot be created under it."""
        probe = self._path(f".write-probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self._root, exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ok")
            self.fs.rm(probe)
        except (OSError, PermissionError, NotImplementedError, ValueError) as exc:
            raise MergeAlignError(
                f"artifact root {self.root!r} is not writable ({type(exc).__name__}: {exc}); "
                "choose another `artifact_root` in the run config"
            ) from None

    # ---------------------------------------------------------------- read
    def load(self, step: str, key: str) -> Manifest | None:
        """The manifest of a published step, or None (absent or unreadable)."""
        path = self.manifest_path(step, key)
        try:
            with self.fs.open(path, "rb") as f:
                raw = f.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValueError as exc:
            log.warning("%s: unreadable manifest (%s); the step will be recomputed", path, exc)
            return None
        if manifest.step != step or manifest.key != key:
            log.warning(
                "%s: manifest is for %s/%s; the step will be recomputed", path, manifest.step, manifest.key
            )
            return None
        return manifest

    def _file_fs_path(self, manifest: Manifest, rel: str) -> tuple[fsspec.AbstractFileSystem, str]:
        if manifest.external or self.is_local:
            return fsspec.filesystem("file"), str(Path(manifest.location, rel))
        return self.fs, self._path(manifest.step, manifest.key, rel)

    def verify(self, manifest: Manifest, level: VerifyLevel = "full") -> list[str]:
        """Problems with a manifest's files (missing, wrong size, wrong sha256); empty when it is sound.

        `quick` re-hashes only files whose size or mtime changed since publishing (local files); `full`
        re-hashes everything; `none` checks presence and size only.
        """
        problems: list[str] = []
        for entry in manifest.files:
            fs, path = self._file_fs_path(manifest, entry.path)
            try:
                info = fs.info(path)
            except (FileNotFoundError, NotADirectoryError):
                problems.append(f"{path}: missing")
                continue
            size = info.get("size")
            if size != entry.size:
                problems.append(f"{path}: size {size}, manifest says {entry.size}")
                continue
            if level == "none":
                continue
            if level == "quick" and entry.mtime_ns is not None and (manifest.external or self.is_local):
                try:
                    if os.stat(path).st_mtime_ns == entry.mtime_ns:
                        continue
                except OSError:
                    pass
            digest = sha256_file(path, fs=fs)
            if digest != entry.sha256:
                problems.append(f"{path}: sha256 {digest[:12]}…, manifest says {entry.sha256[:12]}…")
        return problems

    def lookup(self, step: str, key: str, level: VerifyLevel = "full") -> Manifest | None:
        """The manifest of a finished step whose files verify, else None (and the reason is logged)."""
        manifest = self.load(step, key)
        if manifest is None:
            return None
        problems = self.verify(manifest, level)
        if problems:
            log.warning(
                "%s/%s: published artifacts fail verification, recomputing: %s",
                step,
                key[:12],
                "; ".join(problems[:5]),
            )
            return None
        return manifest

    def local_dir(self, manifest: Manifest) -> Path:
        """A local directory with the manifest's files (downloaded and verified first if the store is remote)."""
        if manifest.external or self.is_local:
            return Path(manifest.location)
        target = self._staging_root / "cache" / manifest.step / manifest.key
        marker = target / MANIFEST_NAME
        if marker.exists() and marker.read_text() == manifest.model_dump_json():
            return target
        if target.exists():
            shutil.rmtree(target)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        for entry in manifest.files:
            dest = tmp / entry.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get(self._path(manifest.step, manifest.key, entry.path), str(dest))
            if sha256_file(dest) != entry.sha256:
                shutil.rmtree(tmp, ignore_errors=True)
                raise MergeAlignError(
                    f"{self.url(manifest.step, manifest.key)}/{entry.path}: sha256 mismatch on download"
                )
        atomic_write_text(tmp / MANIFEST_NAME, manifest.model_dump_json())
        os.replace(tmp, target)
        return target

    # ---------------------------------------------------------------- write
    def publish(
        self,
        step: str,
        key: str,
        staging: Path,
        *,
        params: Mapping[str, Any] | None = None,
        inputs: Mapping[str, str] | None = None,
        shas: Mapping[str, str] | None = None,
        metrics: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        code_version: str = "",
        versions: Mapping[str, str] | None = None,
        started: float | None = None,
    ) -> Manifest:
        """Move a finished staging directory to `<root>/<step>/<key>/` and write its manifest last."""
        staging = Path(staging)
        files = _hash_tree(staging)
        if self.is_local:
            final = Path(self._root, step, key)
            if final.exists():
                existing = self.lookup(step, key, "quick")
                if existing is not None:  # someone else finished first: keep theirs
                    shutil.rmtree(staging, ignore_errors=True)
                    return existing
                _remove_tree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, final)
            fsync_dir(final.parent)
            for entry in files:  # rename keeps mtimes, but read them from the final place to be sure
                entry.mtime_ns = os.stat(final / entry.path).st_mtime_ns
            location = str(final)
        else:
            final_path = self._path(step, key)
            if self.fs.exists(final_path):
                self.fs.rm(final_path, recursive=True)
            for entry in files:
                self.fs.makedirs(self._path(step, key, *entry.path.split("/")[:-1]), exist_ok=True)
                self.fs.put_file(str(staging / entry.path), self._path(step, key, entry.path))
                entry.mtime_ns = None
            location = self.url(step, key)
        manifest = self._manifest(
            step,
            key,
            location,
            False,
            files,
            params,
            inputs,
            shas,
            metrics,
            extra,
            code_version,
            versions,
            started,
        )
        self._write_manifest(manifest)
        if not self.is_local:
            shutil.rmtree(staging, ignore_errors=True)
        return manifest

    def publish_external(
        self,
        step: str,
        key: str,
        location: Path,
        relpaths: Iterable[str],
        *,
        params: Mapping[str, Any] | None = None,
        inputs: Mapping[str, str] | None = None,
        shas: Mapping[str, str] | None = None,
        metrics: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        code_version: str = "",
        versions: Mapping[str, str] | None = None,
        started: float | None = None,
        known_sha256: Mapping[str, str] | None = None,
    ) -> Manifest:
        """Record files that stay where they are (a local model directory, the HF cache): manifest only."""
        location = Path(location).resolve()
        files = []
        for rel in sorted(relpaths):
            p = location / rel
            st = p.stat()
            digest = (known_sha256 or {}).get(rel) or sha256_file(p)
            files.append(FileEntry(path=rel, size=st.st_size, sha256=digest, mtime_ns=st.st_mtime_ns))
        manifest = self._manifest(
            step,
            key,
            str(location),
            True,
            files,
            params,
            inputs,
            shas,
            metrics,
            extra,
            code_version,
            versions,
            started,
        )
        self._write_manifest(manifest)
        return manifest

    def discard(self, step: str, key: str) -> None:
        """Remove a published step (its manifest first, so it is never half-trusted)."""
        path = self._path(step, key)
        if self.is_local:
            final = Path(path)
            (final / MANIFEST_NAME).unlink(missing_ok=True)
            if final.exists():
                _remove_tree(final)
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def _manifest(self, step, key, location, external, files, params, inputs, shas, metrics, extra, code_version,
                  versions, started) -> Manifest:  # fmt: skip
        now = time.time()
        started = started if started is not None else now
        return Manifest(
            step=step,
            key=key,
            location=location,
            external=external,
            files=files,
            content_hash=content_hash(step, key, files),
            params=json.loads(canonical_json(dict(params or {}))),
            inputs=dict(inputs or {}),
            shas=dict(shas or {}),
            metrics=json.loads(canonical_json(dict(metrics or {}))),
            extra=json.loads(canonical_json(dict(extra or {}))),
            code_version=code_version,
            versions=dict(versions or library_versions()),
            started_at=_dt.datetime.fromtimestamp(started, _dt.UTC).isoformat(timespec="milliseconds"),
            finished_at=_now_iso(),
            duration_s=round(now - started, 3),
        )

    def _write_manifest(self, manifest: Manifest) -> None:
        text = manifest.model_dump_json(indent=2)
        if self.is_local:
            d = Path(self._root, manifest.step, manifest.key)
            d.mkdir(parents=True, exist_ok=True)
            atomic_write_text(d / MANIFEST_NAME, text)
        else:
            self.fs.pipe_file(self.manifest_path(manifest.step, manifest.key), text.encode())


# --------------------------------------------------------------------------- helpers
def _hash_tree(root: Path) -> list[FileEntry]:
    entries = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == MANIFEST_NAME and p.parent == root:
            continue
        rel = p.relative_to(root).as_posix()
        st = p.stat()
        entries.append(FileEntry(path=rel, size=st.st_size, sha256=sha256_file(p), mtime_ns=st.st_mtime_ns))
    return entries


def _remove_tree(path: Path) -> None:
    """Rename aside, then delete: a half-deleted tree never sits under its real name."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
