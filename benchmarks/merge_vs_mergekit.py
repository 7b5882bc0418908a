"""mergealign vs mergekit 0.1.5 on a ~1.1B-parameter Llama-shaped trio (bf16): wall time, peak anonymous
memory, output difference. `make bench`; never part of the test suite.

The trio (base random; expert and aligned = base + small seeded noise) is built once into .cache/bench/
(TinyLlama shape: hidden 2048, 22 layers, 32/4 heads, intermediate 5632, vocab 32000, untied head).
For each method the two tools run alternately in child processes, on a warm page cache, each as a user would
run it (`mergealign merge CONFIG OUT`, `mergekit-yaml CONFIG OUT --no-copy-tokenizer --no-write-model-card
--random-seed 0`, absolute paths). Peak memory is RssAnon (anonymous resident memory) summed over the child's
process tree and sampled every 20 ms from /proc/<pid>/status: RSS would count the memory-mapped input pages,
which are page cache, shared and reclaimable.

mergekit computes in its inputs' dtype (bf16 here) unless the config sets `dtype`; mergealign always computes
in float32. The timed mergekit runs use its default (bf16 arithmetic, its fastest). The output difference is
reported in bf16 ulps (ulp of max(|a|, |b|, 2^-20)) against a second mergekit run with `dtype: float32,
out_dtype: bfloat16`, the same formula in the same precision (and against the timed run, for information).
TIES differs where |τ| ties with the trim threshold (mergekit keeps an arbitrary k of the equal entries, we keep
them all), so the share of entries beyond 1 ulp is printed too. DARE draws random masks: not comparable.

A second trio with 44 layers (2× the parameters) measures how our peak memory grows with model size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench"
BIN = Path(sys.executable).parent
MERGEALIGN = [str(BIN / "mergealign")]
MERGEKIT = [str(BIN / "mergekit-yaml")]

SHAPE = {"hidden": 2048, "layers": 22, "heads": 32, "kv_heads": 4, "intermediate": 5632, "vocab": 32000}
LAMBDA_D, LAMBDA_A = 0.6, 0.4
NOISE = 0.002


# --------------------------------------------------------------------------- inputs
def tensor_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    h, inter, vocab = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["vocab"]
    kv = h // SHAPE["heads"] * SHAPE["kv_heads"]
    out = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (vocab, h))]


def llama_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": SHAPE["hidden"],
        "intermediate_size": SHAPE["intermediate"],
        "num_hidden_layers": layers,
        "num_attention_heads": SHAPE["heads"],
        "num_key_value_heads": SHAPE["kv_heads"],
        "vocab_size": SHAPE["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }


def tensor_value(name: str, shape: tuple[int, ...], model: int) -> torch.Tensor:
    """model 0 = base (random), 1/2 = base + seeded noise; every tensor from its own seed (rebuildable)."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(name)) % (2**31)
    gen = torch.Generator().manual_seed(seed)
    if name.endswith("norm.weight"):
        base = torch.ones(shape)
    else:
        base = torch.randn(shape, generator=gen).mul_(0.02)
    if model:
        noise = torch.Generator().manual_seed(seed + 7919 * model)
        base.add_(torch.randn(shape, generator=noise), alpha=NOISE)
    return base.to(torch.bfloat16)


def build_model(path: Path, layers: int, model: int, shard_bytes: int = 1 << 30) -> None:
    if (path / ".complete").exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    shapes = tensor_shapes(layers)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = 2 * torch.Size(shape).numel()
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += n
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(
            {n: tensor_value(n, s, model) for n, s in group}, str(path / fname), metadata={"format": "pt"}
        )
        weight_map.update({n: fname for n, _ in group})
    total = sum(2 * torch.Size(s).numel() for _, s in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(llama_config(layers), indent=2))
    (path / ".complete").write_text("ok")


def build_trio(layers: int) -> dict[str, Path]:
    root = CACHE / f"llama-{layers}l"
    trio = {"base": root / "base", "expert": root / "expert", "aligned": root / "aligned"}
    for i, key in enumerate(("base", "expert", "aligned")):
        if not (trio[key] / ".complete").exists():
            t = time.perf_counter()
            print(f"building {trio[key]} ({layers} layers) ...", flush=True)
            build_model(trio[key], layers, i)
            print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    return trio


