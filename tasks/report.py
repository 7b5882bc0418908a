"""Step `report`: gather every result into a results folder and build report.md / report.html with plots
(mergealign.report); publish the main table and the markdown as Prefect artifacts."""

from __future__ import annotations

import json
import shutil
from typing import Any

from prefect import task
from pydantic import BaseModel, ConfigDict

from mergealign.artifacts import Manifest, atomic_write_text, library_versions, step_key
from tasks.common import ArtifactCachePolicy, StepContext, artifact_key, publish_table, run_logger, run_step

STEP = "report"
CODE_VERSION = "report-2"


class ReportModel(BaseModel):
    """One row of the report: a model, what it is, and the manifests of its results."""

    model_config = ConfigDict(frozen=True)

    name: str
    kind: str
    expert: str | None = None
    info: dict[str, Any] = {}
    model: Manifest | None = None
    safety: Manifest | None = None
    domain: Manifest | None = None


def _hash(m: Manifest | None) -> str | None:
    return m.content_hash if m is not None else None


def report_key(
    title: str, models: list[ReportModel], similarity: dict[str, Manifest], config: dict[str, Any]
) -> str:
    inputs = {}
    for r in models:
        for part in ("model", "safety", "domain"):
            h = _hash(getattr(r, part))
            if h:
                inputs[f"{r.name}/{part}"] = h
    inputs.update({f"similarity/{k}": m.content_hash for k, m in sorted(similarity.items())})
    rows = [{"name": r.name, "kind": r.kind, "expert": r.expert, "info": r.info} for r in models]
    return step_key(STEP, inputs=inputs, params={"title": title, "rows": rows, "config": config},
                    code_version=CODE_VERSION)  # fmt: skip


def _key(inputs: dict[str, Any]) -> str:
    return report_key(inputs["title"], inputs["models"], inputs["similarity"], inputs["config"])


def _read(store: Any, m: Manifest | None, name: str) -> Any:
    if m is None:
        return None
    return json.loads((store.local_dir(m) / name).read_text())


@task(name="report", cache_policy=ArtifactCachePolicy(step=STEP, key_fn=_key), task_run_name="report")
def report_task(ctx: StepContext, title: str, models: list[ReportModel], similarity: dict[str, Manifest],
                config: dict[str, Any], timings: list[dict[str, Any]] | None = None) -> Manifest:  # fmt: skip
    """Build the study report from the results of every model (tables, trade-off plot, per-layer plots)."""
    from mergealign.report import build_report

    logger = run_logger()
    store = ctx.store()
    key = report_key(title, models, similarity, config)

    def build(staging):
        results = staging / "results"
        if results.exists():
            shutil.rmtree(results)
        (results / "models").mkdir(parents=True)
        provenance: dict[str, Any] = {"inputs": {}, "artifacts": {}}
        for r in models:
            doc: dict[str, Any] = {"name": r.name, "kind": r.kind, "expert": r.expert, **r.info,
                                   "domain": _read(store, r.domain, "domain.json"),
                                   "safety": _read(store, r.safety, "safety.json")}  # fmt: skip
            atomic_write_text(results / "models" / f"{r.name}.json", json.dumps(doc, indent=1))
            if r.model is not None:
                provenance["inputs"][r.name] = r.model.shas.get("model") or r.model.content_hash
                provenance["artifacts"][r.name] = r.model.location
        for expert, m in similarity.items():
            d = results / "similarity" / expert
            d.mkdir(parents=True)
            shutil.copy2(store.local_dir(m) / "similarity.json", d / "similarity.json")
        run = {"name": title, "config": config, "models": [r.name for r in models], "provenance": provenance,
               "timings": timings or []}  # fmt: skip
        atomic_write_text(results / "run.json", json.dumps(run, indent=1, default=str))
        rep = build_report(results, staging / "report", title=title)
        logger.info("report: %d rows, %d plots, %d missing inputs -> %s", len(rep.rows), len(rep.plots),
                    len(rep.missing), rep.html)  # fmt: skip
        return {"metrics": {"rows": len(rep.rows), "plots": len(rep.plots), "missing": len(rep.missing)},
                "extra": {"markdown": "report/report.md", "html": "report/report.html"}}  # fmt: skip

    manifest = run_step(ctx, STEP, key, build, params={"title": title, "models": [r.name for r in models]},
                        code_version=CODE_VERSION, versions=library_versions(("mergealign", "matplotlib")))  # fmt: skip
    _publish(manifest, store, title)
    return manifest


def _publish(manifest: Manifest, store: Any, title: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    folder = store.local_dir(manifest) / "report"
    try:
        table = json.loads((folder / "report.json").read_text()).get("rows") or []
    except (OSError, ValueError):
        table = []
    if table:
        publish_table([{k: v for k, v in r.items() if not k.endswith("_stderr")} for r in table],
                      key=f"report-table-{title}", description=f"main table of study {title}")  # fmt: skip
    try:
        text = (folder / "report.md").read_text()
        text += f"\n\n---\nReport folder: `{folder}` (report.html embeds the plots)\n"
        create_markdown_artifact(
            text[:100_000], key=artifact_key("report", title), description=f"report of {title}"
        )
    except Exception as exc:
        run_logger().warning("could not publish the report artifact: %s", exc)
