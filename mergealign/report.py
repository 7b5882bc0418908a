"""The study report: report.md + report.html (self-contained) + PNG plots, from a results folder.

Results folder layout (written by the pipeline; every file optional — what is missing is listed in the report,
and everything else still renders):

    RUN_DIR/
      run.json                 {"name": str,
                                "config": {...} (the run config as loaded),
                                "models": [name, ...] (every model the study should evaluate, in order),
                                "provenance": {"git_commit": str, "inputs": {model: commit sha or content hash},
                                               "package_versions": {package: version}},
                                "timings": {step: seconds} or [{"step", "seconds", ...}, ...]}
      models/<name>.json       one per model:
                               {"name": str,
                                "kind": "base" | "aligned" | "expert" | "merge" | "variant",
                                "method": str, "expert": str (which expert a merge / variant derives from),
                                "lambda": float, "lambda_domain": float, "lambda_alignment": float,
                                "variant": Variant.describe() of mergealign.contributions (variants only),
                                "domain": the JSON of mergealign.evaluation.domain.evaluate_domain, or a path to it
                                          (relative to this file), or null,
                                "safety": the JSON of mergealign.evaluation.safety.safety_metrics, or a path, or null}
      similarity/<expert>/similarity.json   output of mergealign.similarity (one per expert; a single
                                            similarity/similarity.json is labelled by its merged models' expert)
      cka/<anything>.json      output of mergealign.cka (optional)

Figures taken from the result files:
- domain: ``average.acc`` (×100) and each task's ``acc`` (×100), stderr shown as ±.
- safety per prompt set: ``safe_pct.value`` of the safety judge (every judge whose rows carry a verdict;
  a model judge such as llama-guard is preferred over keyword judges) per set; over-refusal per set:
  ``over_refusal_pct.value`` where the set has benign prompts (XSTest). The single "safety" score of the
  trade-off plot is the mean % safe over the harmful prompt sets of that judge (the % refusals of the refusal
  judge when no judge gives verdicts).

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
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from mergealign.errors import MergeAlignError

log = logging.getLogger(__name__)

KIND_ORDER = ("base", "aligned", "expert", "merge", "variant")
KIND_COLORS = {"base": "#7f7f7f", "aligned": "#2ca02c", "expert": "#1f77b4", "merge": "#d62728", "variant": "#9467bd"}
MISSING = "—"
PACKAGES = ("mergealign", "torch", "transformers", "safetensors", "prefect", "lm_eval", "vllm", "numba", "matplotlib")
_KEYWORD_JUDGES = ("refusal", "keyword")


# --------------------------------------------------------------------------- reading
@dataclass
class ModelResult:
    """One row of the main table."""

    name: str
    kind: str = "merge"
    method: str | None = None
    expert: str | None = None
    lambda_domain: float | None = None
    lambda_alignment: float | None = None
    variant: dict[str, Any] | None = None
    domain: dict[str, Any] | None = None
    safety: dict[str, Any] | None = None
    source: Path | None = None

    @property
    def domain_avg(self) -> float | None:
        acc = ((self.domain or {}).get("average") or {}).get("acc")
        return None if acc is None else 100.0 * acc

    @property
    def domain_avg_stderr(self) -> float | None:
        se = ((self.domain or {}).get("average") or {}).get("acc_stderr")
        return None if se is None else 100.0 * se

    def task_acc(self, task: str) -> tuple[float | None, float | None]:
        t = ((self.domain or {}).get("tasks") or {}).get(task) or {}
        acc, se = t.get("acc"), t.get("acc_stderr")
        return (None if acc is None else 100 * acc, None if se is None else 100 * se)

    @property
    def lam(self) -> float | None:
        """λ of an interp merge (λ_D with λ_A = 1 − λ_D), else None."""
        if self.lambda_domain is None or self.lambda_alignment is None:
            return None
        return self.lambda_domain if abs(self.lambda_domain + self.lambda_alignment - 1) < 1e-9 else None


@dataclass
class RunResults:
    run_dir: Path
    run: dict[str, Any] | None
    models: list[ModelResult]
    similarity: dict[str, dict[str, Any]]  # expert label -> similarity.json
    cka: list[dict[str, Any]]
    missing: list[str] = field(default_factory=list)


def _read_json(path: Path, missing: list[str], what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        missing.append(f"{what}: {path} not found")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        missing.append(f"{what}: {path} is not valid JSON ({exc})")
    return None


def _section(value: Any, base: Path, missing: list[str], what: str) -> dict[str, Any] | None:
    """A result section given inline, as a path to its JSON file, or null."""
    if value is None:
        missing.append(f"{what}: no results")
        return None
    if isinstance(value, str):
        p = Path(value)
        return _read_json(p if p.is_absolute() else base / p, missing, what)
    if isinstance(value, Mapping):
        return dict(value)
    missing.append(f"{what}: unreadable value {value!r}")
    return None


def _lambdas(doc: Mapping[str, Any]) -> tuple[float | None, float | None]:
    lam_d, lam_a = doc.get("lambda_domain"), doc.get("lambda_alignment")
    if lam_d is None and doc.get("lambda") is not None and doc.get("method") in (None, "mergealign"):
        lam_d, lam_a = float(doc["lambda"]), 1.0 - float(doc["lambda"])
    return lam_d, lam_a


def load_results(run_dir: str | os.PathLike[str]) -> RunResults:
    """Read a results folder (layout: module docstring); unreadable or absent files go to ``missing``."""
    root = Path(run_dir)
    if not root.is_dir():
        raise MergeAlignError(f"{root}: results folder not found")
    missing: list[str] = []
    run = _read_json(root / "run.json", missing, "run.json (config, expected models, provenance)")
    models: list[ModelResult] = []
    mdir = root / "models"
    files = sorted(mdir.glob("*.json")) if mdir.is_dir() else []
    by_name: dict[str, ModelResult] = {}
    for f in files:
        doc = _read_json(f, missing, f"models/{f.name}")
        if not isinstance(doc, Mapping):
            continue
        name = str(doc.get("name") or f.stem)
        lam_d, lam_a = _lambdas(doc)
        m = ModelResult(
            name=name,
            kind=str(doc.get("kind") or "merge"),
            method=doc.get("method"),
            expert=doc.get("expert"),
            lambda_domain=lam_d,
            lambda_alignment=lam_a,
            variant=doc.get("variant"),
            domain=_section(doc.get("domain"), f.parent, missing, f"{name}: domain evaluation"),
            safety=_section(doc.get("safety"), f.parent, missing, f"{name}: safety evaluation"),
            source=f,
        )
        by_name[name] = m
    expected = [str(n) for n in (run or {}).get("models") or []]
    for name in expected:
        if name not in by_name:
            missing.append(f"{name}: models/{name}.json not found (no results for this model)")
            by_name[name] = ModelResult(name=name, kind=_guess_kind(name))
    order = {n: i for i, n in enumerate(expected)}
    models = sorted(
        by_name.values(),
        key=lambda m: (
            KIND_ORDER.index(m.kind) if m.kind in KIND_ORDER else len(KIND_ORDER),
            order.get(m.name, len(order)),
            m.expert or "",
            m.method or "",
            m.lambda_domain if m.lambda_domain is not None else -1.0,
            m.name,
        ),
    )
    if not models:
        missing.append(f"models/: no model results in {mdir}")
    similarity: dict[str, dict[str, Any]] = {}
    sdir = root / "similarity"
    for f in sorted(sdir.rglob("similarity.json")) if sdir.is_dir() else []:
        doc = _read_json(f, missing, f"similarity/{f.relative_to(sdir)}")
        if isinstance(doc, Mapping):
            label = f.parent.name if f.parent != sdir else _similarity_label(doc, models)
            similarity[label] = dict(doc)
    if not similarity:
        missing.append("similarity/: no similarity.json (per-layer plots of τ_D and τ_A skipped)")
    cka: list[dict[str, Any]] = []
    cdir = root / "cka"
    for f in sorted(cdir.glob("*.json")) if cdir.is_dir() else []:
        doc = _read_json(f, missing, f"cka/{f.name}")
        if isinstance(doc, Mapping):
            cka.append(dict(doc))
    return RunResults(root, run if isinstance(run, Mapping) else None, models, similarity, cka, missing)


def _guess_kind(name: str) -> str:
    for kind in ("base", "aligned", "expert", "variant"):
        if name == kind or name.startswith(f"{kind}:") or name.endswith(f"-{kind}"):
            return kind
    return "variant" if "@" in name else "merge"


def _similarity_label(doc: Mapping[str, Any], models: Sequence[ModelResult]) -> str:
    experts = {m.expert for m in models if m.expert}
    return next(iter(experts)) if len(experts) == 1 else "similarity"


# --------------------------------------------------------------------------- figures of a model
def _judges(safety: Mapping[str, Any] | None) -> dict[str, Any]:
    return dict((safety or {}).get("judges") or {})


def primary_judge(safety: Mapping[str, Any] | None) -> str | None:
    """The judge whose verdicts define % safe: a judge with verdicts, model judges before keyword judges."""
    judges = _judges(safety)
    with_verdicts = [j for j, d in judges.items() if _has_verdicts(d)]
    if not with_verdicts:
        return None
    model_judges = [j for j in with_verdicts if not any(k in j.lower() for k in _KEYWORD_JUDGES)]
    return sorted(model_judges or with_verdicts)[0]


def _has_verdicts(judge_doc: Mapping[str, Any]) -> bool:
    return any(((s.get("overall") or {}).get("safe_pct")) for s in (judge_doc.get("sets") or {}).values())


def _pct(stat: Mapping[str, Any] | None) -> float | None:
    if not stat:
        return None
    v = stat.get("value")
    return None if v is None else float(v)


def safety_cells(m: ModelResult) -> dict[str, float | None]:
    """{"safe % SET": value, "over-refusal % SET": value} for the model's prompt sets."""
    out: dict[str, float | None] = {}
    judges = _judges(m.safety)
    pj = primary_judge(m.safety)
    if pj is not None:
        for set_name, s in sorted((judges[pj].get("sets") or {}).items()):
            o = s.get("overall") or {}
            if o.get("refusal_pct") is None and o.get("over_refusal_pct") is not None:
                continue  # benign prompts only (XSTest safe): over-refusal is its figure
            val = _pct(o.get("safe_pct"))
            if val is not None:
                out[f"safe % {set_name}"] = val
    names = sorted(judges, key=lambda j: (not any(k in j.lower() for k in _KEYWORD_JUDGES), j))
    for j in names:  # the refusal judge first: it is the over-refusal signal of record
        for set_name, s in sorted((judges[j].get("sets") or {}).items()):
            val = _pct((s.get("overall") or {}).get("over_refusal_pct"))
            key = f"over-refusal % {set_name}"
            if val is not None and key not in out:
                out[key] = val
    return out


