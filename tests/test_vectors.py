"""Task vectors: `mergealign diff`, their statistics and provenance, and merges from persisted vectors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from mergealign.errors import PreflightError
from mergealign.merge import run_merge
from mergealign.vectors import compute_vector, load_vector_stats, read_vector_meta
from tests.helpers.merge_configs import merge_config
from tests.helpers.models import load_state_dict, make_trio

runner = CliRunner()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def vectors(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("vectors")
    for name, model in (("domain", llama.expert), ("alignment", llama.aligned)):
        compute_vector(llama.base, model, root / name, dtype="float32", progress=False)
    return root


def test_diff_cli_writes_vector_stats_and_provenance(llama, tmp_path):
    out = tmp_path / "tau"
    result = runner.invoke(app, ["diff", str(llama.base), str(llama.expert), str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "task vector of 21 tensors" in result.output
    tau, base, expert = load_state_dict(out), load_state_dict(llama.base), load_state_dict(llama.expert)
    assert tau.keys() == base.keys()
    stats = load_vector_stats(out)
    for name, t in tau.items():
        assert t.dtype == torch.bfloat16  # default: the inputs' dtype
        exact = expert[name].double() - base[name].double()
        assert torch.equal(t, exact.to(torch.bfloat16))
        s = stats[name]
        assert s["l2"] == pytest.approx(float(exact.norm()), rel=1e-6)
        assert s["max_abs"] == pytest.approx(float(exact.abs().max()), rel=1e-6)
        assert s["zero_share"] == pytest.approx(float((exact == 0).double().mean()))
        assert s["numel"] == exact.numel()
    meta = read_vector_meta(out)
    assert meta["format"] == "mergealign-task-vector" and meta["dtype"] == "bfloat16"
    assert meta["base"]["path"] == str(llama.base) and len(meta["base"]["fingerprint"]) == 64
    assert meta["finetuned"]["path"] == str(llama.expert)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_float32_vectors_are_exact_and_sharded(llama, tmp_path):
    out = tmp_path / "tau"
    summary = compute_vector(llama.base, llama.expert, out, dtype="float32", shard_size="50K", progress=False)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 3
    assert summary.n_tensors == 21
    tau, base, expert = load_state_dict(out), load_state_dict(llama.base), load_state_dict(llama.expert)
    for name, t in tau.items():
        assert t.dtype == torch.float32
        assert torch.equal(t.double(), expert[name].double() - base[name].double())


@pytest.mark.parametrize(
    "method,params,model_params",
    [
        ("mergealign", {"lambda": 0.3}, {}),
        ("ties", {"topk_scope": "model"}, {"weight": 0.75, "density": 0.3}),
        ("dare_linear", {}, {"weight": 0.5, "density": 0.5}),
        ("slerp", {"t": 0.4}, None),
        ("linear", {}, {"weight": 1.0}),
    ],
)
def test_persisted_vectors_equal_on_the_fly(llama, vectors, tmp_path, method, params, model_params):
    if model_params is None:  # slerp of weights: base + one model
        models = [{"model": str(llama.expert)}]
        cfg = {"merge_method": method, "base_model": str(llama.base), "models": models, "parameters": params}
        vec_models = [{"vector": str(vectors / "domain")}]
    else:
        cfg = merge_config(llama, method, params, domain=model_params, alignment=model_params)
        vec_models = [
            {"vector": str(vectors / "domain"), "role": "domain", "parameters": model_params},
            {"vector": str(vectors / "alignment"), "role": "alignment", "parameters": model_params},
        ]
    fly = run_merge(cfg, tmp_path / "fly", progress=False)
    stored = run_merge({**cfg, "models": vec_models}, tmp_path / "stored", progress=False)
    a, b = load_state_dict(fly.out_dir), load_state_dict(stored.out_dir)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_vector_of_another_base_is_refused(llama, vectors, tmp_path):
    cfg = {
        "merge_method": "mergealign",
        "base_model": str(llama.aligned),  # not the base the vectors were computed against
        "models": [
            {"vector": str(vectors / "domain"), "role": "domain"},
            {"vector": str(vectors / "alignment"), "role": "alignment"},
        ],
    }
    with pytest.raises(PreflightError, match="task vector was computed against a base with fingerprint"):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_diff_resumes_and_refuses_a_foreign_out(llama, tmp_path):
    out = tmp_path / "tau"
    first = compute_vector(llama.base, llama.aligned, out, shard_size="50K", progress=False)
    again = compute_vector(llama.base, llama.aligned, out, shard_size="50K", progress=False)
    assert again.bytes_written == 0 and first.bytes_written > 0
    from mergealign.errors import MergeAlignError

    with pytest.raises(MergeAlignError, match="different config"):
        compute_vector(llama.base, llama.expert, out, shard_size="50K", progress=False)
