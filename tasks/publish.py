"""Publishing a step: its files under the artifact root (run_step), and what the Prefect UI shows of it."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mergealign.artifacts import Manifest
from tasks.context import StepContext
from tasks.runtime import run_logger

log = logging.getLogger(__name__)


def run_step(
    ctx: StepContext,
    step: str,
    key: str,
    build: Callable[[Path], Mapping[str, Any] | None],
    *,
    params: Mapping[str, Any] | None = None,
    inputs: Mapping[str, str] | None = None,
    shas: Mapping[str, str] | None = None,
    code_version: str = "",
    versions: Mapping[str, str] | None = None,
) -> Manifest:
    """Idempotent body of a step: reuse a published, verified result; else build in the staging dir and publish.

    `build(staging_dir)` writes the step's files and returns {"metrics": {...}, "extra": {...}} (both optional).
    """
    logger = run_logger()
    store = ctx.store()
    existing = store.lookup(step, key, ctx.verify)
    if existing is not None:
        logger.info("%s %s: already published at %s", step, key[:12], existing.location)
        return existing
    staging = store.staging_dir(step, key)
    started = time.time()
    info = dict(build(staging) or {})
    manifest = store.publish(
        step, key, staging, params=params, inputs=inputs, shas=shas, metrics=info.get("metrics"),
        extra=info.get("extra"), code_version=code_version, versions=versions, started=started,
    )  # fmt: skip
    logger.info("%s %s: published %d file(s), %.1f MB in %.1f s -> %s", step, key[:12], len(manifest.files),
                manifest.total_bytes / 1e6, manifest.duration_s, manifest.location)  # fmt: skip
    return manifest


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lower-case letters, digits and dashes only."""
    text = "-".join(parts).lower()
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return text[:200] or "artifact"


def publish_markdown(manifest: Manifest, title: str, *, label: str, metrics: Mapping[str, Any] | None = None,
                     notes: str = "") -> None:  # fmt: skip
    """A markdown artifact for one step: what it produced, where, how long, key metrics."""
    from prefect.artifacts import create_markdown_artifact

    lines = [
        f"# {title}",
        "",
        "| | |",
        "|---|---|",
        f"| step | `{manifest.step}` |",
        f"| key | `{manifest.key[:16]}` |",
        f"| location | `{manifest.location}` |",
        f"| files | {len(manifest.files)} ({manifest.total_bytes / 1e6:.2f} MB) |",
        f"| time | {manifest.duration_s:.1f} s |",
        f"| content hash | `{manifest.content_hash[:16]}` |",
    ]
    shown = dict(metrics if metrics is not None else manifest.metrics)
    if shown:
        lines += ["", "| metric | value |", "|---|---|"]
        for k, v in shown.items():
            lines.append(f"| {k} | {_fmt(v)} |")
    if notes:
        lines += ["", notes]
    try:
        create_markdown_artifact("\n".join(lines), key=artifact_key(manifest.step, label),
                                 description=f"{manifest.step}: {label}")  # fmt: skip
    except Exception as exc:  # an artifact is a report, never a reason to fail the step
        log.warning("could not publish the Prefect artifact for %s %s: %s", manifest.step, label, exc)


def publish_table(rows: list[dict[str, Any]], *, key: str, description: str) -> None:
    from prefect.artifacts import create_table_artifact

    try:
        create_table_artifact([{k: _fmt(v) for k, v in r.items()} for r in rows], key=artifact_key(key),
                              description=description)  # fmt: skip
    except Exception as exc:
        log.warning("could not publish the Prefect table artifact %s: %s", key, exc)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, dict | list):
        return json.dumps(v)[:200]
    return v
