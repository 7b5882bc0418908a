"""The report's PNG plots (matplotlib, Agg backend; imported on first use) and the Pareto front."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergealign.files import atomic_write_bytes
from mergealign.report.results import KIND_ORDER, ModelResult
from mergealign.report.tables import safety_label, safety_score

KIND_COLORS = {
    "base": "#7f7f7f",
    "aligned": "#2ca02c",
    "expert": "#1f77b4",
    "merge": "#d62728",
    "variant": "#9467bd",
}


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
            ax.scatter(
                [x for _, x, _ in sel],
                [y for _, _, y in sel],
                s=48,
                color=KIND_COLORS[kind],
                label=kind,
                zorder=3,
                edgecolor="black",
                linewidth=0.5,
            )
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
        ax.step(
            xs,
            ys,
            where="post",
            color="black",
            linestyle="--",
            linewidth=1,
            label="Pareto frontier",
            zorder=2,
        )
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
        ax.plot(
            xs,
            [math.nan if y is None else y for y in ys],
            marker="o",
            markersize=3,
            label=f"cos(τ_D, τ_A) {lab}",
        )
        sc = [r.get("sign_conflict") for r in rows]
        ax.plot(
            xs, [math.nan if y is None else y for y in sc], linestyle=":", label=f"sign-conflict share {lab}"
        )
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
        axes[1].bar(xs, [r.get("norm_d") or 0.0 for r in rows], width / 2, label=f"‖τ_D‖ {lab}")
        axes[1].bar(
            [x + width / 2 for x in xs],
            [r.get("norm_a") or 0.0 for r in rows],
            width / 2,
            label=f"‖τ_A‖ {lab}",
        )
        for ax in axes:
            ax.set_xticks(
                [j + 0.4 - width / 2 for j in range(len(mods))], mods, rotation=45, ha="right", fontsize=8
            )
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
    return {
        k: sorted(v, key=lambda m: m.lam or 0.0) for k, v in groups.items() if len({m.lam for m in v}) >= 2
    }


def plot_sweeps(models: Sequence[ModelResult], path: Path) -> Path | None:
    groups = sweep_groups(models)
    groups = {
        k: [m for m in v if m.domain_avg is not None or safety_score(m) is not None]
        for k, v in groups.items()
    }
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
        ax.plot(
            xs,
            [math.nan if v is None else v for v in saf],
            marker="s",
            linestyle="--",
            label=f"safety — {key}",
        )
    ax.set_xlabel("λ (λ_D = λ, λ_A = 1 − λ; 0 = aligned model, 1 = expert)")
    ax.set_ylabel("score (%)")
    ax.set_title("λ sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_contributions(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    rows = [r for r in rows if r["Δ domain"] is not None or r["Δ safety"] is not None]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.8))
    ys = list(range(len(rows)))
    ax.barh(
        [y - 0.2 for y in ys],
        [r["Δ domain"] or 0.0 for r in rows],
        0.4,
        label="Δ domain score",
        color="#1f77b4",
    )
    ax.barh(
        [y + 0.2 for y in ys], [r["Δ safety"] or 0.0 for r in rows], 0.4, label="Δ safety", color="#d62728"
    )
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
        ax.plot(
            range(len(ys)),
            [math.nan if y is None else y for y in ys],
            marker="o",
            markersize=3,
            label=f"{p.get('a')} vs {p.get('b')}",
        )
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
    atomic_write_bytes(path, buf.getvalue())
    return path
