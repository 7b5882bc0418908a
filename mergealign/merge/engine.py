"""The streaming merge engine: one output tensor at a time, float32 accumulation, CPU or CUDA.

    summary = run_merge("merge.yaml", "out/")          # or a MergeConfig / dict

For each output tensor the engine reads the inputs' bytes (pread, with the next tensor prefetched), converts
them to float32 on the compute device, hands them to the method (mergealign.methods), casts the result to the
output dtype and queues its bytes for the shard being written (mergealign.writer: a writer thread appends,
hashes and flushes them while the next block is merged). Element-wise methods get the tensor in row blocks of
256K elements in reused buffers, so memory stays flat whatever the tensor size; methods that need a whole
tensor (TIES top-k, SLERP's angle, DARE's L1 rescale, breadcrumbs) get it whole: one float32 copy per input
model of the largest tensor, the base staying a view of its file (methods on task vectors add it back chunk by
chunk) and TIES / DARE-TIES writing their result over the first task vector. On CPU torch runs one intra-op
thread (see devices.compute_threads).

Inputs are checked before anything is read or written (mergealign.preflight). NaN / Inf in an input tensor
is an error naming the tensor and the model (nan_policy: warn logs it and goes on).
Observers (e.g. streamed similarity statistics) see every block: `observe(name, base, tensors_by_label,
merged)` with float32 tensors on the compute device; a tensor may come in several consecutive row blocks
(same name, rows in order), so observers must accumulate additive statistics. `base` is None when the merge
has none; tensors_by_label maps each model's label (its role if unique, else its config string) to θ (not τ).
The blocks of vocabulary rows taken unmerged from vocab_source are not shown to observers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from mergealign.checkpoint import FLOAT_CODES, ST_DTYPES
from mergealign.devices import PeakRssAnon, compute_threads, default_chunk_elements, torch_threads
from mergealign.files import atomic_write_json
from mergealign.merge.config import MergeConfig
from mergealign.merge.inputs import MergeInput
from mergealign.merge.model_files import write_model_files
from mergealign.merge.params import resolve_params
from mergealign.merge.plan import MergePlan, plan_merge
from mergealign.merge.reader import NonFinite, TensorReader
from mergealign.shards import OutTensor
from mergealign.writer import LOCK_FILE, PROGRESS_FILE, OutputDir

log = logging.getLogger(__name__)

MODEL_PASS_FILE = ".mergealign-model-pass.json"


class Observer(Protocol):
    def observe(
        self,
        name: str,
        base: torch.Tensor | None,
        tensors_by_label: Mapping[str, torch.Tensor],
        merged: torch.Tensor,
    ) -> None: ...


@dataclass
class MergeSummary:
    n_tensors: int  # tensors merged in this run (0 when everything was already finished)
    bytes_read: int  # bytes of input tensors read
    bytes_written: int  # bytes of shards and files written in this run
    wall_s: float
    peak_rss_anon_bytes: int  # peak RssAnon of this process (sampled, see PeakRssAnon)
    out_dir: Path
    files: list[Path]
    n_tensors_total: int = 0
    shards_total: int = 0
    shards_skipped: int = 0  # finished shards kept from an earlier, interrupted run
    device: str = "cpu"
    config_hash: str = ""

    def line(self) -> str:
        resumed = f", {self.shards_skipped}/{self.shards_total} shards resumed" if self.shards_skipped else ""
        return (
            f"merged {self.n_tensors}/{self.n_tensors_total} tensors{resumed} on {self.device}: "
            f"read {self.bytes_read / 1e9:.2f} GB, wrote {self.bytes_written / 1e9:.2f} GB in {self.wall_s:.1f} s, "
            f"peak RssAnon {self.peak_rss_anon_bytes / 2**20:.0f} MiB -> {self.out_dir}"
        )


# --------------------------------------------------------------------------- engine
def _sub_in_chunks(x: torch.Tensor, base: torch.Tensor, chunk: int) -> torch.Tensor:
    """x -= base in place, in chunks: with a base in another dtype, one whole-tensor call would first make a
    float32 copy of it."""
    if base.dtype == x.dtype:
        return x.sub_(base)
    xf, bf = x.reshape(-1), base.reshape(-1)
    for i in range(0, xf.numel(), chunk):
        xf[i : i + chunk].sub_(bf[i : i + chunk])
    return x


class _Engine:
    def __init__(self, plan: MergePlan, observers: Sequence[Observer]):
        self.plan = plan
        self.cfg = plan.config
        self.method = plan.method
        self.observers = list(observers)
        self.device = plan.device
        self.nonfinite = NonFinite(self.cfg.nan_policy)
        self.bytes_read = 0
        self.chunk_elements = int(os.environ.get("MERGEALIGN_CHUNK_ELEMENTS", 0)) or default_chunk_elements(
            self.device
        )
        globals_, models = self.cfg.method_inputs(self.method)
        self.global_settings = globals_
        self.model_settings = models
        self.uses_base = bool(getattr(self.method, "uses_base", True)) and plan.base is not None
        self.elementwise = bool(getattr(self.method, "elementwise", False))
        self.need_base = plan.base is not None and (
            self.uses_base or any(m.kind == "vector" for m in plan.models) or self.method.uses_deltas
        )
        self._throttle = float(os.environ.get("MERGEALIGN_TEST_THROTTLE_S", "0") or 0)
        self.readers = {id(i): TensorReader(i.checkpoint) for i in [plan.base, *plan.models] if i is not None}
        # float32 staging per input for row blocks of element-wise methods (reused: no allocation per block)
        self._blockbufs: dict[int, torch.Tensor] = {}

    def close(self) -> None:
        for r in self.readers.values():
            r.close()

    # ------------------------------------------------------------------ per tensor
    def context(self, name: str, observe_pass: int = 0, inputs_disposable: bool = False) -> Any:
        from mergealign.methods import TensorContext

        n = self.plan.n_layers
        return TensorContext(
            name=name,
            model=[resolve_params(s, name, n) for s in self.model_settings],
            globals=resolve_params(self.global_settings, name, n),
            seed=self.cfg.seed,
            observe_pass=observe_pass,
            inputs_disposable=inputs_disposable,
        )

    def _load(self, inp: MergeInput, name: str, rows: slice | None, cast: bool) -> torch.Tensor:
        """One input's block as float32 on the compute device (a fresh tensor, or a reused staging block)."""
        dtype = self.plan.cast_dtype if cast else None
        out = None
        info = inp.checkpoint.tensors[name]
        block = (rows.stop - rows.start) * (info.numel // info.shape[0]) if rows is not None else info.numel
        if (
            rows is not None
            and self.elementwise
            and self.device.type == "cpu"
            and block <= self.chunk_elements
        ):
            out = self._blockbufs.get(id(inp))
            if out is None:
                out = self._blockbufs[id(inp)] = torch.empty(self.chunk_elements, dtype=torch.float32)
        x = self.readers[id(inp)].read(name, rows, out=out, cast=dtype)
        self.bytes_read += x.numel() * inp.checkpoint.tensors[name].torch_dtype.itemsize
        if self.device.type != "cpu":
            x = x.to(self.device, non_blocking=False)
        return x

    def _stored_base(self, name: str) -> torch.Tensor | None:
        """The whole base tensor as a read-only view of its file in the stored dtype, or None where the float32
        copy is needed. Methods that need a whole tensor and work on task vectors use the base only to add it
        back, chunk by chunk; a float32 copy of it (the 32000x2048 embedding: 262 MB) would be one more whole
        tensor in anonymous memory for nothing (the mapped pages are page cache, reclaimable)."""
        base = self.plan.base
        assert base is not None
        info = base.checkpoint.tensors[name]
        if (
            self.elementwise
            or not self.method.uses_deltas
            or self.observers
            or base.checkpoint.format != "safetensors"
            or self.plan.cast_dtype not in (None, info.torch_dtype)
        ):
            return None
        view = base.checkpoint.view(name)
        self.bytes_read += info.nbytes
        return view if self.device.type == "cpu" else view.to(self.device)

    def inputs(
        self, name: str, rows: slice | None
    ) -> tuple[torch.Tensor | None, list[torch.Tensor], dict[str, torch.Tensor]]:
        """(base, tensors for the method, θ by label for observers) of one block, float32 on the device.

        Row blocks of element-wise methods live in reused buffers: valid until the next block.
        """
        plan = self.plan
        base = None
        if self.need_base:
            assert plan.base is not None
            base = self._stored_base(name) if rows is None else None
            if base is None:
                base = self._load(plan.base, name, rows, cast=True)
            self.nonfinite.check(name, plan.base.label, base)
        deltas = self.method.uses_deltas
        tensors: list[torch.Tensor] = []
        thetas: dict[str, torch.Tensor] = {}
        for m in plan.models:
            x = self._load(
                m, name, rows, cast=m.kind != "vector"
            )  # `dtype` casts model weights, not stored τ
            self.nonfinite.check(name, m.label, x)
            if m.kind == "vector":  # x is τ
                assert base is not None
                tau, theta = x, (base + x if (not deltas or self.observers) else None)
            elif deltas:  # x is θ; the method wants τ (in place unless an observer needs θ)
                assert base is not None
                theta = x
                tau = x - base if self.observers else _sub_in_chunks(x, base, self.chunk_elements)
            else:
                tau, theta = None, x
            tensors.append(tau if deltas else theta)  # type: ignore[arg-type]
            if self.observers:
                assert theta is not None
                thetas[m.label] = theta
        return (base if self.uses_base else None), tensors, thetas

    def merge_block(
        self, name: str, rows: slice | None, observe_pass: int | None = None
    ) -> torch.Tensor | None:
        base, tensors, thetas = self.inputs(name, rows)
        if observe_pass is not None:
            self.method.observe(self.context(name, observe_pass), base, tensors)
            return None
        # Whole tensors read for this call alone (not the reused staging blocks of element-wise methods), and
        # no observer that will look at them afterwards: the method may write its result over them.
        ctx = self.context(name, inputs_disposable=not self.elementwise and not self.observers)
        merged = self.method.merge(ctx, base, tensors)
        for obs in self.observers:
            obs.observe(name, base, thetas, merged)
        return merged

    def blocks(self, t: OutTensor, rows_total: int) -> list[slice | None]:
        """Row blocks for element-wise methods on big tensors; one block otherwise (None = the whole tensor)."""
        whole: list[slice | None] = (
            [None] if not t.shape or rows_total == t.shape[0] else [slice(0, rows_total)]
        )
        if not self.elementwise or len(t.shape) < 2 or t.numel <= self.chunk_elements:
            return whole
        row = t.numel // t.shape[0]
        step = max(1, self.chunk_elements // row)
        return [slice(r, min(r + step, rows_total)) for r in range(0, rows_total, step)]

    def write_tensor(self, out: OutputDir, shard: Any, t: OutTensor) -> None:
        plan = self.plan
        ref = plan.reference
        target = ST_DTYPES[t.dtype]
        if t.dtype not in FLOAT_CODES:  # integer / bool buffers: copied from the reference
            out.write(shard, t.name, ref.checkpoint.view(t.name))
            return
        vocab = plan.preflight.vocab_rows.get(t.name)
        rows_total = vocab.shared if vocab else (t.shape[0] if t.shape else 0)
        for rows in self.blocks(t, rows_total):
            merged = self.merge_block(t.name, rows)
            assert merged is not None
            if any(merged.untyped_storage().data_ptr() == b.data_ptr() for b in self._blockbufs.values()):
                merged = merged.clone()  # a method returned a staging buffer, which the next block reuses
            # cast and queue in pieces: a whole-tensor result is never copied whole into the output dtype
            flat = merged.reshape(-1)
            step = max(self.chunk_elements, 1 << 20)
            for i in range(0, flat.numel(), step):
                out.write(shard, t.name, flat[i : i + step].to(target))
            del merged, flat
        if vocab is not None and vocab.out_rows > vocab.shared:
            src = next(
                i for i in ([plan.base] if plan.base else []) + plan.models if i and i.label == vocab.source
            )
            extra = src.checkpoint.view(t.name)[vocab.shared : vocab.out_rows]
            self.bytes_read += extra.numel() * extra.element_size()
            out.write(shard, t.name, extra.to(target))
        if self._throttle:
            time.sleep(self._throttle)

    def prefetch(self, name: str) -> None:
        for inp in ([self.plan.base] if self.need_base and self.plan.base else []) + self.plan.models:
            self.readers[id(inp)].prefetch(name)

    # ------------------------------------------------------------------ model pass
    def model_pass(self, out_dir: Path, progress: bool) -> None:
        globals_ = resolve_params(self.global_settings, "", self.plan.n_layers)
        passes = self.method.observe_passes(globals_)
        if passes <= 0:
            return
        saved = out_dir / MODEL_PASS_FILE
        if saved.exists() and hasattr(self.method, "set_model_thresholds"):
            data = json.loads(saved.read_text())
            if data.get("config_hash") == self.plan.config_hash:
                self.method.set_model_thresholds(data["thresholds"])
                log.info("model pass restored from %s", saved)
                return
        from tqdm import tqdm

        names = [t.name for t in self.plan.preflight.tensors if t.dtype in FLOAT_CODES]
        for p in range(passes):
            for name in tqdm(names, desc=f"model pass {p + 1}/{passes}", disable=not progress, unit="tensor"):
                vocab = self.plan.preflight.vocab_rows.get(name)
                self.merge_block(name, slice(0, vocab.shared) if vocab else None, observe_pass=p)
        if hasattr(self.method, "model_thresholds"):
            atomic_write_json(
                saved, {"config_hash": self.plan.config_hash, "thresholds": self.method.model_thresholds()}
            )


# --------------------------------------------------------------------------- public entry
def run_merge(
    config: MergeConfig | str | os.PathLike[str] | Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    observers: Sequence[Observer] = (),
    input_hashes: Mapping[str, str] | None = None,
) -> MergeSummary:
    """Merge as the config says into out_dir (a Hugging Face model directory); resumable; see module doc.

    config: a MergeConfig, a YAML path, a YAML string or a dict. device: auto | cpu | cuda[:N], default the
    config's `device` (auto). input_hashes: {model string as in the config: content hash} recorded in the
    model card and config hash instead of the header fingerprints (the pipeline passes file sha256s).
    """
    t0 = time.perf_counter()
    plan = plan_merge(config, out_dir, device=device, input_hashes=input_hashes)
    with PeakRssAnon() as mem:
        summary = execute(plan, observers, progress, overwrite)
    summary.wall_s = time.perf_counter() - t0
    summary.peak_rss_anon_bytes = mem.peak
    log.info("%s", summary.line())
    return summary


def execute(
    plan: MergePlan, observers: Sequence[Observer] = (), progress: bool = True, overwrite: bool = False
) -> MergeSummary:
    """Write a planned merge into plan.out_dir, skipping the shards an interrupted run finished (verified)."""
    from tqdm import tqdm

    engine = _Engine(plan, observers)
    out = OutputDir(plan.out_dir, plan.config_hash, overwrite=overwrite)
    state = out.prepare(plan.shards)
    summary = MergeSummary(
        n_tensors=0,
        bytes_read=0,
        bytes_written=0,
        wall_s=0.0,
        peak_rss_anon_bytes=0,
        out_dir=plan.out_dir,
        files=[],
        n_tensors_total=len(plan.preflight.tensors),
        shards_total=len(plan.shards),
        shards_skipped=len(state.finished),
        device=str(plan.device),
        config_hash=plan.config_hash,
    )
    if state.complete:
        log.info(
            "%s already holds this merge (config hash %s): nothing to do", plan.out_dir, plan.config_hash[:12]
        )
        out.close()
        engine.close()
        summary.files = sorted(p for p in plan.out_dir.iterdir() if p.is_file() and p.name != LOCK_FILE)
        return summary
    todo = [s for s in plan.shards if s.file not in state.finished]
    total_bytes = sum(s.data_bytes for s in todo)
    try:
        with torch_threads(compute_threads(plan.device)), torch.inference_mode():
            engine.model_pass(plan.out_dir, progress)
            bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="merge", disable=not progress)
            names = [t.name for s in todo for t in s.tensors]
            nxt = 1
            for s in todo:
                shard = out.open_shard(s)
                for t in s.tensors:
                    if nxt < len(names):
                        engine.prefetch(names[nxt])
                    nxt += 1
                    engine.write_tensor(out, shard, t)
                    summary.n_tensors += 1
                    bar.update(t.nbytes)
                out.finish_shard(shard, keep_temp_name=len(plan.shards) == 1)
            bar.close()
            files = out.finalize(plan.shards, lambda: write_model_files(plan))
    except BaseException:
        out.abort()
        raise
    finally:
        engine.close()
    summary.bytes_read = engine.bytes_read
    written = {s.file for s in todo}
    summary.bytes_written = sum(
        p.stat().st_size for p in files if p.name in written or not p.name.endswith((".safetensors", ".json"))
    ) + sum(p.stat().st_size for p in files if p.name.endswith(".json") and p.name != PROGRESS_FILE)
    summary.files = files
    for inp in ([plan.base] if plan.base else []) + plan.models:
        inp.checkpoint.close()
    return summary
