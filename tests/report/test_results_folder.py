"""The results folder as the report step writes it: every file from real result files, read back unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mergealign.evaluation.safety import safety_metrics
from mergealign.report import ModelFiles, build_report, load_results, write_results
from mergealign.similarity import SimilarityAccumulator


def judged(path: Path, n_safe: int, n: int) -> Path:
    rows = [
        {"id": f"h{i}", "prompt_set": "advbench", "kind": "harmful", "category": "c", "response": "r",
         "judge": {"name": "llama-guard-3", "version": "1"}, "refused": i < n_safe, "safe": i < n_safe,
         "categories": [], "p_unsafe": None}
        for i in range(n)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def inputs(tmp: Path) -> tuple[list[ModelFiles], dict[str, Path]]:
    tmp.mkdir(parents=True, exist_ok=True)
    safety = safety_metrics([judged(tmp / "judged.jsonl", 7, 10)], tmp / "safety.json", n_bootstrap=50)
    assert safety["judges"]
    domain = {"model": "m", "tasks": {"t": {"acc": 0.5, "acc_stderr": 0.05, "n": 100}},
              "average": {"acc": 0.5, "acc_stderr": 0.05, "n_tasks": 1, "tasks": ["t"]}}  # fmt: skip
    (tmp / "domain.json").write_text(json.dumps(domain))
    acc = SimilarityAccumulator(["med-mergealign-l0.5"])
    g = torch.Generator().manual_seed(1)
    for layer in range(2):
        b = torch.randn(8, 4, generator=g)
        d, a = 0.01 * torch.randn(8, 4, generator=g), 0.01 * torch.randn(8, 4, generator=g)
        acc.add(
            f"model.layers.{layer}.mlp.up_proj.weight",
            b,
            b + d,
            b + a,
            {"med-mergealign-l0.5": b + (d + a) / 2},
        )
    sim = acc.result({}).write(tmp / "sim")["json"]
    info = {"method": "mergealign", "lambda_domain": 0.5, "lambda_alignment": 0.5}
    models = [
        ModelFiles(name="base", kind="base", source="sha-base", location="/store/base"),
        ModelFiles(name="med-mergealign-l0.5", kind="merge", expert="med", info=info, domain=tmp / "domain.json",
                   safety=tmp / "safety.json", source="sha-merge", location="/store/merge"),
        ModelFiles(name="med-ties", kind="merge", expert="med", info={"method": "ties"}),
    ]  # fmt: skip
    return models, {"med": sim}


def test_write_results_records_every_model_and_reads_back(tmp_path):
    models, sims = inputs(tmp_path / "in")
    folder = tmp_path / "results"
    (folder / "models").mkdir(parents=True)
    (folder / "models" / "stale.json").write_text("{}")  # left by an interrupted earlier attempt
    timings = [{"step": "merge", "label": "m", "seconds": 1.5}]
    config = {"name": "s", "merges": [{"method": "mergealign"}]}
    assert write_results(folder, models, sims, name="s", config=config, timings=timings) == folder

    assert sorted(p.name for p in (folder / "models").iterdir()) == [
        "base.json", "med-mergealign-l0.5.json", "med-ties.json"
    ]  # fmt: skip
    merge = json.loads((folder / "models" / "med-mergealign-l0.5.json").read_text())
    assert list(merge) == [
        "name",
        "kind",
        "expert",
        "method",
        "lambda_domain",
        "lambda_alignment",
        "domain",
        "safety",
    ]
    assert merge["domain"] == json.loads((tmp_path / "in" / "domain.json").read_text())
    assert merge["safety"] == json.loads((tmp_path / "in" / "safety.json").read_text())
    base = json.loads((folder / "models" / "base.json").read_text())
    assert base == {"name": "base", "kind": "base", "expert": None, "domain": None, "safety": None}
    assert (folder / "similarity" / "med" / "similarity.json").read_bytes() == sims["med"].read_bytes()
    run = json.loads((folder / "run.json").read_text())
    assert run == {
        "name": "s",
        "config": config,
        "models": ["base", "med-mergealign-l0.5", "med-ties"],
        "provenance": {"inputs": {"base": "sha-base", "med-mergealign-l0.5": "sha-merge"},
                       "artifacts": {"base": "/store/base", "med-mergealign-l0.5": "/store/merge"}},
        "timings": timings,
    }  # fmt: skip
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]

    # the reading side sees what was written
    res = load_results(folder)
    assert [m.name for m in res.models] == ["base", "med-mergealign-l0.5", "med-ties"]
    m = next(m for m in res.models if m.name == "med-mergealign-l0.5")
    assert m.domain_avg == 50.0 and m.lam == 0.5 and m.safety == merge["safety"]
    assert list(res.similarity) == ["med"]
    assert "med-ties: domain evaluation: no results" in res.missing
    rep = build_report(folder, tmp_path / "report", title="s")
    assert (
        "| med-mergealign-l0.5 | merge | mergealign | 0.5 | 0.5 | 50.00 ± 5.00 |" in rep.markdown.read_text()
    )


def test_write_results_without_timings_or_similarity(tmp_path):
    models, _ = inputs(tmp_path / "in")
    folder = write_results(tmp_path / "r", models[:1], {}, name="s", config={})
    run = json.loads((folder / "run.json").read_text())
    assert run["timings"] == [] and run["models"] == ["base"]
    assert not (folder / "similarity").exists()
    assert (
        "similarity/: no similarity.json (per-layer plots of τ_D and τ_A skipped)"
        in load_results(folder).missing
    )