def safety_score(m: ModelResult) -> float | None:
    """Mean % safe over prompt sets with harmful prompts (primary judge), else mean % refusal of harmful ones."""
    judges = _judges(m.safety)
    pj = primary_judge(m.safety)
    vals: list[float] = []
    if pj is not None:
        for s in (judges[pj].get("sets") or {}).values():
            o = s.get("overall") or {}
            if o.get("refusal_pct") is not None or o.get("over_refusal_pct") is None:
                v = _pct(o.get("safe_pct"))
                if v is not None:
                    vals.append(v)
    else:
        for d in judges.values():
            for s in (d.get("sets") or {}).values():
                v = _pct((s.get("overall") or {}).get("refusal_pct"))
                if v is not None:
                    vals.append(v)
    return sum(vals) / len(vals) if vals else None


def safety_label(models: Sequence[ModelResult]) -> str:
    judges = {primary_judge(m.safety) for m in models if m.safety}
    judges.discard(None)
    if judges:
        return f"safety: % safe ({', '.join(sorted(j for j in judges if j))}), mean over harmful prompt sets"
    return "safety: % refusals on harmful prompts"


# --------------------------------------------------------------------------- the table
@dataclass
class Table:
    columns: list[str]
    rows: list[dict[str, Any]]  # column -> value (number, str or None); "_stderr" keys for ± parts


