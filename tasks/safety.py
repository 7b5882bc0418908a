"""Step `safety`: safety metrics of one model over all its judged answers (% safe, % refusal, over-refusal,
unparseable, bootstrap 95% intervals; per prompt set and category)."""

from __future__ import annotations

from typing import Any

from prefect import task

from mergealign.artifacts import Manifest, library_versions, step_key
from mergealign.evaluation.safety import METRICS_VERSION, safety_metrics
from tasks.common import ArtifactCachePolicy, StepContext, publish_markdown, run_step

STEP = "safety"
CODE_VERSION = f"safety-1-{METRICS_VERSION}"
FILE = "safety.json"


def safety_key(judged: dict[str, Manifest]) -> str:
    return step_key(STEP, inputs={k: m.content_hash for k, m in sorted(judged.items())},
                    params={"n_bootstrap": 1000, "seed": 0}, code_version=CODE_VERSION)  # fmt: skip


def _key(inputs: dict[str, Any]) -> str:
    return safety_key(inputs["judged"])


@task(name="safety", cache_policy=ArtifactCachePolicy(step=STEP, key_fn=_key), task_run_name="safety-{label}")
def safety_task(ctx: StepContext, label: str, judged: dict[str, Manifest]) -> Manifest:
    """Metrics of every judged file of one model (keys: '<judge>/<prompt set>')."""
    store = ctx.store()
    key = safety_key(judged)

    def build(staging):
        paths = [store.local_dir(m) / "judged.jsonl" for _, m in sorted(judged.items())]
        doc = safety_metrics(paths, staging / FILE, n_bootstrap=1000, seed=0)
        metrics: dict[str, Any] = {}
        for name, j in doc.get("judges", {}).items():
            overall = j.get("overall") or {}
            for stat in ("safe_pct", "refusal_pct", "over_refusal_pct"):
                value = (
                    (overall.get(stat) or {}).get("value") if isinstance(overall.get(stat), dict) else None
                )
                if value is not None:
                    metrics[f"{name}:{stat}"] = value
        return {"metrics": metrics}

    manifest = run_step(ctx, STEP, key, build, params={"model": label, "files": sorted(judged)},
                        code_version=CODE_VERSION, versions=library_versions(("mergealign",)))  # fmt: skip
    publish_markdown(manifest, f"Safety of {label}", label=label)
    return manifest
