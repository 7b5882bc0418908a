"""Step `report`: gather every result into a results folder and build report.md / report.html with plots
(mergealign.report); publish the main table and the markdown as Prefect artifacts.

It runs on whatever finished: a model whose merge, answers or scores failed is a row with its results
missing, and the report lists what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergealign.artifacts import Manifest
from mergealign.report import ModelFiles, build_report, write_results
from tasks.publish import artifact_key, publish_table
from tasks.steps import StepKind, StepRun, register


def _local(run: StepRun, m: Manifest | None, name: str) -> Path | None:
    return None if m is None else run.dir(m) / name


def _timings(run: StepRun) -> list[dict[str, Any]]:
    """How long each step this report reads took, in the order they ran."""
    found = [(name, m) for role in run.inputs for name, m in run.manifests(role).items() if m is not None]
    found.sort(key=lambda item: item[1].started_at)
    return [{"step": m.step, "label": name, "seconds": m.duration_s} for name, m in found]


def _build(run: StepRun, staging: Path) -> dict[str, Any]:
    params = run.step.params
    models, safety, domain = run.manifests("models"), run.manifests("safety"), run.manifests("domain")
    files = []
    for row in params["rows"]:
        model = models.get(row["model"])
        info = dict(row["info"])
        if model is not None and model.extra.get(
            "variant"
        ):  # a variant's part as resolved when it was merged
            info["variant"] = model.extra["variant"]
        files.append(ModelFiles(name=row["name"], kind=row["kind"], expert=row["expert"], info=info,
                                domain=_local(run, domain.get(row["model"]), "domain.json"),
                                safety=_local(run, safety.get(row["model"]), "safety.json"),
                                source=(model.shas.get("model") or model.content_hash) if model else None,
                                location=model.location if model else None))  # fmt: skip
    sims = {
        expert: _local(run, m, "similarity.json") for expert, m in run.manifests("similarity").items() if m
    }
    title = params["title"]
    results = write_results(staging / "results", files, sims, name=title, config=params["config"],
                            timings=_timings(run))  # fmt: skip
    rep = build_report(results, staging / "report", title=title)
    run.logger.info("report: %d rows, %d plots, %d missing inputs -> %s", len(rep.rows), len(rep.plots),
                    len(rep.missing), rep.html)  # fmt: skip
    return {"metrics": {"rows": len(rep.rows), "plots": len(rep.plots), "missing": len(rep.missing)},
            "extra": {"markdown": "report/report.md", "html": "report/report.html"}}  # fmt: skip


def _publish(manifest: Manifest, run: StepRun) -> None:
    from prefect.artifacts import create_markdown_artifact

    title = run.step.params["title"]
    folder = run.dir(manifest) / "report"
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
    except Exception as exc:  # an artifact is a report, never a reason to fail the step
        run.logger.warning("could not publish the report artifact: %s", exc)


REPORT = register(StepKind(
    "report", "report-3", build=_build, publish=_publish, tolerant=True,
    manifest_params=lambda step: {"title": step.params["title"], "models": [r["name"] for r in step.params["rows"]]},
    versions=("mergealign", "matplotlib"),
))  # fmt: skip