def warm(paths: list[Path]) -> None:
    """Read the inputs once so every timed run starts from the same (warm) page cache."""
    for p in paths:
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


# --------------------------------------------------------------------------- measuring a child
def tree_rss_anon(pid: int) -> int:
    total = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        total += int(line.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total


@dataclass
class Run:
    wall_s: float
    peak_anon: int
    ok: bool
    log: str


def run_child(cmd: list[str]) -> Run:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT
    )
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss_anon(proc.pid))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    return Run(wall, peak, proc.returncode == 0, out[-3000:])


# --------------------------------------------------------------------------- configs and comparison
def configs(trio: dict[str, Path]) -> dict[str, tuple[dict, dict]]:
    """method -> (mergealign config, mergekit config)."""
    b, e, a = (str(trio[k]) for k in ("base", "expert", "aligned"))
    ma = {
        "merge_method": "mergealign",
        "base_model": b,
        "models": [{"model": e, "role": "domain"}, {"model": a, "role": "alignment"}],
        "parameters": {"lambda_domain": LAMBDA_D, "lambda_alignment": LAMBDA_A},
    }
    mk_ta = {
        "merge_method": "task_arithmetic",
        "base_model": b,
        "models": [
            {"model": e, "parameters": {"weight": LAMBDA_D}},
            {"model": a, "parameters": {"weight": LAMBDA_A}},
        ],
    }

    def gta(method: str) -> dict:
        return {
            "merge_method": method,
            "base_model": b,
            "models": [
                {"model": e, "parameters": {"weight": 0.75, "density": 0.5}},
                {"model": a, "parameters": {"weight": 0.5, "density": 0.5}},
            ],
            "parameters": {"normalize": True},
        }

    dare_ours = gta("dare_ties")
    dare_ours["parameters"] = {"normalize": True, "rescale_mode": "l1"}  # mergekit's DARE rescale
    return {
        "mergealign": (ma, mk_ta),
        "ties": (gta("ties"), gta("ties")),
        "dare_ties": (dare_ours, gta("dare_ties")),
    }


def compare(a: Path, b: Path) -> tuple[float, float, float]:
    """(max ulps, share of entries beyond 1 ulp, max |a - b|) over every tensor, read tensor by tensor."""

    def index(d: Path) -> dict[str, Path]:
        idx = d / "model.safetensors.index.json"
        if idx.exists():
            return {n: d / f for n, f in json.loads(idx.read_text())["weight_map"].items()}
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            return {n: d / "model.safetensors" for n in f.keys()}

    ia, ib = index(a), index(b)
    assert ia.keys() == ib.keys(), "tensor names differ"
    worst = max_abs = 0.0
    over = total = 0
    for name in ia:
        with safe_open(str(ia[name]), "pt") as fa, safe_open(str(ib[name]), "pt") as fb:
            x = fa.get_tensor(name).to(torch.bfloat16).double()
            y = fb.get_tensor(name).to(torch.bfloat16).double()
        mag = torch.maximum(torch.maximum(x.abs(), y.abs()), torch.tensor(2.0**-20, dtype=torch.float64))
        ulps = (x - y).abs() / torch.exp2(torch.floor(torch.log2(mag)) - 7)
        worst = max(worst, float(ulps.max()))
        over += int((ulps > 1).sum())
        total += ulps.numel()
        max_abs = max(max_abs, float((x - y).abs().max()))
    return worst, over / total, max_abs


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def ours(cfg: dict, work: Path, name: str) -> tuple[Run, Path]:
    out = work / f"ours-{name}"
    shutil.rmtree(out, ignore_errors=True)
    run = run_child(
        MERGEALIGN + ["merge", str(write_yaml(work / f"ours-{name}.yaml", cfg)), str(out), "--no-progress"]
    )
    return run, out


