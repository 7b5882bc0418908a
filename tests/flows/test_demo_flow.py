"""The demo: configs/demo.yaml, the demo zoo as cached Prefect tasks, the demo flow and its findings (the
findings arithmetic itself: tests/demo/test_demo_findings.py).

The real zoo (SmolLM2-135M fine-tuned on CPU) takes ~15 minutes, so the flow tests build the zoo from the
random tiny base of the session's tiny zoo (tests/conftest.py; zoo_demo.base) with tiny step options: every
step still runs for real (data generation, self-distillation, LoRA training, the lm-eval task), through real
Prefect.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from cli.main import app
from flows.demo import mergealign_demo
from flows.zoo import demo_zoo_flow
from mergealign.demo.zoo_steps import STEP_DIRS, ZooPaths
from mergealign.devices import share_cores
from mergealign.errors import ConfigError
from mergealign.study import check_inputs, load_config, parse_config, plan_study
from tests.helpers.study import REPO, states, write_config

DEMO = REPO / "configs" / "demo.yaml"
# Small enough for seconds per step on a tiny model; layers: the tiny model has 2.
TINY_STEPS: dict[str, dict[str, Any]] = {
    "knowledge": {"n_compounds": 4},
    "prompts": {"n_benign": 40},
    "aligned_data": {"n_harmful": 8, "n_benign": 8, "max_new_tokens": 4, "batch_size": 8},
    "aligned": {"epochs": 1.0, "batch_size": 4, "max_len": 64, "layers": [0, 2]},
    "expert": {"epochs": 1.0, "batch_size": 4, "max_len": 64, "layers": [0, 2]},
    "eval_prompts": {"n_harmful": 3, "n_benign": 2},
}
ZOO_STEPS = [s for s in STEP_DIRS if s != "base"]  # the base is the tiny model, given from outside


# --------------------------------------------------------------------------- configs/demo.yaml
def test_demo_config_is_the_study_of_issue_6():
    cfg = load_config(DEMO)
    zoo = ZooPaths(Path(cfg.zoo_demo.dir))
    assert cfg.zoo_demo.base is None  # the real SmolLM2 trio
    assert Path(cfg.models.base.path) == zoo.base
    assert Path(cfg.models.aligned.path) == zoo.aligned
    assert [Path(e.path) for e in cfg.models.experts] == [zoo.expert]
    jobs = {s.name: s.params for s in plan_study(cfg).of_kind("merge") if s.info["kind"] == "merge"}
    interp = sorted(
        p["coefficients"]["lambda"] for p in jobs.values()
        if p["method"] == "mergealign" and p["coefficients"]["preset"] != "sum"
    )  # fmt: skip
    assert interp == [0.25, 0.5, 0.75]
    assert any(p["method"] == "mergealign" and p["coefficients"]["preset"] == "sum" for p in jobs.values())
    assert {"ties", "slerp", "linear"} <= {p["method"] for p in jobs.values()}
    assert "pharma-mergealign-interp-l0.5" in jobs  # the row the findings read (findings.PAPER_DEFAULT)
    gen = cfg.generation
    assert gen.enabled and gen.backend == "transformers" and gen.models == "all"
    # one file of held-out harmful and benign prompts, the kind of each row read from it
    assert [(Path(p.path), p.kind_column) for p in gen.prompt_sets] == [(zoo.heldout_prompts, "kind")]
    assert (
        cfg.zoo_demo.steps["eval_prompts"]["n_harmful"] >= 32
        and cfg.zoo_demo.steps["eval_prompts"]["n_benign"] >= 32
    )
    assert [j.name for j in cfg.judges] == ["refusal"]
    assert cfg.domain_eval.enabled and cfg.domain_eval.models == "all"
    assert [Path(t) for t in cfg.domain_eval.tasks] == [zoo.lm_eval_yaml]
    scopes = [s for c in cfg.analysis.contributions for s in c["scopes"]]
    assert scopes == ["align@attn", "align@mlp"]
    assert cfg.analysis.similarity and cfg.analysis.report and cfg.vectors.persist
    # A portable copy (what deployments get) keeps the zoo where the YAML says.
    assert Path(cfg.portable()["zoo_demo"]["dir"]) == zoo.root


def test_inputs_inside_the_demo_zoo_may_be_missing_until_the_zoo_is_built(tmp_path):
    data = yaml.safe_load(DEMO.read_text())
    zoo = tmp_path / "zoo"
    data["artifact_root"] = str(tmp_path / "artifacts")
    data["zoo_demo"]["dir"] = str(zoo)
    for role in ("base", "aligned"):
        data["models"][role]["path"] = str(zoo / role)
    data["models"]["experts"][0]["path"] = str(zoo / "expert")
    for p in data["generation"]["prompt_sets"]:
        p["path"] = str(zoo / "eval_prompts" / Path(p["path"]).name)
    check_inputs(parse_config(data))  # nothing exists yet: the zoo hook builds it
    data["generation"]["prompt_sets"][0]["path"] = str(tmp_path / "elsewhere.jsonl")
    with pytest.raises(ConfigError) as err:
        check_inputs(parse_config(data))
    assert "generation.prompt_sets[0].path: no such file" in str(err.value)


def test_zoo_step_options_are_checked_before_any_work(tmp_path):
    data = yaml.safe_load(DEMO.read_text())
    data["zoo_demo"]["steps"] = {
        "expert": {"epochz": 2},
        "aligned_data": {"n_harmfull": 3, "seed": 1},
        "alinged": {"epochs": 1},
    }
    with pytest.raises(ConfigError) as err:
        parse_config(data, base_dir=DEMO.parent)
    text = "\n".join(err.value.problems)
    assert "unknown zoo step 'alinged' (did you mean 'aligned'?)" in text
    assert "aligned_data: seed are set by the zoo flow" in text
    data["zoo_demo"]["steps"] = {"expert": {"epochz": 2}, "aligned_data": {"n_harmfull": 3}}
    with pytest.raises(ConfigError) as err:
        parse_config(data, base_dir=DEMO.parent)
    text = "\n".join(err.value.problems)
    assert "zoo_demo.steps.expert.epochz: unknown option (did you mean 'epochs'?)" in text
    assert "zoo_demo.steps.aligned_data.n_harmfull: unknown option (did you mean 'n_harmful'?)" in text


def test_cli_registers_demo_and_zoo_demo_and_rejects_a_config_without_a_zoo(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["demo", "--help"]).exit_code == 0
    result = runner.invoke(app, ["zoo", "demo", "--help"])
    assert result.exit_code == 0 and "--base" in result.output
    data = yaml.safe_load(DEMO.read_text())
    del data["zoo_demo"]
    path = write_config(tmp_path / "nozoo.yaml", data)
    result = runner.invoke(app, ["demo", "--config", str(path)])
    assert isinstance(result.exception, ConfigError)
    assert "zoo_demo" in str(result.exception) and result.exception.exit_code == 2


def test_share_cores_gives_each_parallel_step_its_share_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    cores = os.cpu_count() or 1
    assert share_cores(cores) == 1 and os.environ["OMP_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert share_cores(1) == cores
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert share_cores(cores) == 3  # the user's setting wins


# --------------------------------------------------------------------------- the zoo flow
def _mtimes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and ".prefect" not in p.parts
    }


@pytest.mark.slow
def test_demo_zoo_tasks_build_once_then_are_cached_and_rebuild_what_is_gone(prefect_api, tiny_zoo, tmp_path):
    root = tmp_path / "zoo"
    first = demo_zoo_flow(directory=str(root), base=str(tiny_zoo.base), steps=TINY_STEPS, progress=False)
    assert first["states"] == {s: "Completed" for s in ZOO_STEPS}
    paths = ZooPaths(root)
    for step in ZOO_STEPS:
        manifest = json.loads((paths.step(step) / "zoo_step.json").read_text())
        assert manifest["key"] == first["steps"][step]["key"]
    base_w = load_file(str(Path(tiny_zoo.base) / "model.safetensors"))
    for trained in (paths.aligned, paths.expert):  # real fine-tuning moved the block weights, same tensors
        w = load_file(str(trained / "model.safetensors"))
        assert set(w) == set(base_w)
        assert any(not w[k].float().equal(base_w[k].float()) for k in w if ".layers." in k)
    task_yaml = yaml.safe_load(paths.lm_eval_yaml.read_text())
    data_file = Path(task_yaml["dataset_kwargs"]["data_files"]["test"])
    assert data_file.parent == paths.step("lm_eval_task") and data_file.is_file()
    # the study's prompts: the first n held-out prompts of each kind, nothing from the training split
    rows = [json.loads(line) for line in paths.heldout_prompts.read_text().splitlines()]
    held = {k: [json.loads(x) for x in (paths.step("prompts") / f"{k}_heldout.jsonl").read_text().splitlines()]
            for k in ("harmful", "benign")}  # fmt: skip
    expected = [(r["id"], r["prompt"], k) for k, n in (("harmful", 3), ("benign", 2)) for r in held[k][:n]]
    assert [(r["id"], r["prompt"], r["kind"]) for r in rows] == expected
    trained = {
        json.loads(x)["prompt"]
        for k in ("harmful", "benign")
        for x in (paths.step("prompts") / f"{k}_train.jsonl").read_text().splitlines()
    }
    assert not trained & {r["prompt"] for r in rows}

    before = _mtimes(root)
    second = demo_zoo_flow(directory=str(root), base=str(tiny_zoo.base), steps=TINY_STEPS, progress=False)
    assert second["states"] == {s: "Cached" for s in ZOO_STEPS}
    assert _mtimes(root) == before  # nothing rewritten

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="zoo-")))
    assert {f"zoo-{s.replace('_', '-')}" for s in ZOO_STEPS} <= {a.key for a in arts}

    # A step folder that disappeared is rebuilt (its Prefect record is not trusted); the rest stays cached.
    import shutil

    shutil.rmtree(paths.aligned)
    third = demo_zoo_flow(directory=str(root), base=str(tiny_zoo.base), steps=TINY_STEPS, progress=False)
    assert third["states"]["aligned"] == "Completed"
    assert {s for s, v in third["states"].items() if v != "Cached"} == {"aligned"}
    assert third["steps"]["aligned"]["key"] == first["steps"]["aligned"]["key"]  # same inputs, same step

    # Changed options of one step: that step runs again, and only it.
    changed = {**TINY_STEPS, "expert": {**TINY_STEPS["expert"], "lr": 5e-4}}
    fourth = demo_zoo_flow(directory=str(root), base=str(tiny_zoo.base), steps=changed, progress=False)
    assert {s for s, v in fourth["states"].items() if v != "Cached"} == {"expert"}
    assert fourth["steps"]["expert"]["key"] != first["steps"]["expert"]["key"]


# --------------------------------------------------------------------------- the demo flow
def _tiny_demo_config(tmp_path: Path, base: str) -> Path:
    zoo = tmp_path / "zoo"
    cfg = {
        "name": "tiny-demo",
        "artifact_root": str(tmp_path / "artifacts"),
        "zoo_demo": {"dir": str(zoo), "base": base, "steps": TINY_STEPS},
        "models": {
            "base": {"path": base},
            "aligned": {"path": str(zoo / "aligned")},
            "experts": [{"name": "pharma", "path": str(zoo / "expert")}],
        },  # fmt: skip
        "merges": [{"method": "mergealign", "preset": "interp", "lambda": [0.5]}],
        "generation": {
            "backend": "transformers",
            "dtype": "float32",
            "max_tokens": 2,
            "batch_size": 4,
            "models": ["aligned", "merge:pharma-mergealign-interp-l0.5"],
            "prompt_sets": [
                {"path": str(zoo / "eval_prompts" / "heldout_prompts.jsonl"), "kind_column": "kind"}
            ],
        },  # fmt: skip
        "judges": [{"name": "refusal"}],
        "domain_eval": {
            "enabled": True,
            "tasks": [str(zoo / "lm_eval_task" / "mergealign_demo_pharma.yaml")],
            "limit": 4,
            "batch_size": 4,
            "dtype": "float32",
            "device": "cpu",
            "models": ["expert:pharma"],
        },  # fmt: skip
        "analysis": {"similarity": False, "report": True},
        "execution": {"device": "cpu", "max_workers": 2, "retries": 0},
    }
    return write_config(tmp_path / "tiny-demo.yaml", cfg)


@pytest.mark.slow
def test_demo_flow_builds_the_zoo_runs_the_study_and_states_the_findings(prefect_api, tiny_zoo, tmp_path):
    path = _tiny_demo_config(tmp_path, str(tiny_zoo.base))
    first = mergealign_demo(config=str(path), install_missing=False)
    report = Path(first["report"])
    assert report.is_file() and report.name == "report.html"
    found = json.loads((Path(first["findings"]).parent / "findings.json").read_text())
    rows = {r["model"]: r for r in found["models"]}
    assert set(rows) == {"base", "aligned", "expert-pharma", "pharma-mergealign-interp-l0.5"}
    # the findings carry the study's own numbers: read them back from the step outputs independently
    location = report.parents[1]
    for name, row in rows.items():
        doc = json.loads((location / "results" / "models" / f"{name}.json").read_text())
        acc = ((doc.get("domain") or {}).get("average") or {}).get("acc")
        assert row["domain_acc"] == (None if acc is None else pytest.approx(100 * acc))
        sets = (((doc.get("safety") or {}).get("judges") or {}).get("refusal") or {}).get("sets") or {}
        if not sets:
            assert row["refusal_harmful"] is None and row["over_refusal_benign"] is None
            continue
        overall = sets["heldout_prompts"]["overall"]
        assert overall["refusal_pct"]["n"] == 3 and overall["over_refusal_pct"]["n"] == 2
        assert row["refusal_harmful"] == pytest.approx(overall["refusal_pct"]["value"])
        assert row["over_refusal_benign"] == pytest.approx(overall["over_refusal_pct"]["value"])
    # what this config did not measure is missing (None), never 0
    assert rows["base"]["domain_acc"] is None and rows["base"]["refusal_harmful"] is None
    assert rows["expert-pharma"]["domain_acc"] is not None
    assert rows["pharma-mergealign-interp-l0.5"]["refusal_harmful"] is not None
    assert found["findings"] and "MergeAlign (interp, λ = 0.5)" in " ".join(found["findings"])

    second = mergealign_demo(config=str(path), install_missing=False)
    assert set(states(second["study"]).values()) == {"Cached"}
    assert second["report"] == first["report"] and second["findings"] == first["findings"]
    assert os.path.getmtime(first["findings"]) == os.path.getmtime(second["findings"])
