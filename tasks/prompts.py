"""Step `prompts`: a prompt set resolved (named set or local file), sampled with a seed, as canonical JSONL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergealign.datasets import PromptSetSpec, write_prompt_set
from mergealign.files import sha256_file
from mergealign.study.config import PromptSetEntry
from mergealign.study.plan import Step
from tasks.context import StepContext
from tasks.steps import Pins, StepKind, StepRun, register

FILE = "prompts.jsonl"


def _entry(step: Step) -> PromptSetEntry:
    return PromptSetEntry.model_validate(step.info["entry"])


def _pin(ctx: StepContext, step: Step, memo: dict[str, Any]) -> Pins:
    path = _entry(step).path
    return Pins(shas={"file": sha256_file(path)} if path else {})


def _build(run: StepRun, staging: Path) -> dict[str, Any]:
    entry = _entry(run.step)
    summary = write_prompt_set(
        PromptSetSpec(**entry.spec_fields()), staging / FILE, n=entry.n, seed=entry.seed
    )
    return {"metrics": {"prompts": summary.n_written, "available": summary.n_available},
            "extra": {"source": summary.source, "categories": summary.categories}}  # fmt: skip


PROMPTS = register(StepKind(
    "prompts", "prompts-1", build=_build, pin=_pin, title=lambda step: f"Prompt set {step.name}",
    manifest_params=lambda step: {"label": step.name, **step.info["entry"]}, versions=("mergealign", "datasets"),
))  # fmt: skip
