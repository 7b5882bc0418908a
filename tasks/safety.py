"""Step `safety`: safety metrics of one model over all its judged answers (% safe, % refusal, over-refusal,
unparseable, bootstrap 95% intervals; per prompt set and category)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergealign.evaluation.safety import METRICS_VERSION, safety_metrics
from tasks.steps import StepKind, StepRun, register

FILE = "safety.json"


def _build(run: StepRun, staging: Path) -> dict[str, Any]:
    judged = run.manifests("judged")
    paths = [run.dir(m) / "judged.jsonl" for _, m in sorted(judged.items())]
    doc = safety_metrics(paths, staging / FILE, n_bootstrap=run.step.params["n_bootstrap"],
                         seed=run.step.params["seed"])  # fmt: skip
    metrics: dict[str, Any] = {}
    for name, j in doc.get("judges", {}).items():
        overall = j.get("overall") or {}
        for stat in ("safe_pct", "refusal_pct", "over_refusal_pct"):
            value = overall.get(stat)
            if isinstance(value, dict) and value.get("value") is not None:
                metrics[f"{name}:{stat}"] = value["value"]
    return {"metrics": metrics}


SAFETY = register(StepKind(
    "safety", f"safety-1-{METRICS_VERSION}", build=_build, title=lambda step: f"Safety of {step.name}",
    manifest_params=lambda step: {"model": step.name, "files": sorted(step.inputs["judged"])},
))  # fmt: skip
