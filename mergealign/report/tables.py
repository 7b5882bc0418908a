"""The figures of a model and the report's tables: safety cells and score, the main table, contribution rows.

- domain: ``average.acc`` (×100) and each task's ``acc`` (×100), stderr shown as ±.
- safety per prompt set: ``safe_pct.value`` of the safety judge (every judge whose rows carry a verdict;
  a model judge such as llama-guard is preferred over keyword judges) per set; over-refusal per set:
  ``over_refusal_pct.value`` where the set has benign prompts (XSTest). The single "safety" score of the
  trade-off plot is the mean % safe over the harmful prompt sets of that judge (the % refusals of the refusal
  judge when no judge gives verdicts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergealign.report.results import ModelResult

MISSING = "—"
_KEYWORD_JUDGES = ("refusal", "keyword")


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
        for t in (m.domain or {}).get("tasks") or {}:
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


def cell_text(row: Mapping[str, Any], col: str) -> str:
    v = row.get(col)
    if v is None:
        return MISSING
    if isinstance(v, float):
        if col in ("λ_D", "λ_A"):
            return f"{v:g}"
        se = row.get(f"{col}_stderr")
        return f"{v:.2f} ± {se:.2f}" if se is not None else f"{v:.2f}"
    return str(v)


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
            base = next(
                (
                    b
                    for b in models
                    if v.get("base") and b.name.endswith(str(v["base"])) and b.expert == m.expert
                ),
                None,
            )
        if base is None:  # else: the full merge of the same expert with the same λs
            base = next(
                (
                    b
                    for b in models
                    if b.kind == "merge"
                    and not (b.variant or {}).get("part")
                    and b.expert == m.expert
                    and b.method in (None, m.method)
                    and b.lambda_domain == m.lambda_domain
                    and b.lambda_alignment == m.lambda_alignment
                ),
                None,
            )
        dd = ds = None
        if base is not None:
            if m.domain_avg is not None and base.domain_avg is not None:
                dd = m.domain_avg - base.domain_avg
            s_m, s_b = safety_score(m), safety_score(base)
            if s_m is not None and s_b is not None:
                ds = s_m - s_b
        rows.append(
            {
                "variant": m.name,
                "description": v.get("description") or "",
                "base": base.name if base else None,
                "Δ domain": dd,
                "Δ safety": ds,
            }
        )
    return rows
