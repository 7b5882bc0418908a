"""The merge engine end to end: every method through the CLI on tiny real checkpoints, checked against
reference formulas computed here in float64 from the input state dicts; parameter resolution; chunking;
observers; sharding; loading the result with transformers; mergekit parity on unchanged mergekit YAML."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cli.main import app
from mergealign.devices import choose_device, torch_threads
from mergealign.errors import MergeAlignError
from mergealign.merge import run_merge
from mergealign.merge.config import load_merge_config
from mergealign.merge.params import resolve_value
from mergealign.tensor_names import layer_position
from tests.helpers.merge_configs import merge_config
from tests.helpers.models import bf16_ulp_diff, bf16_ulps, load_state_dict, make_trio

runner = CliRunner()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("qwen"), "qwen2")


@pytest.fixture(scope="module")
def sds(llama):
    """float64 state dicts of base, expert, aligned."""
    return {
        k: {n: t.double() for n, t in load_state_dict(getattr(llama, k)).items()}
        for k in ("base", "expert", "aligned")
    }


def cli_merge(cfg: dict, tmp_path: Path, name: str = "out", *extra: str) -> Path:
    cfg_path = tmp_path / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / name
    result = runner.invoke(app, ["merge", str(cfg_path), str(out), "--no-progress", *extra])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    assert "merged" in result.output and "peak RssAnon" in result.output
    return out


def two_models(llama, method: str, params: dict | None = None, mp=None, ap=None, **extra) -> dict:
    return merge_config(llama, method, params or {}, domain=mp or {}, alignment=ap or {}, **extra)


def check(out: Path, reference, max_ulps: int = 1) -> None:
    merged = load_state_dict(out)
    assert set(merged) == set(reference)
    worst = {n: bf16_ulp_diff(merged[n], reference[n]) for n in merged}
    assert max(worst.values()) <= max_ulps, {n: w for n, w in worst.items() if w > max_ulps}
    assert all(t.dtype == torch.bfloat16 for t in merged.values())


# ------------------------------------------------------------------ reference formulas (float64)
def ref_task_arithmetic(sds, coeffs: dict[str, float]):
    b = sds["base"]
    return {n: b[n] + sum(c * (sds[k][n] - b[n]) for k, c in coeffs.items()) for n in b}


def kth_largest_abs(x: torch.Tensor, k: int) -> float:
    return float(torch.topk(x.abs().flatten(), k).values[-1])


def ref_ties(sds, weights: dict[str, float], density: float, thresholds: dict[str, float] | None = None):
    """mergekit convention: top-k per tensor (or `thresholds` per model), weights vote, weighted disjoint mean,
    zero sum counts as +."""
    b = sds["base"]
    out = {}
    for n in b:
        votes = []
        for k, w in weights.items():
            tau = sds[k][n] - b[n]
            keep = max(1, int(density * tau.numel()))
            thr = kth_largest_abs(tau, keep) if density < 1 else 0.0
            if thresholds is not None:
                thr = thresholds[k]
            votes.append((w, w * tau * (tau.abs() >= thr)))
        total = sum(v for _, v in votes)
        gamma = torch.where(total >= 0, 1.0, -1.0).double()
        num = sum(v * (torch.sign(v) == gamma) for _, v in votes)
        den = sum(w * (torch.sign(v) == gamma) for w, v in votes)
        den = torch.where(den == 0, torch.ones_like(den), den)
        out[n] = b[n] + num / den
    return out


def ref_breadcrumbs(sds, weights: dict[str, float], density: float, gamma: float):
    b = sds["base"]
    out = {}
    for n in b:
        acc = b[n].clone()
        for k, w in weights.items():
            tau = sds[k][n] - b[n]
            size = tau.numel()
            kept, top = int(density * size), int(gamma * size)
            bottom = max(0, size - kept - top)
            ordered = tau.abs().flatten().sort().values
            lo, hi = ordered[bottom], ordered[bottom + kept - 1]
            acc += w * tau * ((tau.abs() >= lo) & (tau.abs() <= hi))
        out[n] = acc
    return out


def slerp_pair(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    a, b = v0.flatten(), v1.flatten()
    cos = float(a @ b / (a.norm() * b.norm()))
    cos = max(-1.0, min(1.0, cos))
    if abs(cos) > 0.9995:
        return (1 - t) * v0 + t * v1
    omega = math.acos(cos)
    return (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)


# ------------------------------------------------------------------ every method vs its formula
def test_mergealign_interp_matches_formula(llama, sds, tmp_path):
    out = cli_merge(two_models(llama, "mergealign", {"lambda": 0.3}), tmp_path)
    check(out, ref_task_arithmetic(sds, {"expert": 0.3, "aligned": 0.7}))


def test_mergealign_sum_and_explicit_lambdas(llama, sds, tmp_path):
    out = cli_merge(two_models(llama, "mergealign", {"preset": "sum"}), tmp_path, "sum")
    check(out, ref_task_arithmetic(sds, {"expert": 1.0, "aligned": 1.0}))
    cfg = two_models(llama, "mergealign", {"lambda_domain": 0.8, "lambda_alignment": 0.5})
    out = cli_merge(cfg, tmp_path, "explicit")
    check(out, ref_task_arithmetic(sds, {"expert": 0.8, "aligned": 0.5}))


@pytest.mark.parametrize("lam,expected", [(1.0, "expert"), (0.0, "aligned")])
def test_mergealign_interp_endpoints_reproduce_inputs(llama, tmp_path, lam, expected):
    out = cli_merge(two_models(llama, "mergealign", {"lambda": lam}), tmp_path)
    merged, want = load_state_dict(out), load_state_dict(getattr(llama, expected))
    assert set(merged) == set(want)
    for n in want:
        assert torch.equal(merged[n], want[n]), n


def test_linear(llama, sds, tmp_path):
    cfg = {
        "merge_method": "linear",
        "models": [
            {"model": str(llama.expert), "parameters": {"weight": 2.0}},
            {"model": str(llama.aligned), "parameters": {"weight": 1.0}},
        ],
    }
    out = cli_merge(cfg, tmp_path)
    e, a = sds["expert"], sds["aligned"]
    check(out, {n: (2 * e[n] + a[n]) / 3 for n in e})


def test_task_arithmetic(llama, sds, tmp_path):
    out = cli_merge(
        two_models(llama, "task_arithmetic", {"lambda": 0.9}, {"weight": 0.6}, {"weight": 0.3}), tmp_path
    )
    check(out, ref_task_arithmetic(sds, {"expert": 0.54, "aligned": 0.27}))


def test_slerp_of_weights(llama, sds, tmp_path):
    cfg = {
        "merge_method": "slerp",
        "base_model": str(llama.base),
        "models": [{"model": str(llama.expert)}],
        "parameters": {"t": 0.3},
    }
    out = cli_merge(cfg, tmp_path)
    b, e = sds["base"], sds["expert"]
    check(out, {n: slerp_pair(b[n], e[n], 0.3) for n in b})


def test_slerp_of_task_vectors(llama, sds, tmp_path):
    out = cli_merge(two_models(llama, "slerp_vectors", {"t": 0.3}), tmp_path)
    b = sds["base"]
    check(out, {n: b[n] + slerp_pair(sds["expert"][n] - b[n], sds["aligned"][n] - b[n], 0.3) for n in b})


# TIES weights are powers of two times small integers, so w·τ is exact in float32 and float64 alike: the sign
# election of an entry where the weighted votes cancel exactly is then the same in the engine and here.
def test_ties(llama, sds, tmp_path):
    w = {"weight": 0.75, "density": 0.4}
    out = cli_merge(two_models(llama, "ties", {}, w, {"weight": 0.5, "density": 0.4}), tmp_path)
    check(out, ref_ties(sds, {"expert": 0.75, "aligned": 0.5}, 0.4))


def test_whole_model_ties_on_float32_inputs(tmp_path):
    """topk_scope: model reads every tensor three times (two observe passes, then the merge): float32 inputs,
    which the engine could otherwise alias, must come out as the formula says."""
    trio = make_trio(tmp_path / "f32", "llama", dtype=torch.float32)
    sds = {
        k: {n: t.double() for n, t in load_state_dict(getattr(trio, k)).items()}
        for k in ("base", "expert", "aligned")
    }
    density = 0.3
    thresholds = {}
    for k in ("expert", "aligned"):
        flat = torch.cat([(sds[k][n] - sds["base"][n]).flatten() for n in sds["base"]])
        thresholds[k] = kth_largest_abs(flat, int(density * flat.numel()))
    p = {"weight": 0.75, "density": density}
    cfg = two_models(trio, "ties", {"topk_scope": "model"}, p, {**p, "weight": 0.5})
    out = cli_merge(cfg, tmp_path)
    merged = load_state_dict(out)
    ref = ref_ties(sds, {"expert": 0.75, "aligned": 0.5}, density, thresholds)
    for n in merged:
        assert merged[n].dtype == torch.float32
        assert torch.allclose(merged[n].double(), ref[n], rtol=0, atol=1e-7), n


def test_breadcrumbs(llama, sds, tmp_path):
    p = {"weight": 0.5, "density": 0.6, "gamma": 0.05}
    out = cli_merge(two_models(llama, "breadcrumbs", {}, p, p), tmp_path)
    check(out, ref_breadcrumbs(sds, {"expert": 0.5, "aligned": 0.5}, 0.6, 0.05))


def test_dare_linear_drops_and_rescales_and_is_seeded(llama, sds, tmp_path):
    density = 0.3
    cfg = {
        "merge_method": "dare_linear",
        "base_model": str(llama.base),
        "models": [{"model": str(llama.expert), "parameters": {"weight": 1.0, "density": density}}],
        "seed": 7,
    }
    out = cli_merge(cfg, tmp_path, "a")
    merged = load_state_dict(out)
    b, e = sds["base"], sds["expert"]
    kept = total = 0
    for n in b:
        dropped = b[n]
        rescaled = b[n] + (e[n] - b[n]) / density
        d0 = (merged[n].double() - dropped).abs()
        d1 = (merged[n].double() - rescaled).abs()
        is_kept = d1 < d0
        # every element is the base (dropped) or base + τ/density (kept), to 1 bf16 ulp
        assert bf16_ulp_diff(merged[n], torch.where(is_kept, rescaled, dropped)) <= 1, n
        changed = e[n] != b[n]
        kept += int((is_kept & changed).sum())
        total += int(changed.sum())
    share = kept / total
    assert abs(share - density) < 5 * math.sqrt(density * (1 - density) / total), share
    # the same seed gives the same bytes, another seed other bytes
    again = cli_merge(cfg, tmp_path, "b")
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    other = cli_merge({**cfg, "seed": 8}, tmp_path, "c")
    assert (out / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_dare_ties_without_drop_is_ties_and_with_drop_is_seeded(llama, sds, tmp_path):
    mp, ap = {"weight": 0.75, "density": 1.0}, {"weight": 0.5, "density": 1.0}
    out = cli_merge(two_models(llama, "dare_ties", {"normalize": True}, mp, ap), tmp_path, "full")
    check(out, ref_ties(sds, {"expert": 0.75, "aligned": 0.5}, 1.0))
    cfg = two_models(llama, "dare_ties", {}, {"weight": 0.7, "density": 0.5}, {"weight": 0.5, "density": 0.5})
    a, b = cli_merge(cfg, tmp_path, "r1"), cli_merge(cfg, tmp_path, "r2")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert load_state_dict(a).keys() == sds["base"].keys()


# ------------------------------------------------------------------ parameters, chunking, observers
def test_gradients_filters_and_layer_ranges(llama, sds, tmp_path):
    """weight gradient [0.2, 0.8] over layers for the expert; for the aligned model τ only in the attention
    of layer 0 (our `layers:` extension) and nowhere else (first match wins)."""
    mp = {"weight": [0.2, 0.8]}
    ap = {"weight": [{"filter": "self_attn", "layers": [0, 0], "value": 1.0}, {"value": 0.0}]}
    out = cli_merge(two_models(llama, "task_arithmetic", {}, mp, ap), tmp_path)
    b = sds["base"]
    ref = {}
    for n in b:
        t = layer_position(n, 2)
        w_e = 0.2 + (0.8 - 0.2) * t
        w_a = 1.0 if ("self_attn" in n and ".layers.0." in n) else 0.0
        ref[n] = b[n] + w_e * (sds["expert"][n] - b[n]) + w_a * (sds["aligned"][n] - b[n])
    check(out, ref)
    assert layer_position("model.layers.1.mlp.up_proj.weight", 2) == 1.0
    assert layer_position("model.embed_tokens.weight", 2) == 0.0


def test_resolve_value_semantics():
    cfg = load_merge_config(
        {
            "merge_method": "task_arithmetic",
            "base_model": "/x",
            "models": [
                {
                    "model": "/y",
                    "parameters": {"weight": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 3}]},
                }
            ],
        }
    )
    setting = cfg.models[0].parameters["weight"]
    assert resolve_value(setting, "model.layers.2.mlp.up_proj.weight", 5) == pytest.approx(0.5)
    assert resolve_value(setting, "model.layers.2.self_attn.q_proj.weight", 5) == 3
    assert resolve_value([1.0, 2.0, 4.0], "model.layers.3.mlp.w", 5) == pytest.approx(3.0)


def test_row_chunking_is_invisible_and_observers_see_every_block(llama, sds, tmp_path, monkeypatch):
    cfg = two_models(llama, "mergealign", {"lambda": 0.4})
    whole = run_merge(cfg, tmp_path / "whole", progress=False)

    class Stats:
        def __init__(self):
            self.calls: dict[str, int] = {}
            self.sq: dict[str, float] = {}
            self.labels: set[str] = set()

        def observe(self, name, base, tensors_by_label, merged):
            self.calls[name] = self.calls.get(name, 0) + 1
            self.sq[name] = self.sq.get(name, 0.0) + float((merged.double() ** 2).sum())
            self.labels |= set(tensors_by_label)
            assert base is not None and base.dtype == torch.float32
            for theta in tensors_by_label.values():
                assert theta.shape == merged.shape

    monkeypatch.setenv("MERGEALIGN_CHUNK_ELEMENTS", "1000")
    obs = Stats()
    chunked = run_merge(cfg, tmp_path / "chunked", progress=False, observers=[obs])
    assert (whole.out_dir / "model.safetensors").read_bytes() == (
        chunked.out_dir / "model.safetensors"
    ).read_bytes()
    assert obs.labels == {"domain", "alignment"}
    assert obs.calls["model.embed_tokens.weight"] > 1  # 320×64 in blocks of ≤1000 elements
    merged = load_state_dict(chunked.out_dir)
    for n, t in merged.items():
        assert obs.sq[n] == pytest.approx(float((t.double() ** 2).sum()), rel=1e-2)
    # blocks smaller than one row (rows of 64 and 128 elements): one row per block, same bytes
    monkeypatch.setenv("MERGEALIGN_CHUNK_ELEMENTS", "100")
    tiny = run_merge(cfg, tmp_path / "tiny-blocks", progress=False)
    assert (whole.out_dir / "model.safetensors").read_bytes() == (
        tiny.out_dir / "model.safetensors"
    ).read_bytes()


def test_sharded_output_with_index(llama, tmp_path):
    cfg = two_models(llama, "mergealign", {"lambda": 0.5}, shard_size="40K")
    out = cli_merge(cfg, tmp_path, "sharded")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    for s in shards:
        assert (out / s).stat().st_size <= 40 * 1024 + 4096  # budget + header
    single = cli_merge({**cfg, "shard_size": "2G"}, tmp_path, "single")
    a, b = load_state_dict(out), load_state_dict(single)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())


def test_out_dtype_and_config(llama, tmp_path):
    cfg = two_models(llama, "mergealign", {"lambda": 0.5}, out_dtype="float32")
    out = cli_merge(cfg, tmp_path)
    merged = load_state_dict(out)
    assert all(t.dtype == torch.float32 for t in merged.values())
    conf = json.loads((out / "config.json").read_text())
    assert conf["dtype"] == "float32" and conf["architectures"] == ["LlamaForCausalLM"]
    card = (out / "README.md").read_text()
    assert "mergealign" in card and str(llama.expert) in card and "sampled-sha256" in card


# ------------------------------------------------------------------ the output is a usable model
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_model_loads_and_generates(llama, qwen, tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trio = llama if arch == "llama" else qwen
    out = cli_merge(two_models(trio, "mergealign", {"lambda": 0.5}), tmp_path)
    names = load_state_dict(out).keys()
    assert ("lm_head.weight" in names) == (arch == "llama")  # qwen2 ties it to the embeddings
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.architectures == [f"{'Llama' if arch == 'llama' else 'Qwen2'}ForCausalLM"]
    if arch == "qwen2":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = enc["input_ids"] if not isinstance(enc, torch.Tensor) else enc
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 4
    # the aligned model's tokenizer and chat template were copied
    assert (out / "chat_template.jinja").read_text() == (trio.aligned / "chat_template.jinja").read_text()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_chat_template_override(llama, tmp_path):
    out = cli_merge(
        two_models(llama, "mergealign", {}, chat_template="{{ messages[0]['content'] }}"), tmp_path
    )
    assert (out / "chat_template.jinja").read_text() == "{{ messages[0]['content'] }}"


# ------------------------------------------------------------------ devices
def test_device_selection():
    assert choose_device("auto", cuda_available=False, cuda_count=0) == "cpu"
    assert choose_device("auto", cuda_available=True, cuda_count=2) == "cuda:0"
    assert choose_device(None, cuda_available=True, cuda_count=1) == "cuda:0"
    assert choose_device("cpu", cuda_available=True, cuda_count=1) == "cpu"
    assert choose_device("cuda", cuda_available=True, cuda_count=1) == "cuda:0"
    assert choose_device("cuda:1", cuda_available=True, cuda_count=2) == "cuda:1"
    with pytest.raises(MergeAlignError, match="no CUDA device"):
        choose_device("cuda", cuda_available=False, cuda_count=0)
    with pytest.raises(MergeAlignError, match="only 2 CUDA"):
        choose_device("cuda:2", cuda_available=True, cuda_count=2)
    with pytest.raises(MergeAlignError, match="use auto, cpu"):
        choose_device("tpu", cuda_available=True, cuda_count=1)


def test_torch_threads_sets_and_always_restores():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(other):
        raise RuntimeError("the block failed")
    assert torch.get_num_threads() == before
    with torch_threads(None):  # None: leave the setting alone
        assert torch.get_num_threads() == before


# ------------------------------------------------------------------ mergekit parity
MERGEKIT = shutil.which("mergekit-yaml") or str(Path(__file__).parents[2] / ".venv/bin/mergekit-yaml")


@pytest.mark.slow
@pytest.mark.skipif(not Path(MERGEKIT).exists(), reason="mergekit-yaml is not installed")
def test_unchanged_mergekit_yaml_equals_mergekit_output(llama, sds, tmp_path):
    # mergekit computes in `dtype` (bf16 inputs without it: bf16 arithmetic, several roundings); with float32
    # compute both tools evaluate the same formula and must agree to 1 bf16 ulp after the final cast.
    dtypes = "dtype: float32\nout_dtype: bfloat16\n"
    configs = {
        "task_arithmetic": (
            f"merge_method: task_arithmetic\nbase_model: {llama.base}\nmodels:\n"
            f"  - model: {llama.expert}\n    parameters:\n      weight: 0.7\n"
            f"  - model: {llama.aligned}\n    parameters:\n      weight: 0.4\n{dtypes}"
        ),
        "ties": (
            f"merge_method: ties\nbase_model: {llama.base}\nmodels:\n"
            f"  - model: {llama.expert}\n    parameters:\n      weight: 0.75\n      density: 0.5\n"
            f"  - model: {llama.aligned}\n    parameters:\n      weight: 0.5\n      density: 0.5\n"
            f"parameters:\n  normalize: true\n{dtypes}"
        ),
    }
    procs = {}
    for name, text in configs.items():
        (tmp_path / f"{name}.yml").write_text(text)
        procs[name] = subprocess.Popen(
            [
                MERGEKIT,
                str(tmp_path / f"{name}.yml"),
                str(tmp_path / f"mk-{name}"),
                "--random-seed",
                "0",
                "--no-copy-tokenizer",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    for name in configs:
        ours = cli_merge(yaml.safe_load(configs[name]), tmp_path, f"ours-{name}")
        out, _ = procs[name].communicate(timeout=300)
        assert procs[name].returncode == 0, out[-2000:]
        theirs = load_state_dict(tmp_path / f"mk-{name}")
        mine = load_state_dict(ours)
        assert mine.keys() == theirs.keys()
        over = unexplained = 0
        for n in mine:
            differs = bf16_ulps(mine[n], theirs[n]) > 1
            over += int(differs.sum())
            if name == "ties":
                # TIES: entries whose |τ| equals the trim threshold are all kept here (paper code); mergekit's
                # argsort keeps an arbitrary k of them. Every difference must sit on such an entry.
                at_threshold = torch.zeros_like(differs)
                for k in ("expert", "aligned"):
                    tau = sds[k][n] - sds["base"][n]
                    thr = kth_largest_abs(tau, max(1, int(0.5 * tau.numel())))
                    at_threshold |= tau.abs() == thr
                unexplained += int((differs & ~at_threshold).sum())
        if name == "task_arithmetic":
            assert over == 0
        else:
            assert unexplained == 0 and over > 0  # bf16 task vectors have many equal magnitudes


def test_file_sources_and_input_hashes(llama, tmp_path):
    """tokenizer_source and copy_files_from pick the inputs whose files are copied; input_hashes go into the card."""
    marked = tmp_path / "base-marked"
    shutil.copytree(llama.base, marked)
    tok_cfg = json.loads((marked / "tokenizer_config.json").read_text())
    (marked / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "model_max_length": 77}))
    conf = json.loads((marked / "config.json").read_text())
    (marked / "config.json").write_text(json.dumps({**conf, "marker": "base"}))
    cfg = merge_config(replace(llama, base=marked))
    default = run_merge(cfg, tmp_path / "default", progress=False).out_dir
    assert "marker" not in json.loads((default / "config.json").read_text())  # default: the alignment model
    assert json.loads((default / "tokenizer_config.json").read_text()).get("model_max_length") != 77
    hashes = {str(marked): "sha256:" + "ab" * 32}
    out = run_merge(
        {**cfg, "tokenizer_source": "base"}, tmp_path / "tok", progress=False, input_hashes=hashes
    ).out_dir
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 77
    assert "marker" not in json.loads((out / "config.json").read_text())
    assert "sha256:" + "ab" * 32 in (out / "README.md").read_text()
    out = run_merge({**cfg, "copy_files_from": "base"}, tmp_path / "files", progress=False).out_dir
    assert json.loads((out / "config.json").read_text())["marker"] == "base"
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 77
