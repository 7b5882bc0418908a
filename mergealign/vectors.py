"""Task vectors: τ = θ_finetuned − θ_base, computed in float32, persisted as sharded safetensors.

    summary = compute_vector("base/", "expert/", "tau_expert/")      # `mergealign diff BASE FINETUNED OUT`

A vector directory holds:
- the τ tensors as `model.safetensors` (or shards + `model.safetensors.index.json`), dtype as asked
  (default: each tensor's dtype in the base); float tensors only (integer buffers have no delta);
- `vector.json`: kind, the base and the fine-tune it came from (path, commit sha for hub ids, content
  fingerprint), the dtype;
- `vector_stats.json`: per tensor, L2 norm, max |τ| and share of exact zeros, computed on the float32 τ
  before it is cast for storage;
- `config.json`: a copy of the fine-tune's config (architecture checks in merges read it).
It is written like a merge (atomic shards, resumable, index last). A merge config names it with
`models: [{vector: DIR, ...}]`; the merge checks that the vector's base fingerprint is the merge's base.
With float32 vectors a merge from persisted vectors equals the merge computed on the fly, bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import mergealign
from mergealign.checkpoint import FLOAT_CODES, ST_DTYPES, Checkpoint, dtype_from_name
from mergealign.devices import (
    PeakRssAnon,
    compute_threads,
    default_chunk_elements,
    resolve_device,
    torch_threads,
)
from mergealign.files import atomic_write_json, sha256_text
from mergealign.merge.inputs import VECTOR_META, locate
from mergealign.merge.reader import NonFinite, TensorReader
from mergealign.preflight import Input, preflight
from mergealign.shards import DEFAULT_SHARD_BYTES, OutTensor, parse_size, plan_shards
from mergealign.writer import LOCK_FILE, OutputDir

log = logging.getLogger(__name__)

VECTOR_FORMAT = "mergealign-task-vector"
VECTOR_VERSION = 1
STATS_FILE = "vector_stats.json"


@dataclass
class VectorSummary:
    out_dir: Path
    n_tensors: int
    bytes_read: int
    bytes_written: int
    wall_s: float
    peak_rss_anon_bytes: int
    files: list[Path]

    def line(self) -> str:
        return (
            f"task vector of {self.n_tensors} tensors: read {self.bytes_read / 1e9:.2f} GB, wrote "
            f"{self.bytes_written / 1e9:.2f} GB in {self.wall_s:.1f} s, peak RssAnon "
            f"{self.peak_rss_anon_bytes / 2**20:.0f} MiB -> {self.out_dir}"
        )


class _Stats:
    """L2 norm (float64 sum of squares), max |τ| and zero count, accumulated over row blocks."""

    def __init__(self) -> None:
        self.sq = 0.0
        self.max_abs = 0.0
        self.zeros = 0
        self.numel = 0

    def add(self, tau: torch.Tensor) -> None:
        if tau.numel() == 0:
            return
        flat = tau.reshape(-1)
        self.sq += float(torch.linalg.vector_norm(flat, dtype=torch.float64) ** 2)
        self.max_abs = max(self.max_abs, float(flat.abs().max()))
        self.zeros += int(flat.numel() - torch.count_nonzero(flat))
        self.numel += flat.numel()

    def as_dict(self) -> dict[str, Any]:
        return {
            "l2": math.sqrt(self.sq),
            "max_abs": self.max_abs,
            "zero_share": self.zeros / self.numel if self.numel else 0.0,
            "numel": self.numel,
        }


def _describe(spec: str, path: Path, commit: str | None, ckpt: Checkpoint) -> dict[str, Any]:
    return {"spec": spec, "path": str(path), "commit": commit, "fingerprint": ckpt.content_fingerprint()}


def compute_vector(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    shard_size: int | str = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = "cpu",
    nan_policy: str = "error",
) -> VectorSummary:
    """Write τ = finetuned − base (float32 compute) to out_dir; see the module doc for the layout.

    dtype: storage dtype (default: the base tensor's). Inputs of different dtypes are fine (both are upcast).
    Raises PreflightError (names, shapes, vocab, disk) before anything is written; resumable like a merge.
    """
    t0 = time.perf_counter()
    base_path, base_commit = locate(str(base))
    ft_path, ft_commit = locate(str(finetuned))
    b = Checkpoint(base_path, label="base")
    f = Checkpoint(ft_path, label="finetuned")
    out = Path(out_dir)
    store = dtype_from_name(dtype) if dtype is not None else None
    shard_bytes = parse_size(shard_size)
    base_desc = _describe(str(base), base_path, base_commit, b)
    ft_desc = _describe(str(finetuned), ft_path, ft_commit, f)
    identity = {
        "kind": VECTOR_FORMAT,
        "version": VECTOR_VERSION,
        "base": base_desc["fingerprint"],
        "finetuned": ft_desc["fingerprint"],
        "dtype": str(store),
        "shard_bytes": shard_bytes,
    }
    config_hash = sha256_text(
        json.dumps(identity, sort_keys=True)
    )  # json.dumps' default spacing: kept for resume
    result = preflight(
        [Input("base", b), Input("finetuned", f)], out_dir=out, cast_dtype=torch.float32, out_dtype=store
    )
    tensors = [
        t if store is not None else OutTensor(t.name, t.shape, b.tensors[t.name].dtype)
        for t in result.tensors
        if b.tensors[t.name].dtype in FLOAT_CODES
    ]
    skipped = len(result.tensors) - len(tensors)
    if skipped:
        log.info("%d non-float tensor(s) have no task vector and are left out", skipped)
    shards = plan_shards(tensors, shard_bytes)
    dev = resolve_device(device)
    chunk = default_chunk_elements(dev)
    nonfinite = NonFinite(nan_policy)
    stats: dict[str, dict[str, Any]] = {}
    bytes_read = 0

    with torch_threads(compute_threads(dev)), PeakRssAnon() as mem:
        writer = OutputDir(out, config_hash, overwrite=overwrite)
        state = writer.prepare(shards)
        was_complete = state.complete
        from tqdm import tqdm

        todo = [s for s in shards if s.file not in state.finished]
        try:
            with torch.inference_mode():
                bar = tqdm(
                    total=sum(s.data_bytes for s in todo),
                    unit="B",
                    unit_scale=True,
                    desc="diff",
                    disable=not progress or state.complete,
                )
                rb, rf = TensorReader(b), TensorReader(f)
                bufs = [torch.empty(chunk, dtype=torch.float32) for _ in range(2)]
                for s in todo:
                    shard = writer.open_shard(s, {"format": "pt", "mergealign": "task_vector"})
                    for t in s.tensors:
                        st = _Stats()
                        rows = t.shape[0] if t.shape else 1
                        step = max(1, chunk // max(1, t.numel // max(rows, 1))) if t.shape else 1
                        for r in range(0, rows, step):
                            sl = slice(r, min(r + step, rows)) if t.shape else None
                            small = dev.type == "cpu" and (
                                sl is None or (sl.stop - sl.start) * (t.numel // rows) <= chunk
                            )
                            bf = rb.read(t.name, sl, out=bufs[0] if small else None).to(dev)
                            tau = rf.read(t.name, sl, out=bufs[1] if small else None).to(dev)
                            bytes_read += (
                                bf.numel() * b.tensors[t.name].torch_dtype.itemsize
                                + tau.numel() * f.tensors[t.name].torch_dtype.itemsize
                            )
                            nonfinite.check(t.name, "base", bf)
                            nonfinite.check(t.name, "finetuned", tau)
                            tau.sub_(bf)
                            st.add(tau)
                            writer.write(shard, t.name, tau.to(ST_DTYPES[t.dtype], copy=True))
                        stats[t.name] = st.as_dict()
                        bar.update(t.nbytes)
                    writer.finish_shard(shard, keep_temp_name=len(shards) == 1)
                rb.close()
                rf.close()
                bar.close()

                def write_files() -> None:
                    old = _read_json(out / STATS_FILE)  # stats of shards finished in an earlier run
                    merged_stats = {t.name: stats.get(t.name) or old.get(t.name) for t in tensors}
                    missing = [n for n, v in merged_stats.items() if v is None]
                    if missing:  # finished shards from a run that died before writing stats: recompute
                        for name in missing:
                            st = _Stats()
                            st.add(f.view(name).float() - b.view(name).float())
                            merged_stats[name] = st.as_dict()
                    atomic_write_json(out / STATS_FILE, merged_stats, ensure_ascii=True)
                    codes = {t.dtype for t in tensors}
                    atomic_write_json(
                        out / VECTOR_META,
                        {
                            "format": VECTOR_FORMAT,
                            "version": VECTOR_VERSION,
                            "base": base_desc,
                            "finetuned": ft_desc,
                            "dtype": str(ST_DTYPES[codes.pop()]).removeprefix("torch.")
                            if len(codes) == 1
                            else "mixed",
                            "stats": STATS_FILE,
                            "mergealign_version": mergealign.__version__,
                        },
                        ensure_ascii=True,
                    )
                    atomic_write_json(out / "config.json", f.config, ensure_ascii=True)

                if state.complete:
                    writer.close()
                    files = sorted(p for p in out.iterdir() if p.is_file() and p.name != LOCK_FILE)
                else:
                    files = writer.finalize(shards, write_files)
        except BaseException:
            writer.abort()
            raise
    b.close()
    f.close()
    written = {s.file for s in todo}
    bytes_written = (
        0
        if was_complete
        else sum(p.stat().st_size for p in files if p.name in written or not p.name.endswith(".safetensors"))
    )
    summary = VectorSummary(
        out, len(tensors), bytes_read, bytes_written, time.perf_counter() - t0, mem.peak, files
    )
    log.info("%s", summary.line())
    return summary


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def load_vector_stats(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """{tensor: {l2, max_abs, zero_share, numel}} of a vector directory."""
    return json.loads((Path(path) / STATS_FILE).read_text())


def read_vector_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """vector.json of a vector directory (base / finetuned provenance, dtype)."""
    return json.loads((Path(path) / VECTOR_META).read_text())
