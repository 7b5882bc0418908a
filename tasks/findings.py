"""Step `findings` (demo studies): what the numbers show, in plain words (mergealign.demo.findings), from the
report step's own result files, never written by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergealign.artifacts import Manifest
from mergealign.demo.findings import write_findings
from tasks.publish import publish_markdown
from tasks.steps import StepKind, StepRun, register


def _build(run: StepRun, staging: Path) -> dict[str, Any]:
    return write_findings(run.dir("report"), staging, **run.step.params)


def _publish(manifest: Manifest, run: StepRun) -> None:
    text = (run.dir(manifest) / "findings.md").read_text()
    publish_markdown(manifest, "What the demo shows", label="demo", notes=text)


FINDINGS = register(StepKind("findings", "demo-findings-2", build=_build, publish=_publish,
                             manifest_params=lambda step: dict(step.params)))  # fmt: skip
