"""Similarity statistics against a direct torch computation on whole state dicts; fused path == standalone."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from mergealign.errors import PreflightError
from mergealign.merge import run_merge
from mergealign.similarity import SimilarityObserver, SimilarityOptions, compute_similarity
from mergealign.similarity.sums import _torch_sums
from mergealign.tensor_names import MODULE_TYPES, layer_index, module_type
from tests.helpers.merge_configs import merge_config
from tests.helpers.models import load_state_dict, make_model, make_trio

LAMBDA = 0.3


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("sim"), arch="llama", noise=0.02)


def merge_cfg(trio, **params) -> dict:
    return merge_config(trio, parameters={"lambda": LAMBDA, **params}, dtype="bfloat16")


@pytest.fixture(scope="module")
def merged(trio, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "m"
    run_merge(merge_cfg(trio), out, progress=False)
    return out


@pytest.fixture(scope="module")
def standalone(trio, merged, tmp_path_factory):
    out = tmp_path_factory.mktemp("simout")
    res = compute_similarity(trio.base, trio.expert, trio.aligned, {"m": merged}, out, progress=False)
    return res, out


# ----------------------------------------------------------------------------- reference formulas
def ref_threshold(tau: torch.Tensor, density: float) -> float:
    """k-th largest |τ| by a full descending sort (k = max(1, int(density·n)))."""
    k = max(1, int(density * tau.numel()))
    return float(tau.abs().flatten().sort(descending=True).values[k - 1])


def ref_tensor(b, e, a, m=None, density=0.2):
    b32, e32, a32 = b.float().flatten(), e.float().flatten(), a.float().flatten()
    d, al = e32 - b32, a32 - b32
    td, ta = ref_threshold(d, density), ref_threshold(al, density)
    in_d, in_a = d.abs() >= td, al.abs() >= ta
    nz = (d != 0) & (al != 0)
    conf = nz & (torch.sign(d) * torch.sign(al) < 0)
    out = {
        "dd": float(d.double() @ d.double()),
        "aa": float(al.double() @ al.double()),
        "da": float(d.double() @ al.double()),
        "bb": float(b32.double() @ b32.double()),
        "both_nonzero": int(nz.sum()),
        "conflicts": int(conf.sum()),
        "top_d": int(in_d.sum()),
        "top_a": int(in_a.sum()),
        "top_energy_d": float((d.double()[in_d] ** 2).sum()),
        "top_energy_a": float((al.double()[in_a] ** 2).sum()),
        "top_both": int((in_d & in_a).sum()),
        "top_both_conflicts": int((in_d & in_a & conf).sum()),
        "cos_ea": float(torch.nn.functional.cosine_similarity(e32.double(), a32.double(), dim=0)),
    }
    if m is not None:
        delta = m.float().flatten() - b32
        out["md"] = float(delta.double() @ d.double())
        out["ma"] = float(delta.double() @ al.double())
        out["mm"] = float(delta.double() @ delta.double())
    return out


def cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x.double() @ y.double() / (x.double().norm() * y.double().norm()))


# ----------------------------------------------------------------------------- tests
def test_names_are_classified():
    assert layer_index("model.layers.17.mlp.down_proj.weight") == 17
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    cases = {
        "model.layers.0.self_attn.q_proj.weight": "attn_q",
        "model.layers.0.self_attn.k_proj.bias": "attn_k",
        "model.layers.0.self_attn.v_proj.weight": "attn_v",
        "model.layers.0.self_attn.o_proj.weight": "attn_o",
        "model.layers.0.self_attn.q_norm.weight": "norm",
        "model.layers.0.mlp.gate_proj.weight": "mlp_gate",
        "model.layers.0.mlp.up_proj.weight": "mlp_up",
        "model.layers.0.mlp.down_proj.weight": "mlp_down",
        "model.layers.0.input_layernorm.weight": "norm",
        "model.norm.weight": "norm",
        "model.embed_tokens.weight": "embed",
        "lm_head.weight": "lm_head",
        "model.rotary_emb.inv_freq": "other",
    }
    for name, kind in cases.items():
        assert module_type(name) == kind, name
    assert set(cases.values()) <= set(MODULE_TYPES)


def test_per_tensor_sums_match_direct_computation(trio, merged, standalone):
    res, _ = standalone
    sb, se, sa, sm = (load_state_dict(p) for p in (trio.base, trio.expert, trio.aligned, merged))
    assert {t.name for t in res.tensors} == set(sb)
    for t in res.tensors:
        ref = ref_tensor(sb[t.name], se[t.name], sa[t.name], sm[t.name])
        s = t.sums
        for key in ("both_nonzero", "conflicts", "top_d", "top_a", "top_both", "top_both_conflicts"):
            assert s[key] == ref[key], (t.name, key)
        for key in ("dd", "aa", "da", "bb", "top_energy_d", "top_energy_a"):
            assert s[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), (t.name, key)
        for key in ("md", "ma", "mm"):
            assert t.merged["m"][key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), (t.name, key)
        row = next(r for r in res.tensor_rows() if r["name"] == t.name)
        assert row["cos_expert_aligned"] == pytest.approx(ref["cos_ea"], abs=1e-9)
        assert row["sign_conflict"] == pytest.approx(ref["conflicts"] / ref["both_nonzero"])
    # the noise is independent: the vectors are near-orthogonal and conflict about half the time
    overall = res.overall()
    assert abs(overall["cos_da"]) < 0.05
    assert 0.45 < overall["sign_conflict"] < 0.55


def test_aggregates_equal_concatenated_vectors(trio, merged, standalone):
    res, _ = standalone
    sb, se, sa, sm = (load_state_dict(p) for p in (trio.base, trio.expert, trio.aligned, merged))

    def cat(sd, names):
        return torch.cat([sd[n].float().flatten() for n in sorted(names)])

    def check(record, names):
        b, e, a, m = (cat(sd, names) for sd in (sb, se, sa, sm))
        d, al, delta = e - b, a - b, m - b
        assert record["norm_d"] == pytest.approx(float(d.double().norm()), rel=1e-9)
        assert record["norm_a"] == pytest.approx(float(al.double().norm()), rel=1e-9)
        assert record["cos_da"] == pytest.approx(cos(d, al), abs=1e-9)
        assert record["cos_expert_aligned"] == pytest.approx(cos(e, a), abs=1e-9)
        mr = record["merged"]["m"]
        assert mr["cos_d"] == pytest.approx(cos(delta, d), abs=1e-9)
        assert mr["cos_a"] == pytest.approx(cos(delta, al), abs=1e-9)
        assert mr["cos_expert"] == pytest.approx(cos(m, e), abs=1e-9)
        # least squares δ ≈ c_D τ_D + c_A τ_A, by torch.linalg.lstsq on the stacked vectors
        X = torch.stack([d.double(), al.double()], dim=1)
        coef = torch.linalg.lstsq(X, delta.double().unsqueeze(1)).solution.flatten()
        assert mr["coef_d"] == pytest.approx(float(coef[0]), rel=1e-6)
        assert mr["coef_a"] == pytest.approx(float(coef[1]), rel=1e-6)
        resid = delta.double() - X @ coef
        assert mr["share_residual"] == pytest.approx(
            float(resid @ resid / (delta.double() @ delta.double())), abs=1e-9
        )
        assert mr["share_d"] == pytest.approx(
            float(coef[0] * (d.double() @ delta.double()) / (delta.double() @ delta.double())), rel=1e-6
        )

    by_layer = {r["layer"]: r for r in res.by_layer()}
    assert sorted(by_layer) == [0, 1]
    for layer, rec in by_layer.items():
        check(rec, [n for n in sb if f"layers.{layer}." in n])
    for rec in res.by_module():
        check(rec, [n for n in sb if module_type(n) == rec["module"]])
    check(res.overall(), list(sb))
    # MergeAlign gives its λs back: δ = λ·τ_D + (1 − λ)·τ_A up to the bf16 rounding of the output
    overall = res.overall()["merged"]["m"]
    assert overall["coef_d"] == pytest.approx(LAMBDA, abs=0.01)
    assert overall["coef_a"] == pytest.approx(1 - LAMBDA, abs=0.01)
    assert overall["share_residual"] < 0.01


def test_fused_path_equals_standalone_bit_for_bit(trio, merged, standalone, tmp_path, monkeypatch):
    res, _ = standalone
    # Tiny row blocks: every matrix reaches the observer in several pieces.
    monkeypatch.setenv("MERGEALIGN_CHUNK_ELEMENTS", "1000")
    obs = SimilarityObserver(trio.base, trio.expert, trio.aligned, merged_label="m", merged_dtype="bfloat16")
    run_merge(merge_cfg(trio), tmp_path / "fused", progress=False, observers=[obs])
    fused = obs.result()
    assert [t.name for t in fused.tensors] == [t.name for t in res.tensors]
    for f, s in zip(fused.tensors, res.tensors, strict=True):
        assert f.sums == s.sums, f.name
        assert f.merged == s.merged, f.name
        assert (f.thr_d, f.thr_a) == (s.thr_d, s.thr_a)
    assert fused.summary()["by_layer"] == res.summary()["by_layer"]
    assert fused.overall() == res.overall()


def test_sampled_thresholds_fused_equal_standalone_and_counts_are_exact(trio, merged, tmp_path, monkeypatch):
    opts = SimilarityOptions(ties_sample=500, ties_density=0.1)
    res = compute_similarity(
        trio.base, trio.expert, trio.aligned, {"m": merged}, options=opts, progress=False
    )
    monkeypatch.setenv("MERGEALIGN_CHUNK_ELEMENTS", "1000")
    obs = SimilarityObserver(
        trio.base, trio.expert, trio.aligned, merged_label="m", merged_dtype="bfloat16", options=opts
    )
    run_merge(merge_cfg(trio), tmp_path / "fused", progress=False, observers=[obs])
    fused = obs.result()
    sb, se, sa = (load_state_dict(p) for p in (trio.base, trio.expert, trio.aligned))
    emb = "model.embed_tokens.weight"  # 320×64 > 500: the sampled path
    for f, s in zip(fused.tensors, res.tensors, strict=True):
        assert f.sums == s.sums and f.merged == s.merged
    rec = next(t for t in res.tensors if t.name == emb)
    d = (se[emb].float() - sb[emb].float()).flatten()
    assert rec.sums["top_d"] == int((d.abs() >= rec.thr_d).sum())  # exact for the recorded threshold
    assert rec.sums["top_d"] / d.numel() == pytest.approx(0.1, abs=0.04)  # a fair estimate of the density


def test_numba_and_torch_kernels_agree():
    g = torch.Generator().manual_seed(3)
    b = torch.randn(300, 70, generator=g).bfloat16()
    e = (b.float() + 0.01 * torch.randn(b.shape, generator=g)).bfloat16()
    a = (b.float() + 0.01 * torch.randn(b.shape, generator=g)).bfloat16()
    e[:5] = b[:5]  # some exact zeros in τ_D
    m = (0.5 * e.float() + 0.5 * a.float()).bfloat16()
    import numpy as np

    from mergealign.similarity.sums import _numba_kernel

    kernel = _numba_kernel()
    assert kernel is not None, "numba is part of the [report] extra"
    acc, cnt, macc = np.zeros(8), np.zeros(6, np.int64), np.zeros(4)
    arrs = [t.view(torch.int16).numpy().view(np.uint16).reshape(-1) for t in (b, e, a, m)]
    kernel(arrs[0], arrs[1], arrs[2], (arrs[3],), 1, 70, 0.004, 0.003, acc, cnt, macc)
    ref = _torch_sums(b, e, a, [m], 0.004, 0.003)
    assert acc.tolist() == pytest.approx(ref[:8], rel=1e-12)
    assert cnt.tolist() == [int(x) for x in ref[8:14]]
    assert macc.tolist() == pytest.approx(ref[14:], rel=1e-12)
    # the accumulator's torch fallback (no numba) gives the same records
    from mergealign.similarity import SimilarityAccumulator

    recs = []
    for use_numba in (True, False):
        acc_ = SimilarityAccumulator(["m"], SimilarityOptions(use_numba=use_numba))
        recs.append(acc_.add("model.layers.0.mlp.up_proj.weight", b, e, a, {"m": m}))
    assert recs[0].thr_d == recs[1].thr_d
    assert recs[0].sums == pytest.approx(recs[1].sums, rel=1e-12)
    assert recs[0].merged["m"] == pytest.approx(recs[1].merged["m"], rel=1e-12)


def test_outputs_on_disk(standalone):
    res, out = standalone
    doc = json.loads((out / "similarity.json").read_text())
    assert doc["merged_labels"] == ["m"]
    assert [r["layer"] for r in doc["by_layer"]] == [0, 1]
    assert {r["module"] for r in doc["by_module"]} == {
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_o",
        "mlp_gate",
        "mlp_up",
        "mlp_down",
        "norm",
        "embed",
        "lm_head",
    }
    assert doc["overall"]["cos_da"] == pytest.approx(res.overall()["cos_da"])
    tensors = pd.read_parquet(out / "tensors.parquet")
    assert len(tensors) == len(res.tensors) and {"name", "layer", "module", "cos_da", "dd"} <= set(
        tensors.columns
    )
    merged_rows = pd.read_parquet(out / "merged.parquet")
    assert set(merged_rows["merged"]) == {"m"} and len(merged_rows) == len(res.tensors)
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())
    # a zero vector (the expert equals the base) has no cosine: null in JSON, not NaN
    assert all(math.isfinite(v) for v in tensors["norm_d"])


def test_models_that_do_not_fit_are_a_preflight_error(trio, tmp_path):
    other = make_model(tmp_path / "other", "llama", vocab_size=400)
    with pytest.raises(PreflightError) as info:
        compute_similarity(trio.base, trio.expert, other, progress=False)
    assert "embed_tokens" in str(info.value)


def test_cli_similarity(trio, merged, tmp_path):
    out = tmp_path / "cli"
    r = CliRunner().invoke(
        app,
        [
            "similarity",
            str(trio.base),
            str(trio.expert),
            str(trio.aligned),
            "--merged",
            f"m={merged}",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "similarity.json").read_text())
    assert doc["merged_labels"] == ["m"]
    assert "cos(τ_D, τ_A)" in r.output
