"""The streamed similarity pass against merely reading the same tensors, on the engine benchmark's trio.

    .venv/bin/python benchmarks/similarity.py [--repeats 3] [--2x]

Inputs: the ~1.1B-parameter bf16 Llama-shaped trio of benchmarks/merge_vs_mergekit.py (its `build_trio`, cached in
.cache/bench/llama-22l/; built if missing). Both passes visit the float tensors in the same order through the
same zero-copy memory-mapped views (mergealign.checkpoint.Checkpoint.view), on a warm page cache:

- read: base, expert and aligned tensor converted to float32 (``view.float()``), nothing else;
- similarity: mergealign.similarity.compute_similarity (τ_D, τ_A, every statistic, TIES thresholds).

Each pass runs in its own child process, alternating, ``--repeats`` times; the child times the pass only (after
imports and the numba kernel's first, cached compilation) and samples its RssAnon (anonymous resident memory:
the mmapped inputs are page cache, not counted) every 10 ms from /proc/self/status. Printed: median wall time
and CPU time of each pass, their ratio (target ≤ 1.5), and peak RssAnon above the process's baseline. With
``--2x`` the 44-layer trio (2× the parameters) is measured too, to show that memory stays flat in model size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _engine_bench():
    """The engine benchmark's module (its trio builder, shape and page-cache warm-up)."""
    if "merge_vs_mergekit" in sys.modules:
        return sys.modules["merge_vs_mergekit"]
    spec = importlib.util.spec_from_file_location(
        "merge_vs_mergekit", ROOT / "benchmarks" / "merge_vs_mergekit.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["merge_vs_mergekit"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self.peak = rss_anon()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def child(kind: str, trio: dict[str, str]) -> dict:
    import torch

    from mergealign.checkpoint import Checkpoint
    from mergealign.similarity import SimilarityAccumulator, check_compatible, compute_similarity

    cks = {k: Checkpoint(v) for k, v in trio.items()}
    names = check_compatible(cks)
    # warm-up outside the timing: imports, the kernel's compilation (cached on disk after the first run)
    small = min(names, key=lambda n: cks["base"].tensors[n].numel)
    SimilarityAccumulator().add(small, *(cks[k].view(small) for k in ("base", "expert", "aligned")))
    base_anon = rss_anon()
    t0, c0 = time.perf_counter(), time.process_time()
    with PeakSampler() as mem:
        if kind == "read":
            with torch.inference_mode():
                for name in names:
                    for k in ("base", "expert", "aligned"):
                        x = cks[k].view(name).float()
                        del x
        else:
            compute_similarity(trio["base"], trio["expert"], trio["aligned"], progress=False)
    return {
        "kind": kind,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
        "peak_anon": mem.peak,
        "base_anon": base_anon,
        "tensors": len(names),
    }


def run_child(kind: str, trio: dict[str, Path]) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        "--trio",
        json.dumps({k: str(v) for k, v in trio.items()}),
    ]
    out = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if out.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def measure(trio: dict[str, Path], repeats: int, label: str) -> dict:
    eng = _engine_bench()
    eng.warm(list(trio.values()))
    runs: dict[str, list[dict]] = {"read": [], "similarity": []}
    for i in range(repeats):
        for kind in ("read", "similarity") if i % 2 == 0 else ("similarity", "read"):
            r = run_child(kind, trio)
            runs[kind].append(r)
            print(
                f"  {label} {kind:10s} wall {r['wall_s']:6.2f} s  cpu {r['cpu_s']:6.2f} s  "
                f"peak RssAnon +{mib(r['peak_anon'] - r['base_anon'])}",
                flush=True,
            )
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "cpu_s")} for k, v in runs.items()}
    peak = {k: max(r["peak_anon"] - r["base_anon"] for r in v) for k, v in runs.items()}
    return {"median": med, "peak_above_baseline": peak, "tensors": runs["read"][0]["tensors"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--2x", dest="twice", action="store_true", help="also the 44-layer trio (memory flatness)"
    )
    ap.add_argument("--child", choices=("read", "similarity"))
    ap.add_argument("--trio")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.trio))), flush=True)
        return
    eng = _engine_bench()
    trio = eng.build_trio(eng.SHAPE["layers"])
    size = sum(f.stat().st_size for p in trio.values() for f in p.glob("*.safetensors"))
    load = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"inputs {size / 1e9:.1f} GB (3 × bf16, {eng.SHAPE['layers']} layers)",
        flush=True,
    )
    res = measure(trio, args.repeats, f"{eng.SHAPE['layers']}l")
    m = res["median"]
    print(
        f"\nread:       wall {m['read']['wall_s']:.2f} s, cpu {m['read']['cpu_s']:.2f} s, "
        f"peak RssAnon +{mib(res['peak_above_baseline']['read'])}"
    )
    print(
        f"similarity: wall {m['similarity']['wall_s']:.2f} s, cpu {m['similarity']['cpu_s']:.2f} s, "
        f"peak RssAnon +{mib(res['peak_above_baseline']['similarity'])}"
    )
    ratio = m["similarity"]["wall_s"] / m["read"]["wall_s"]
    print(
        f"ratio similarity / read: wall {ratio:.2f}× (target ≤ 1.5×), "
        f"cpu {m['similarity']['cpu_s'] / m['read']['cpu_s']:.2f}×"
    )
    if args.twice:
        trio2 = eng.build_trio(2 * eng.SHAPE["layers"])
        res2 = measure(trio2, 1, f"{2 * eng.SHAPE['layers']}l")
        p1, p2 = res["peak_above_baseline"]["similarity"], res2["peak_above_baseline"]["similarity"]
        print(
            f"memory growth at 2× parameters: similarity peak RssAnon +{mib(p1)} -> +{mib(p2)} "
            f"({(p2 / p1 - 1) * 100 if p1 else 0:+.0f}%)"
        )


if __name__ == "__main__":
    main()