def theirs(cfg: dict, work: Path, name: str) -> tuple[Run, Path]:
    out = work / f"mk-{name}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = MERGEKIT + [str(write_yaml(work / f"mk-{name}.yaml", cfg)), str(out)]
    run = run_child(cmd + ["--no-copy-tokenizer", "--no-write-model-card", "--random-seed", "0"])
    return run, out


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="mergealign,ties,dare_ties")
    ap.add_argument("--no-2x", action="store_true", help="skip the 44-layer memory-growth run")
    ap.add_argument("--keep-outputs", action="store_true")
    args = ap.parse_args()
    if not Path(MERGEKIT[0]).exists():
        sys.exit(f"mergekit-yaml not found next to {sys.executable}: pip install mergekit==0.1.5")

    trio = build_trio(SHAPE["layers"])
    work = CACHE / "runs"
    work.mkdir(parents=True, exist_ok=True)
    warm(list(trio.values()))
    load = os.getloadavg()
    print(
        f"\nmachine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch threads "
        f"{torch.get_num_threads()}; inputs {sum(f.stat().st_size for p in trio.values() for f in p.glob('*.safetensors')) / 1e9:.1f} GB"
    )
    rows = []
    for method in args.methods.split(","):
        cfg_ours, cfg_mk = configs(trio)[method]
        r_ours, out_ours = ours(cfg_ours, work, method)
        r_mk, out_mk = theirs(cfg_mk, work, method)
        for r, who in ((r_ours, "mergealign"), (r_mk, "mergekit")):
            if not r.ok:
                print(f"{who} {method} FAILED:\n{r.log}")
        engine = re.search(r"in ([0-9.]+) s, peak RssAnon", r_ours.log)
        line = {
            "method": method,
            "ours_s": r_ours.wall_s,
            "engine_s": float(engine.group(1)) if engine else float("nan"),
            "mk_s": r_mk.wall_s,
            "ours_anon": r_ours.peak_anon,
            "mk_anon": r_mk.peak_anon,
        }
        if r_ours.ok and r_mk.ok and method != "dare_ties":
            line["vs_timed"] = compare(out_ours, out_mk)
            shutil.rmtree(out_mk, ignore_errors=True)
            mk32 = {**cfg_mk, "dtype": "float32", "out_dtype": "bfloat16"}
            r32, out32 = theirs(mk32, work, method + "-fp32")
            line["mk32_s"] = r32.wall_s
            line["vs_fp32"] = compare(out_ours, out32) if r32.ok else None
            if not args.keep_outputs:
                shutil.rmtree(out32, ignore_errors=True)
        rows.append(line)
        print(json.dumps({k: v for k, v in line.items()}, default=str), flush=True)
        if not args.keep_outputs:
            shutil.rmtree(out_ours, ignore_errors=True)
            shutil.rmtree(out_mk, ignore_errors=True)

    # The 2x trio has twice the layers and the same largest tensor (the embedding): peak memory must not move.
    big: dict[str, Run] = {}
    if not args.no_2x:
        trio2 = build_trio(2 * SHAPE["layers"])
        warm(list(trio2.values()))
        for method in [m for m in ("mergealign", "ties") if m in args.methods.split(",")]:
            r2, out2 = ours(configs(trio2)[method][0], work, f"{method}-2x")
            big[method] = r2
            shutil.rmtree(out2, ignore_errors=True)

    print(
        "\n| method | mergealign (engine) | mergekit | time ratio | mergealign peak RssAnon | mergekit peak RssAnon "
        "| memory ratio | max diff vs mergekit fp32 (ulps; share > 1 ulp) | vs mergekit bf16 default |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fp32 = r.get("vs_fp32")
        timed = r.get("vs_timed")
        d32 = f"{fp32[0]:.0f} ulp; {fp32[1]:.2e}" if fp32 else "n/a (random masks)"
        dbf = f"{timed[0]:.0f} ulp; {timed[1]:.2e}; max abs {timed[2]:.1e}" if timed else "n/a"
        print(
            f"| {r['method']} | {r['ours_s']:.1f} s ({r['engine_s']:.1f} s) | {r['mk_s']:.1f} s | {r['ours_s'] / r['mk_s']:.2f} | "
            f"{gib(r['ours_anon'])} | {gib(r['mk_anon'])} | {r['ours_anon'] / r['mk_anon']:.2f} | {d32} | {dbf} |"
        )
    for method, r2 in big.items():
        base_anon = next((r["ours_anon"] for r in rows if r["method"] == method), None)
        growth = f" ({(r2.peak_anon / base_anon - 1) * 100:+.1f}% vs 22 layers)" if base_anon else ""
        print(
            f"\n{method} (mergealign) on the 44-layer (2x) trio: {r2.wall_s:.1f} s, peak RssAnon {gib(r2.peak_anon)}{growth}"
        )
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
