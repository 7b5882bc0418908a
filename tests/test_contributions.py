"""Contribution variants: configs, names, and merged weights against an independent formula (real engine)."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cli.main import app
from mergealign.contributions import (
    ContributionEntry,
    contribution_variants,
    lambda_sweep,
    module_filters,
    parse_contributions,
    parse_scope,
    scope_variant,
)
from mergealign.errors import ConfigError
from mergealign.merge import run_merge
from tests.helpers.merge_configs import merge_config
from tests.helpers.models import load_state_dict, make_trio


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("contrib"), arch="llama", noise=0.02)


@pytest.fixture(scope="module")
def sds(trio):
    return {k: load_state_dict(getattr(trio, k)) for k in ("base", "expert", "aligned")}


def base_cfg(trio, lam=0.5) -> dict:
    return merge_config(trio, parameters={"preset": "interp", "lambda": lam}, dtype="bfloat16")


# Independent masks: written from the tensor names of a Llama, not from mergealign's classifier.
def in_part(name: str, part: str) -> bool:
    layer = re.search(r"\.layers\.(\d+)\.", name)
    if part == "attn":
        return bool(re.search(r"self_attn\.[qkvo]_proj\.", name))
    if part == "mlp":
        return ".mlp." in name
    if part == "first_half":
        return layer is not None and int(layer.group(1)) == 0  # 2 layers: block 0
    if part == "layers:1-1":
        return layer is not None and int(layer.group(1)) == 1
    raise AssertionError(part)


def expected(sds, name, lam_d, lam_a, scope=None):
    b, e, a = (sds[k][name].float() for k in ("base", "expert", "aligned"))
    w_d = w_a = 1.0
    if scope is not None:
        vector, part = scope.split("@")
        exclude = part.startswith("~")
        inside = in_part(name, part.lstrip("~")) != exclude
        if vector == "align":
            w_a = float(inside)
        else:
            w_d = float(inside)
    return b + lam_d * w_d * (e - b) + lam_a * w_a * (a - b)


@pytest.mark.parametrize(
    "scope", ["align@attn", "domain@mlp", "align@~attn", "align@first_half", "domain@layers:1-1"]
)
def test_scope_variant_merges_to_the_formula(trio, sds, tmp_path, scope):
    v = scope_variant(base_cfg(trio, 0.4), scope)
    assert v.name == f"mergealign-interp-0.4+{parse_scope(scope).token}"
    assert (v.lambda_domain, v.lambda_alignment) == pytest.approx((0.4, 0.6))
    out = tmp_path / "m"
    run_merge(v.config, out, progress=False)
    merged = load_state_dict(out)
    changed = 0
    for name, t in merged.items():
        want = expected(sds, name, 0.4, 0.6, scope)
        full = expected(sds, name, 0.4, 0.6)
        # one bf16 rounding of the output (relative 2^-8) plus float32 noise
        torch.testing.assert_close(t.float(), want, rtol=2**-7, atol=1e-6, msg=f"{scope}: {name}")
        changed += not torch.allclose(want, full)
    assert changed > 0  # the scope removed the vector somewhere


def test_lambda_sweep_configs_and_merge(trio, sds, tmp_path):
    sweep = lambda_sweep(base_cfg(trio), [0.0, 0.25, 1.0])
    assert [v.name for v in sweep] == ["mergealign-interp-0", "mergealign-interp-0.25", "mergealign-interp-1"]
    out = tmp_path / "m"
    run_merge(sweep[1].config, out, progress=False)
    merged = load_state_dict(out)
    for name, t in merged.items():
        torch.testing.assert_close(t.float(), expected(sds, name, 0.25, 0.75), rtol=2**-7, atol=1e-6)
    # λ = 1 is the expert itself (up to its own bf16 values), λ = 0 the aligned model
    alt = lambda_sweep(base_cfg(trio), [0.3], vary="alignment")[0]
    assert alt.name == "mergealign-ld0.5-la0.3" and alt.config["parameters"]["lambda_domain"] == 0.5
    s = lambda_sweep({**base_cfg(trio), "parameters": {"preset": "sum"}}, [1.0], vary="domain")[0]
    assert s.name == "mergealign-sum"


def test_variant_config_shape(trio):
    v = scope_variant(base_cfg(trio), "align@attn")
    weight = v.config["models"][1]["parameters"]["weight"]
    assert weight[-1] == {"value": 0.0}
    assert sorted(w["filter"] for w in weight[:-1]) == [
        ".self_attn.k_proj.",
        ".self_attn.o_proj.",
        ".self_attn.q_proj.",
        ".self_attn.v_proj.",
    ]
    assert "weight" not in (v.config["models"][0].get("parameters") or {})
    lay = scope_variant(base_cfg(trio), "domain@~second_half")
    assert lay.config["models"][0]["parameters"]["weight"] == [
        {"layers": [1, 1], "value": 0.0},
        {"value": 1.0},
    ]
    assert lay.name == "mergealign-interp-0.5+domain@~second_half"
    names = [v.name for v in contribution_variants(base_cfg(trio))]
    assert len(names) == 8 and len(set(names)) == 8


def test_filters_do_not_catch_neighbours():
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    attn = module_filters("attn", names)
    assert not any(f in "model.layers.0.self_attn.q_norm.weight" for f in attn)
    norm = module_filters("norm", names)
    assert {n for n in names if any(f in n for f in norm)} == {
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.norm.weight",
    }
    assert module_filters("embed", names) == ["model.embed_tokens."]


def test_bad_scopes_and_configs(trio):
    with pytest.raises(ConfigError, match="unknown part 'attention'"):
        parse_scope("align@attention")
    with pytest.raises(ConfigError, match="VECTOR@PART"):
        parse_scope("safety@attn")
    with pytest.raises(ConfigError, match="layers"):
        scope_variant(base_cfg(trio), "align@layers:0-5")
    with pytest.raises(ConfigError, match="mergealign merge"):
        scope_variant({**base_cfg(trio), "merge_method": "ties"}, "align@attn")
    with pytest.raises(ConfigError) as info:
        parse_contributions([{"scopes": ["align@attn"], "lambda": [1.5]}, {"scopes": ["x@y"]}])
    text = str(info.value)
    assert "analysis.contributions[0].lambda" in text and "analysis.contributions[1]" in text


def test_run_config_entry_expands(trio):
    entry = ContributionEntry.model_validate(
        {"scopes": ["align@attn", "align@mlp"], "lambda": [0.5, 0.7], "sweep": [0.0, 1.0]}
    )
    names = [v.name for v in entry.variants(base_cfg(trio))]
    assert names == [
        "mergealign-interp-0",
        "mergealign-interp-1",
        "mergealign-interp-0.5+align@attn",
        "mergealign-interp-0.5+align@mlp",
        "mergealign-interp-0.7+align@attn",
        "mergealign-interp-0.7+align@mlp",
    ]


def test_cli_contributions(trio, tmp_path):
    cfg = tmp_path / "base.yaml"
    cfg.write_text(yaml.safe_dump(base_cfg(trio)))
    out = tmp_path / "variants"
    r = CliRunner().invoke(
        app, ["contributions", str(cfg), str(out), "--scope", "align@attn", "--lambda", "0.2"]
    )
    assert r.exit_code == 0, r.output
    files = sorted(p.name for p in out.glob("*.yaml"))
    assert files == ["mergealign-interp-0.2.yaml", "mergealign-interp-0.5+align@attn.yaml"]
    loaded = yaml.safe_load((out / "mergealign-interp-0.5+align@attn.yaml").read_text())
    assert loaded["models"][1]["parameters"]["weight"][-1] == {"value": 0.0}
