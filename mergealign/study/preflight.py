"""The study's preflight: every (base, expert, aligned) trio checked by the engine's preflight, from headers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergealign.checkpoint import Checkpoint
from mergealign.errors import PreflightError
from mergealign.preflight import Input, preflight
from mergealign.study.refs import ModelRef


def check_trios(checkpoints: Mapping[str, Checkpoint]) -> dict[str, Any]:
    """Check base + aligned with each `expert:<name>`; raise PreflightError with every problem of every trio,
    else return a small report per model (architectures, tensors, vocabulary, bytes)."""
    problems: list[str] = []
    for label in sorted(k for k in checkpoints if ModelRef.parse(k).kind == "expert"):
        trio = [Input("base", checkpoints["base"]), Input(label, checkpoints[label]),
                Input("aligned", checkpoints["aligned"])]  # fmt: skip
        try:
            preflight(trio)
        except PreflightError as exc:
            problems += [f"{label}: {p}" for p in exc.problems]
    if problems:
        raise PreflightError(problems)
    return {label: {"architectures": ck.architectures, "tensors": len(ck.tensors), "vocab_size": ck.vocab_size,
                    "bytes": ck.total_bytes} for label, ck in checkpoints.items()}  # fmt: skip