def main_table(models: Sequence[ModelResult]) -> Table:
    tasks: list[str] = []
    safety_cols: list[str] = []
    for m in models:
        for t in ((m.domain or {}).get("tasks") or {}):
            if t not in tasks:
                tasks.append(t)
        for c in safety_cells(m):
            if c not in safety_cols:
                safety_cols.append(c)
    safety_cols.sort(key=lambda c: (c.startswith("over-refusal"), c))
    columns = ["model", "kind", "method", "λ_D", "λ_A", "domain avg", *tasks, *safety_cols, "safety score"]
    rows = []
    for m in models:
        row: dict[str, Any] = {
            "model": m.name,
            "kind": m.kind,
            "method": m.method,
            "λ_D": m.lambda_domain,
            "λ_A": m.lambda_alignment,
            "domain avg": m.domain_avg,
            "domain avg_stderr": m.domain_avg_stderr,
            "safety score": safety_score(m),
        }
        for t in tasks:
            row[t], row[f"{t}_stderr"] = m.task_acc(t)
        cells = safety_cells(m)
        for c in safety_cols:
            row[c] = cells.get(c)
        rows.append(row)
    return Table(columns, rows)


def _cell(row: Mapping[str, Any], col: str) -> str:
    v = row.get(col)
    if v is None:
        return MISSING
    if isinstance(v, float):
        if col in ("λ_D", "λ_A"):
            return f"{v:g}"
        se = row.get(f"{col}_stderr")
        return f"{v:.2f} ± {se:.2f}" if se is not None else f"{v:.2f}"
    return str(v)


