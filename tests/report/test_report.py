"""The report from a fixture results folder: every row, valid plots, honest about missing inputs."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from mergealign.evaluation.safety import safety_metrics
from mergealign.report import build_report, load_results, pareto_front, safety_score
from mergealign.similarity import SimilarityAccumulator

# name -> (kind, λ_D, domain acc per task, P(safe) on harmful prompts, P(refuse) on benign)
MODELS = {
    "base": ("base", None, [0.40, 0.44], 0.30, 0.00),
    "aligned": ("aligned", None, [0.45, 0.47], 0.97, 0.10),
    "medicine-expert": ("expert", None, [0.62, 0.60], 0.40, 0.00),
    "medicine-mergealign-interp-l0.25": ("merge", 0.25, [0.52, 0.51], 0.95, 0.05),
    "medicine-mergealign-interp-l0.5": ("merge", 0.5, [0.58, 0.57], 0.90, 0.04),
    "medicine-mergealign-interp-l0.75": ("merge", 0.75, [0.61, 0.60], 0.70, 0.02),
    "medicine-mergealign-interp-0.5+align@attn": ("variant", 0.5, [0.59, 0.58], 0.60, 0.02),
}
TASKS = ["medqa_4options", "pubmedqa_local"]


def judged_rows(p_safe: float, p_refuse_benign: float, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(40):
        safe = rng.random() < p_safe
        rows.append(
            {
                "id": f"h{i}",
                "prompt_set": "beavertails",
                "kind": "harmful",
                "category": "c1" if i % 2 else "c2",
                "response": "no" if safe else "sure",
                "judge": {"name": "llama-guard-3", "version": "1"},
                "refused": safe,
                "safe": safe,
                "categories": [] if safe else ["S1"],
                "p_unsafe": None,
            }
        )
    for i in range(20):
        refused = rng.random() < p_refuse_benign
        rows.append(
            {
                "id": f"b{i}",
                "prompt_set": "xstest",
                "kind": "benign",
                "category": "safe",
                "response": "no" if refused else "ok",
                "judge": {"name": "llama-guard-3", "version": "1"},
                "refused": refused,
                "safe": True,
                "categories": [],
                "p_unsafe": None,
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def similarity_doc(out: Path) -> None:
    g = torch.Generator().manual_seed(0)
    acc = SimilarityAccumulator(["medicine-mergealign-interp-l0.5"])
    for layer in range(4):
        for mod in ("self_attn.q_proj", "mlp.up_proj"):
            name = f"model.layers.{layer}.{mod}.weight"
            b = torch.randn(16, 8, generator=g)
            d = 0.01 * torch.randn(16, 8, generator=g)
            a = 0.01 * torch.randn(16, 8, generator=g) + 0.3 * d * layer
            acc.add(name, b, b + d, b + a, {"medicine-mergealign-interp-l0.5": b + 0.5 * d + 0.5 * a})
    acc.result({}).write(out)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    (root / "models").mkdir()
    judged = root / "judged"
    judged.mkdir()
    for i, (name, (kind, lam, accs, p_safe, p_ref)) in enumerate(MODELS.items()):
        safety = safety_metrics(
            [write_jsonl(judged / f"{name}.jsonl", judged_rows(p_safe, p_ref, i))], n_bootstrap=200
        )
        domain = {
            "model": name,
            "tasks": {t: {"acc": a, "acc_stderr": 0.01, "n": 100} for t, a in zip(TASKS, accs, strict=True)},
            "average": {"acc": sum(accs) / 2, "acc_stderr": 0.0071, "n_tasks": 2, "tasks": TASKS},
        }
        doc = {
            "name": name,
            "kind": kind,
            "expert": "medicine" if kind in ("expert", "merge", "variant") else None,
        }
        if lam is not None:
            doc.update(method="mergealign", lambda_domain=lam, lambda_alignment=1 - lam)
        if kind == "variant":
            doc["variant"] = {
                "name": name,
                "kind": "scope",
                "base": "mergealign-interp-0.5",
                "vector": "alignment",
                "part": "attn",
                "exclude": False,
                "description": "τ_A only in attn modules, τ_D everywhere",
            }
        # one model's domain result lives in its own file, referenced by path
        if name == "aligned":
            (root / "domain_aligned.json").write_text(json.dumps(domain))
            doc["domain"] = "../domain_aligned.json"
        else:
            doc["domain"] = domain
        doc["safety"] = None if name == "base" else safety
        (root / "models" / f"{name}.json").write_text(json.dumps(doc))
    similarity_doc(root / "similarity" / "medicine")
    run = {
        "name": "tiny study",
        "config": {
            "models": {"base": "b", "aligned": "a"},
            "merges": [{"method": "mergealign", "lambda": [0.25, 0.5]}],
        },
        "models": [*MODELS, "medicine-ties"],  # medicine-ties never produced results
        "provenance": {
            "git_commit": "abc1234",
            "inputs": {"base": "sha256:00ff"},
            "package_versions": {"x": "1"},
        },
        "timings": [{"step": "merge", "key": "k1", "seconds": 12.5}, {"step": "generate", "seconds": 30.0}],
    }
    (root / "run.json").write_text(json.dumps(run))
    return root


def check_png(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
        extrema = im.convert("L").getextrema()
        assert extrema[0] < extrema[1]  # not a blank image


def test_report_has_every_row_plots_and_provenance(run_dir, tmp_path):
    rep = build_report(run_dir, tmp_path / "rep")
    md = rep.markdown.read_text()
    html = rep.html.read_text()
    assert [r["model"] for r in rep.rows][:3] == ["base", "aligned", "medicine-expert"]
    # the results folder is named relative to the report, so the text stays right when both are moved
    assert f" from {os.path.relpath(run_dir.resolve(), (tmp_path / 'rep').resolve())}. " in md
    assert {r["model"] for r in rep.rows} == {*MODELS, "medicine-ties"}
    for name in [*MODELS, "medicine-ties"]:
        assert f"| {name} |" in md
        assert f"<td>{name.replace('&', '&amp;')}</td>" in html
    # numbers from the files: domain average ± stderr, per task, % safe from the real metrics
    assert "| 61.00 ± 0.71 |" in md  # medicine-expert: mean(0.62, 0.60)
    row = next(r for r in rep.rows if r["model"] == "medicine-mergealign-interp-l0.5")
    judged = [
        json.loads(line) for line in (run_dir / "judged" / "medicine-mergealign-interp-l0.5.jsonl").open()
    ]
    harmful = [r for r in judged if r["kind"] == "harmful"]
    want_safe = 100 * sum(r["safe"] for r in harmful) / len(harmful)
    assert row["safe % beavertails"] == pytest.approx(want_safe)
    benign = [r for r in judged if r["kind"] == "benign"]
    assert row["over-refusal % xstest"] == pytest.approx(
        100 * sum(r["refused"] for r in benign) / len(benign)
    )
    assert row["safety score"] == pytest.approx(want_safe)
    assert row["medqa_4options"] == pytest.approx(58.0)
    # missing inputs are listed and shown as —
    assert "medicine-ties: models/medicine-ties.json not found" in md
    assert "base: safety evaluation: no results" in md
    base_row = next(r for r in rep.rows if r["model"] == "base")
    assert base_row["safe % beavertails"] is None and base_row["domain avg"] == pytest.approx(42.0)
    assert re.search(r"\| medicine-ties \| merge \|( — \|)+", md)
    # plots: valid, non-empty PNGs; markdown links them, HTML embeds them
    names = {p.name for p in rep.plots}
    assert {
        "tradeoff.png",
        "layers_cos.png",
        "layers_norm.png",
        "modules.png",
        "lambda_sweep.png",
        "contributions.png",
    } <= names
    for p in rep.plots:
        check_png(p)
        assert f"](plots/{p.name})" in md
    assert html.count("data:image/png;base64,") == len(rep.plots) and 'src="plots/' not in html
    # provenance
    assert (
        "abc1234" in md and "sha256:00ff" in md and "| merge / k1 | 12.5 |" in md and "| total | 42.5 |" in md
    )
    assert "torch" in md and "merges:" in md
    # contributions: Δ vs the full merge of the same expert
    contrib = json.loads((rep.out_dir / "report.json").read_text())["contributions"]
    assert contrib[0]["base"] == "medicine-mergealign-interp-l0.5"
    assert contrib[0]["Δ domain"] == pytest.approx(58.5 - 57.5)
    assert (rep.out_dir / "table.csv").read_text().count("\n") == len(rep.rows) + 1


def test_missing_files_still_render(tmp_path, run_dir):
    partial = tmp_path / "partial"
    (partial / "models").mkdir(parents=True)
    src = json.loads((run_dir / "models" / "medicine-expert.json").read_text())
    del src["safety"]
    (partial / "models" / "medicine-expert.json").write_text(json.dumps(src))
    (partial / "models" / "broken.json").write_text("{not json")
    rep = build_report(partial)
    assert rep.out_dir == partial / "report"
    md = rep.markdown.read_text()
    assert "run.json (config, expected models, provenance)" in md
    assert "similarity/: no similarity.json" in md
    assert "medicine-expert: safety evaluation: no results" in md
    assert "models/broken.json" in md and "not valid JSON" in md
    assert [r["model"] for r in rep.rows] == ["medicine-expert"]
    assert [p.name for p in rep.plots] == []  # no safety: no trade-off point; nothing else to plot
    assert "Timings per step: —" in md


def test_pareto_front_and_safety_score(run_dir):
    pts = [(1, 5), (2, 4), (3, 1), (2, 2), (1, 1), (3, 1)]
    assert pareto_front(pts) == [(1, 5), (2, 4), (3, 1)]
    res = load_results(run_dir)
    aligned = next(m for m in res.models if m.name == "aligned")
    assert aligned.domain_avg == pytest.approx(46.0)  # read through its path reference
    assert (
        safety_score(aligned) is not None
        and safety_score(next(m for m in res.models if m.name == "base")) is None
    )


def test_cli_report(run_dir, tmp_path):
    r = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert "missing: medicine-ties" in r.output
    assert (tmp_path / "cli" / "report.html").stat().st_size > 10_000
