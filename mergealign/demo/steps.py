"""File-in/file-out plumbing shared by the demo zoo's steps.

Every step builds its output in a temp directory next to `out_dir`, writes `zoo_step.json` (its small
manifest) last, then renames the directory into place: a killed step leaves only a `.tmp-*` sibling that
no later run takes for finished work. A finished `out_dir` whose manifest has the same step key is
returned as is, so a repeated call costs nothing (the Prefect tasks add their own caching on top).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from mergealign.errors import MergeAlignError
from mergealign.files import fsync_dir, sha256_file, sha256_text

log = logging.getLogger(__name__)

STEP_MANIFEST = "zoo_step.json"
# Bump a step's version when a change in mergealign/demo changes what that step writes: a finished output
# directory is reused only when its key (step, parameters, inputs' keys, version) matches.
ZOO_CODE_VERSION = "demo-zoo-v1"
STEP_VERSIONS = {
    "convert_smollm2": 1,
    "knowledge_data": 3,
    "safety_prompts": 1,
    "aligned_data": 1,
    "train_aligned": 1,
    "train_expert": 1,
}


def step_key(step: str, params: dict[str, Any]) -> str:
    """What a step's output depends on: its name, parameters (input paths' manifests included) and code."""
    # Plain json.dumps (ASCII escapes, str() for other types), not files.canonical_json: the keys of zoos
    # already built were computed this way, and a different key would retrain them.
    payload = json.dumps(
        {"step": step, "params": params, "code": ZOO_CODE_VERSION, "version": STEP_VERSIONS.get(step, 0)},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return sha256_text(payload)


def input_fingerprint(path: str | os.PathLike[str]) -> str:
    """The key of the step that produced `path` (its zoo_step.json), else a hash of its files' names and sizes."""
    p = Path(path)
    manifest = p / STEP_MANIFEST if p.is_dir() else None
    if manifest is not None and manifest.is_file():
        return json.loads(manifest.read_text())["key"]
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    listing = [
        (f.relative_to(p).as_posix() if p.is_dir() else f.name, f.stat().st_size)
        for f in files
        if f.is_file()
    ]
    return sha256_text(json.dumps(listing))


def load_step_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    path = Path(out_dir) / STEP_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for rel, entry in manifest.get("files", {}).items():  # presence and size: cheap, catches truncation
        f = Path(out_dir) / rel
        if not f.is_file() or f.stat().st_size != entry["size"]:
            return None
    manifest["out_dir"] = str(Path(out_dir).resolve())
    return manifest


def versions(names: Iterable[str] = ("torch", "transformers", "peft", "gguf", "lm_eval")) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(root)


@contextmanager
def _staging(out_dir: Path):
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_step(
    step: str,
    out_dir: str | os.PathLike[str],
    params: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run `build(tmp_dir) -> metrics` unless `out_dir` already holds this step's output; publish atomically.

    Returns the manifest: step, key, out_dir, files {relpath: {size, sha256}}, params, metrics, seconds,
    versions. `build` writes everything into the temp dir it is given (never into `out_dir`).
    """
    out = Path(out_dir).resolve()
    key = step_key(step, params)
    existing = load_step_manifest(out)
    if existing is not None and existing.get("key") == key and not overwrite:
        log.info("%s: %s is done already (key %s), reusing it", step, out, key[:12])
        return existing
    if out.exists() and existing is None and any(out.iterdir()):
        old = out / STEP_MANIFEST
        if not old.is_file():
            raise MergeAlignError(
                f"{out}: exists, is not empty and holds no {STEP_MANIFEST}; refusing to overwrite it "
                "(choose an empty or new output directory)"
            )
    started = time.time()
    with _staging(out) as tmp:
        metrics = build(tmp)
        files = {
            p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "step": step,
            "key": key,
            "files": files,
            "params": json.loads(json.dumps(params, default=str)),
            "metrics": metrics,
            "seconds": round(time.time() - started, 2),
            "versions": versions(),
            "code_version": f"{ZOO_CODE_VERSION}/{step}-{STEP_VERSIONS.get(step, 0)}",
        }
        (tmp / STEP_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync_tree(tmp)
        if out.exists():  # an empty dir (a caller's staging dir) or our own older output
            trash = out.parent / f".trash-{out.name}-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, out)
    manifest["out_dir"] = str(out)
    log.info("%s: wrote %s in %.1f s", step, out, manifest["seconds"])
    return manifest