# --------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (x, y), both maximised, sorted by x."""
    front = []
    for p in points:
        dominated = any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)
        if not dominated and p not in front:
            front.append(p)
    return sorted(front)


def plot_tradeoff(models: Sequence[ModelResult], path: Path) -> Path | None:
    pts = [(m, m.domain_avg, safety_score(m)) for m in models]
    pts = [(m, x, y) for m, x, y in pts if x is not None and y is not None]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for kind in KIND_ORDER:
        sel = [(m, x, y) for m, x, y in pts if m.kind == kind]
        if sel:
            ax.scatter([x for _, x, _ in sel], [y for _, _, y in sel], s=48, color=KIND_COLORS[kind], label=kind,
                       zorder=3, edgecolor="black", linewidth=0.5)
    # One label per distinct point (merges that coincide, e.g. linear and SLERP of near-parallel vectors, share
    # it), without the expert prefix every merge name starts with, and on the left side near the right edge.
    groups: dict[tuple[float, float], list[str]] = {}
    for m, x, y in pts:
        groups.setdefault((round(x, 6), round(y, 6)), []).append(m.name)
    names = [m.name for m, _, _ in pts if m.kind in ("merge", "variant")]
    head = os.path.commonprefix(names).rpartition("-")[0] if len(names) > 1 else ""
    prefix = f"{head}-" if head else ""
    x_lo, x_hi = min(x for _, x, _ in pts), max(x for _, x, _ in pts)
    labels = []
    for (x, y), members in groups.items():
        label = ", ".join(n[len(prefix) :] if prefix and n.startswith(prefix) else n for n in members)
        right = x_hi > x_lo and (x - x_lo) / (x_hi - x_lo) > 0.6
        labels.append(ax.annotate(label, (x, y), textcoords="offset points", xytext=(-4 if right else 4, 4),
                                  fontsize=7, ha="right" if right else "left"))  # fmt: skip
    _unstack(fig, labels)
    front = pareto_front([(x, y) for _, x, y in pts])
    if len(front) >= 1:
        xs = [p[0] for p in front]
        ys = [p[1] for p in front]
        ax.step(xs, ys, where="post", color="black", linestyle="--", linewidth=1, label="Pareto frontier", zorder=2)
    ax.set_xlabel("domain score: mean accuracy over tasks (%)")
    ax.set_ylabel(safety_label([m for m, _, _ in pts]).split(",")[0] + " (%)")
    ax.set_title("Knowledge–safety trade-off (up and right is better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def _unstack(fig: Any, labels: list[Any], tries: int = 6) -> None:
    """Move a label up, one line at a time, while it overlaps a label placed before it."""
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for label in labels:
        for _ in range(tries):
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
            dx, dy = label.xyann
            label.xyann = (dx, dy + 9)
        placed.append(label.get_window_extent(renderer))


def plot_layers(similarity: Mapping[str, Mapping[str, Any]], path_cos: Path, path_norm: Path) -> list[Path]:
    series = {lab: doc.get("by_layer") or [] for lab, doc in similarity.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return []
    plt = _plt()
    out = []
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for lab, rows in series.items():
        xs = [r["layer"] for r in rows]
        ys = [r.get("cos_da") for r in rows]
        ax.plot(xs, [math.nan if y is None else y for y in ys], marker="o", markersize=3, label=f"cos(τ_D, τ_A) {lab}")
        sc = [r.get("sign_conflict") for r in rows]
        ax.plot(xs, [math.nan if y is None else y for y in sc], linestyle=":", label=f"sign-conflict share {lab}")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine / share")
    ax.set_title("Domain vs alignment vector per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out.append(_save(fig, path_cos))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for lab, rows in series.items():
        xs = [r["layer"] for r in rows]
        ax.plot(xs, [r.get("norm_d") for r in rows], marker="o", markersize=3, label=f"‖τ_D‖ {lab}")
        ax.plot(xs, [r.get("norm_a") for r in rows], marker="s", markersize=3, label=f"‖τ_A‖ {lab}")
    ax.set_xlabel("layer")
    ax.set_ylabel("L2 norm")
    ax.set_title("Norms of the task vectors per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out.append(_save(fig, path_norm))
    return out


def plot_modules(similarity: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    series = {lab: doc.get("by_module") or [] for lab, doc in similarity.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    width = 0.8 / len(series)
    for i, (lab, rows) in enumerate(series.items()):
        mods = [r["module"] for r in rows]
        xs = [j + i * width for j in range(len(mods))]
        axes[0].bar(xs, [r.get("cos_da") or 0.0 for r in rows], width, label=lab)
        axes[1].bar(xs, [r.get("norm_d") or 0.0 for r in rows], width / 2,
                    label=f"‖τ_D‖ {lab}")
        axes[1].bar([x + width / 2 for x in xs], [r.get("norm_a") or 0.0 for r in rows], width / 2,
                    label=f"‖τ_A‖ {lab}")
        for ax in axes:
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(mods))], mods, rotation=45, ha="right", fontsize=8)
    axes[0].set_ylabel("cos(τ_D, τ_A)")
    axes[0].set_title("Cosine per module type")
    axes[1].set_ylabel("L2 norm")
    axes[1].set_title("Norms per module type")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def sweep_groups(models: Sequence[ModelResult]) -> dict[str, list[ModelResult]]:
    """Interp merges (λ_D + λ_A = 1, no scope) per (expert, method), with at least two λ values."""
    groups: dict[str, list[ModelResult]] = {}
    for m in models:
        if m.kind not in ("merge", "variant") or m.lam is None or (m.variant or {}).get("part"):
            continue
        key = f"{m.expert or 'expert'} · {m.method or 'mergealign'}"
        groups.setdefault(key, []).append(m)
    return {k: sorted(v, key=lambda m: m.lam or 0.0) for k, v in groups.items() if len({m.lam for m in v}) >= 2}


def plot_sweeps(models: Sequence[ModelResult], path: Path) -> Path | None:
    groups = sweep_groups(models)
    groups = {k: [m for m in v if m.domain_avg is not None or safety_score(m) is not None] for k, v in groups.items()}
    groups = {k: v for k, v in groups.items() if v}
    if not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key, ms in groups.items():
        xs = [m.lam for m in ms]
        dom = [m.domain_avg for m in ms]
        saf = [safety_score(m) for m in ms]
        ax.plot(xs, [math.nan if v is None else v for v in dom], marker="o", label=f"domain score — {key}")
        ax.plot(xs, [math.nan if v is None else v for v in saf], marker="s", linestyle="--", label=f"safety — {key}")
    ax.set_xlabel("λ (λ_D = λ, λ_A = 1 − λ; 0 = aligned model, 1 = expert)")
    ax.set_ylabel("score (%)")
    ax.set_title("λ sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def contribution_rows(models: Sequence[ModelResult]) -> list[dict[str, Any]]:
    """Each scope variant against its base merge: Δ domain and Δ safety (variant − base)."""
    by_name = {m.name: m for m in models}
    rows = []
    for m in models:
        v = m.variant or {}
        if not v.get("part"):
            continue
        base = by_name.get(str(v.get("base"))) if v.get("base") else None
        if base is None:  # a pipeline may prefix names with the expert: match on the suffix
            base = next((b for b in models if v.get("base") and b.name.endswith(str(v["base"]))
                         and b.expert == m.expert), None)
        if base is None:  # else: the full merge of the same expert with the same λs
            base = next((b for b in models if b.kind == "merge" and not (b.variant or {}).get("part")
                         and b.expert == m.expert and b.method in (None, "mergealign")
                         and b.lambda_domain == m.lambda_domain and b.lambda_alignment == m.lambda_alignment), None)
        dd = ds = None
        if base is not None:
            if m.domain_avg is not None and base.domain_avg is not None:
                dd = m.domain_avg - base.domain_avg
            s_m, s_b = safety_score(m), safety_score(base)
            if s_m is not None and s_b is not None:
                ds = s_m - s_b
        rows.append({"variant": m.name, "description": v.get("description") or "", "base": base.name if base else None,
                     "Δ domain": dd, "Δ safety": ds})
    return rows


def plot_contributions(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    rows = [r for r in rows if r["Δ domain"] is not None or r["Δ safety"] is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.8))
    ys = list(range(len(rows)))
    ax.barh([y - 0.2 for y in ys], [r["Δ domain"] or 0.0 for r in rows], 0.4, label="Δ domain score", color="#1f77b4")
    ax.barh([y + 0.2 for y in ys], [r["Δ safety"] or 0.0 for r in rows], 0.4, label="Δ safety", color="#d62728")
    ax.set_yticks(ys, [r["variant"] for r in rows], fontsize=7)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("change vs the full merge (percentage points)")
    ax.set_title("Contribution variants: where each vector's effect lives")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_cka(cka: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    pairs = [(p, doc) for doc in cka for p in doc.get("pairs") or []]
    if not pairs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for p, _ in pairs:
        ys = p.get("cka") or []
        ax.plot(range(len(ys)), [math.nan if y is None else y for y in ys], marker="o", markersize=3,
                label=f"{p.get('a')} vs {p.get('b')}")
    ax.set_xlabel("hidden-state layer (0 = embeddings)")
    ax.set_ylabel("linear CKA")
    ax.set_ylim(0, 1.02)
    ax.set_title("Representation similarity per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    _atomic_bytes(path, buf.getvalue())
    return path


# --------------------------------------------------------------------------- documents
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
                parts.append(f'<figure><img src="{src}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>')
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
    """Read RUN_DIR (layout: module docstring) and write the report folder; returns what was written."""
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

    add(plot_tradeoff(res.models, plots_dir / "tradeoff.png"),
        "Domain score against safety, one point per model; the dashed line is the Pareto frontier.")
    layer_plots = plot_layers(res.similarity, plots_dir / "layers_cos.png", plots_dir / "layers_norm.png")
    captions = ["cos(τ_D, τ_A) and the share of sign conflicts per layer.", "‖τ_D‖ and ‖τ_A‖ per layer."]
    for p, c in zip(layer_plots, captions, strict=False):
        add(p, c)
    add(plot_modules(res.similarity, plots_dir / "modules.png"), "Cosine and norms per module type.")
    add(plot_sweeps(res.models, plots_dir / "lambda_sweep.png"), "Domain score and safety along the λ sweep.")
    add(plot_contributions(contrib, plots_dir / "contributions.png"),
        "Each contribution variant against its full merge: what is lost when a vector is kept only in a part.")
    add(plot_cka(res.cka, plots_dir / "cka.png"), "Linear CKA of hidden states per layer.")

    doc = _Doc()
    doc.h(1, f"MergeAlign study: {name}")
    # relative to the report: the pipeline builds both in a staging folder that is renamed when done
    source = os.path.relpath(res.run_dir.resolve(), out.resolve())
    doc.p(f"Generated {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')} from {source}. "
          f"{len(res.models)} models. Missing numbers are shown as {MISSING}.")
    if res.missing:
        doc.h(2, "Missing inputs")
        doc.p("These results were not found; the report shows everything else.")
        doc.ul(res.missing)
    doc.h(2, "Main table")
    doc.p("Domain: accuracy in % (± standard error) per task and their mean. Safety: % of responses judged safe per "
          "prompt set; over-refusal: % of benign prompts refused. " + safety_label(res.models) + ".")
    doc.table(table.columns, [[_cell(r, c) for c in table.columns] for r in table.rows])
    for p, caption in plots[:1]:
        doc.h(2, "Knowledge–safety trade-off")
        doc.img(p, caption)
    if res.similarity:
        doc.h(2, "Model similarity")
        sim_rows = []
        for lab, s in res.similarity.items():
            o = s.get("overall") or {}
            sim_rows.append([lab, _fmt(o.get("norm_d")), _fmt(o.get("norm_a")), _fmt(o.get("cos_da")),
                             _fmt(o.get("sign_conflict")), _fmt(o.get("ties_overlap")),
                             _fmt(o.get("cos_expert_aligned"), 6)])
        doc.table(["expert", "‖τ_D‖", "‖τ_A‖", "cos(τ_D, τ_A)", "sign conflicts", "TIES overlap",
                   "cos(θ_expert, θ_aligned)"], sim_rows)
        merged_rows = []
        for lab, s in res.similarity.items():
            for mlab, mm in ((s.get("overall") or {}).get("merged") or {}).items():
                merged_rows.append([lab, mlab, _fmt(mm.get("cos_d")), _fmt(mm.get("cos_a")), _fmt(mm.get("coef_d")),
                                    _fmt(mm.get("coef_a")), _fmt(mm.get("share_d")), _fmt(mm.get("share_a")),
                                    _fmt(mm.get("share_residual"))])
        if merged_rows:
            doc.p("Merged models: δ = θ_merged − θ_base against the two vectors (least-squares coefficients and "
                  "each vector's share of ‖δ‖²; the residual is what neither vector explains).")
            doc.table(["expert", "merged", "cos(δ, τ_D)", "cos(δ, τ_A)", "c_D", "c_A", "share τ_D", "share τ_A",
                       "residual"], merged_rows)
        for p, caption in plots:
            if p.name in ("layers_cos.png", "layers_norm.png", "modules.png"):
                doc.img(p, caption)
    for p, caption in plots:
        if p.name == "lambda_sweep.png":
            doc.h(2, "λ sweep")
            doc.img(p, caption)
    if contrib:
        doc.h(2, "Contribution analysis")
        doc.table(["variant", "what it keeps", "compared with", "Δ domain", "Δ safety"],
                  [[r["variant"], r["description"], r["base"] or MISSING, _fmt(r["Δ domain"]), _fmt(r["Δ safety"])]
                   for r in contrib])
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
    _atomic_text(md_path, doc.markdown(out))
    _atomic_text(html_path, doc.html(f"MergeAlign study: {name}", embed_images, out))
    _write_csv(out / "table.csv", table)
    summary = {
        "name": name,
        "columns": table.columns,
        "rows": table.rows,
        "contributions": contrib,
        "missing": res.missing,
        "plots": [p.relative_to(out).as_posix() for p, _ in plots],
    }
    _atomic_text(out / "report.json", json.dumps(_json_safe(summary), indent=1, ensure_ascii=False))
    log.info("report of %d models, %d plots -> %s", len(res.models), len(plots), out)
    return Report(out, md_path, html_path, table, [p for p, _ in plots], res.missing)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _write_csv(path: Path, table: Table) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(table.columns)
    for r in table.rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in table.columns])
    _atomic_text(path, buf.getvalue())


def _atomic_text(path: Path, text: str) -> None:
    _atomic_bytes(path, text.encode("utf-8"))


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__: list[str] = [
    "Report",
    "RunResults",
    "ModelResult",
    "Table",
    "build_report",
    "load_results",
    "main_table",
    "pareto_front",
    "primary_judge",
    "safety_cells",
    "safety_score",
]
