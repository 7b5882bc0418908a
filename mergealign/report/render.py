"""The report documents: report.md, report.html, table.csv and report.json from a results folder.

Outputs (REPORT_DIR, default RUN_DIR/report): report.md (images referenced as plots/*.png), report.html (images
embedded as base64: one file to mail around), plots/*.png, table.csv and report.json (rows, columns, missing
inputs; what the pipeline publishes as Prefect artifacts). Every file is written atomically.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from mergealign.files import atomic_write_text, json_safe
from mergealign.report.plots import (
    plot_cka,
    plot_contributions,
    plot_layers,
    plot_modules,
    plot_sweeps,
    plot_tradeoff,
)
from mergealign.report.results import load_results
from mergealign.report.tables import MISSING, Table, cell_text, contribution_rows, main_table, safety_label

log = logging.getLogger(__name__)

PACKAGES = (
    "mergealign",
    "torch",
    "transformers",
    "safetensors",
    "prefect",
    "lm_eval",
    "vllm",
    "numba",
    "matplotlib",
)


@dataclass
class Report:
    out_dir: Path
    markdown: Path
    html: Path
    table: Table
    plots: list[Path]
    missing: list[str]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.table.rows


class _Doc:
    """Blocks rendered both as markdown and as HTML."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Sequence[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", (list(columns), [list(r) for r in rows])))

    def img(self, path: Path, caption: str) -> None:
        self.blocks.append(("img", (path, caption)))

    def pre(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def markdown(self, rel_to: Path) -> str:
        out = []
        for kind, x in self.blocks:
            if kind == "h":
                out.append(f"{'#' * x[0]} {x[1]}\n")
            elif kind == "p":
                out.append(f"{x}\n")
            elif kind == "ul":
                out.append("\n".join(f"- {i}" for i in x) + "\n")
            elif kind == "table":
                cols, rows = x
                esc = [c.replace("|", "\\|") for c in cols]
                lines = ["| " + " | ".join(esc) + " |", "|" + "|".join("---" for _ in cols) + "|"]
                lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
                out.append("\n".join(lines) + "\n")
            elif kind == "img":
                out.append(f"![{x[1]}]({x[0].relative_to(rel_to).as_posix()})\n")
            elif kind == "pre":
                out.append(f"```\n{x}\n```\n")
        return "\n".join(out)

    def html(self, title: str, embed: bool, rel_to: Path) -> str:
        e = html.escape
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{e(title)}</title>",
            "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;}"
            "table{border-collapse:collapse;font-size:0.85em;margin:1em 0;}"
            "th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;}"
            "th{background:#f3f3f3;}td:first-child,th:first-child{text-align:left;}"
            "img{max-width:100%;}pre{background:#f6f6f6;padding:0.8em;overflow-x:auto;font-size:0.8em;}"
            "figure{margin:1em 0;}figcaption{font-size:0.85em;color:#555;}</style></head><body>",
        ]
        for kind, x in self.blocks:
            if kind == "h":
                parts.append(f"<h{x[0]}>{e(x[1])}</h{x[0]}>")
            elif kind == "p":
                parts.append(f"<p>{e(x)}</p>")
            elif kind == "ul":
                parts.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in x) + "</ul>")
            elif kind == "table":
                cols, rows = x
                head = "".join(f"<th>{e(c)}</th>" for c in cols)
                body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "img":
                path, caption = x
                if embed:
                    src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
                else:
                    src = path.relative_to(rel_to).as_posix()
                parts.append(
                    f'<figure><img src="{src}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>'
                )
            elif kind == "pre":
                parts.append(f"<pre>{e(x)}</pre>")
        parts.append("</body></html>")
        return "\n".join(parts)


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return MISSING
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            try:
                out[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
    return out


def _timings(run: Mapping[str, Any] | None) -> list[tuple[str, float | None]]:
    t = (run or {}).get("timings")
    if isinstance(t, Mapping):
        return [(str(k), v if isinstance(v, int | float) else None) for k, v in t.items()]
    if isinstance(t, list):
        out = []
        for item in t:
            if isinstance(item, Mapping):
                label = " / ".join(str(item[k]) for k in ("step", "key", "model") if item.get(k) is not None)
                out.append((label or "?", item.get("seconds")))
        return out
    return []


def build_report(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    embed_images: bool = True,
    title: str | None = None,
) -> Report:
    """Read RUN_DIR (layout: mergealign.report.results) and write the report folder; returns what was written."""
    res = load_results(run_dir)
    out = Path(out_dir) if out_dir is not None else res.run_dir / "report"
    plots_dir = out / "plots"
    out.mkdir(parents=True, exist_ok=True)
    run = res.run or {}
    name = title or str(run.get("name") or res.run_dir.name)
    table = main_table(res.models)
    contrib = contribution_rows(res.models)

    plots: list[tuple[Path, str]] = []

    def add(p: Path | None, caption: str) -> None:
        if p is not None:
            plots.append((p, caption))

    add(
        plot_tradeoff(res.models, plots_dir / "tradeoff.png"),
        "Domain score against safety, one point per model; the dashed line is the Pareto frontier.",
    )
    layer_plots = plot_layers(res.similarity, plots_dir / "layers_cos.png", plots_dir / "layers_norm.png")
    captions = ["cos(τ_D, τ_A) and the share of sign conflicts per layer.", "‖τ_D‖ and ‖τ_A‖ per layer."]
    for p, c in zip(layer_plots, captions, strict=False):
        add(p, c)
    add(plot_modules(res.similarity, plots_dir / "modules.png"), "Cosine and norms per module type.")
    add(plot_sweeps(res.models, plots_dir / "lambda_sweep.png"), "Domain score and safety along the λ sweep.")
    add(
        plot_contributions(contrib, plots_dir / "contributions.png"),
        "Each contribution variant against its full merge: what is lost when a vector is kept only in a part.",
    )
    add(plot_cka(res.cka, plots_dir / "cka.png"), "Linear CKA of hidden states per layer.")

    doc = _Doc()
    doc.h(1, f"MergeAlign study: {name}")
    # relative to the report: the pipeline builds both in a staging folder that is renamed when done
    source = os.path.relpath(res.run_dir.resolve(), out.resolve())
    doc.p(
        f"Generated {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')} from {source}. "
        f"{len(res.models)} models. Missing numbers are shown as {MISSING}."
    )
    if res.missing:
        doc.h(2, "Missing inputs")
        doc.p("These results were not found; the report shows everything else.")
        doc.ul(res.missing)
    doc.h(2, "Main table")
    doc.p(
        "Domain: accuracy in % (± standard error) per task and their mean. Safety: % of responses judged safe per "
        "prompt set; over-refusal: % of benign prompts refused. " + safety_label(res.models) + "."
    )
    doc.table(table.columns, [[cell_text(r, c) for c in table.columns] for r in table.rows])
    for p, caption in plots[:1]:
        doc.h(2, "Knowledge–safety trade-off")
        doc.img(p, caption)
    if res.similarity:
        doc.h(2, "Model similarity")
        sim_rows = []
        for lab, s in res.similarity.items():
            o = s.get("overall") or {}
            sim_rows.append(
                [
                    lab,
                    _fmt(o.get("norm_d")),
                    _fmt(o.get("norm_a")),
                    _fmt(o.get("cos_da")),
                    _fmt(o.get("sign_conflict")),
                    _fmt(o.get("ties_overlap")),
                    _fmt(o.get("cos_expert_aligned"), 6),
                ]
            )
        doc.table(
            [
                "expert",
                "‖τ_D‖",
                "‖τ_A‖",
                "cos(τ_D, τ_A)",
                "sign conflicts",
                "TIES overlap",
                "cos(θ_expert, θ_aligned)",
            ],
            sim_rows,
        )
        merged_rows = []
        for lab, s in res.similarity.items():
            for mlab, mm in ((s.get("overall") or {}).get("merged") or {}).items():
                merged_rows.append(
                    [
                        lab,
                        mlab,
                        _fmt(mm.get("cos_d")),
                        _fmt(mm.get("cos_a")),
                        _fmt(mm.get("coef_d")),
                        _fmt(mm.get("coef_a")),
                        _fmt(mm.get("share_d")),
                        _fmt(mm.get("share_a")),
                        _fmt(mm.get("share_residual")),
                    ]
                )
        if merged_rows:
            doc.p(
                "Merged models: δ = θ_merged − θ_base against the two vectors (least-squares coefficients and "
                "each vector's share of ‖δ‖²; the residual is what neither vector explains)."
            )
            doc.table(
                [
                    "expert",
                    "merged",
                    "cos(δ, τ_D)",
                    "cos(δ, τ_A)",
                    "c_D",
                    "c_A",
                    "share τ_D",
                    "share τ_A",
                    "residual",
                ],
                merged_rows,
            )
        for p, caption in plots:
            if p.name in ("layers_cos.png", "layers_norm.png", "modules.png"):
                doc.img(p, caption)
    for p, caption in plots:
        if p.name == "lambda_sweep.png":
            doc.h(2, "λ sweep")
            doc.img(p, caption)
    if contrib:
        doc.h(2, "Contribution analysis")
        doc.table(
            ["variant", "what it keeps", "compared with", "Δ domain", "Δ safety"],
            [
                [
                    r["variant"],
                    r["description"],
                    r["base"] or MISSING,
                    _fmt(r["Δ domain"]),
                    _fmt(r["Δ safety"]),
                ]
                for r in contrib
            ],
        )
        for p, caption in plots:
            if p.name == "contributions.png":
                doc.img(p, caption)
    for p, caption in plots:
        if p.name == "cka.png":
            doc.h(2, "Representation similarity (CKA)")
            doc.img(p, caption)

    doc.h(2, "Provenance")
    prov = run.get("provenance") or {}
    facts = []
    if prov.get("git_commit"):
        facts.append(f"mergealign commit: {prov['git_commit']}")
    for k, v in (prov.get("inputs") or {}).items():
        facts.append(f"input {k}: {v}")
    doc.ul(facts or [f"no provenance recorded in run.json {MISSING}"])
    versions = {**_package_versions(), **(prov.get("package_versions") or {})}
    doc.table(["package", "version"], [[k, str(v)] for k, v in sorted(versions.items())])
    timings = _timings(run)
    if timings:
        total = sum(t for _, t in timings if t is not None)
        doc.table(["step", "seconds"], [[s, _fmt(t, 4)] for s, t in timings] + [["total", _fmt(total, 4)]])
    else:
        doc.p(f"Timings per step: {MISSING} (not recorded in run.json)")
    if run.get("config") is not None:
        import yaml

        doc.h(3, "Run config")
        doc.pre(yaml.safe_dump(run["config"], sort_keys=False, allow_unicode=True).strip())

    md_path, html_path = out / "report.md", out / "report.html"
    atomic_write_text(md_path, doc.markdown(out))
    atomic_write_text(html_path, doc.html(f"MergeAlign study: {name}", embed_images, out))
    _write_csv(out / "table.csv", table)
    summary = {
        "name": name,
        "columns": table.columns,
        "rows": table.rows,
        "contributions": contrib,
        "missing": res.missing,
        "plots": [p.relative_to(out).as_posix() for p, _ in plots],
    }
    atomic_write_text(out / "report.json", json.dumps(json_safe(summary), indent=1, ensure_ascii=False))
    log.info("report of %d models, %d plots -> %s", len(res.models), len(plots), out)
    return Report(out, md_path, html_path, table, [p for p, _ in plots], res.missing)


def _write_csv(path: Path, table: Table) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(table.columns)
    for r in table.rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in table.columns])
    atomic_write_text(path, buf.getvalue())
