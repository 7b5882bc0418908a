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
import math
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

import mergealign
from mergealign.checkpoint import (
    FLOAT_CODES,
    GENERATION_CONFIG,
    ST_DTYPES,
    TOKENIZER_FILES,
    Checkpoint,
    dtype_from_name,
    dtype_size,
    parse_model_ref,
)
from mergealign.devices import compute_threads, default_chunk_elements, resolve_device
from mergealign.errors import CheckpointError, MergeAlignError, PreflightError
from mergealign.merge_config import BUILTIN_CHAT_TEMPLATES, MergeConfig, load_merge_config, resolve_params
from mergealign.preflight import Input, PreflightResult, preflight
from mergealign.writer import (
    LOCK_FILE,
    PROGRESS_FILE,
    OutputDir,
    OutTensor,
    ShardPlan,
    atomic_write_json,
    atomic_write_text,
    plan_shards,
)

log = logging.getLogger(__name__)

ENGINE_VERSION = 1  # part of the config hash: bump when the bytes an identical config produces change
VECTOR_META = "vector.json"
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


# --------------------------------------------------------------------------- memory
def rss_anon_bytes(pid: int | str = "self") -> int:
    """RssAnon of a process (anonymous resident memory: heap, tensors; not the page cache of mmapped files)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRssAnon:
    """Samples this process's RssAnon every `interval` s on a daemon thread; `.peak` is the maximum seen.

    Linux keeps a high-water mark only for total RSS (VmHWM), which counts the mmapped input pages; anonymous
    memory has none, so it is sampled (a spike shorter than the interval can be missed).
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = rss_anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-anon", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_anon_bytes())

    def __enter__(self) -> PeakRssAnon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_bytes())


# --------------------------------------------------------------------------- inputs
@dataclass
class MergeInput:
    """One opened input: the base, a model, or a persisted task vector."""

    label: str
    spec: str  # as written in the config
    path: Path
    checkpoint: Checkpoint
    kind: str  # "base" | "model" | "vector"
    commit: str | None = None  # hub commit sha when the spec is a hub id
    vector_meta: dict[str, Any] = field(default_factory=dict)
    role: str | None = None

    def identity(self, input_hashes: Mapping[str, str] | None) -> str:
        if input_hashes and self.spec in input_hashes:
            return input_hashes[self.spec]
        if self.commit:
            return f"commit {self.commit}"
        return f"sampled-sha256 {self.checkpoint.content_fingerprint()}"


def locate(spec: str, config_dir: Path | None = None) -> tuple[Path, str | None]:
    """A model string -> (local directory, commit sha or None). Hub ids are looked up in the local HF cache
    only (no network: downloading is the pipeline's job)."""
    # The current directory first (as mergekit), then the config file's directory.
    bases = [None] if config_dir is None else [None, config_dir]
    ref = None
    error: MergeAlignError | None = None
    for base_dir in bases:
        try:
            candidate = parse_model_ref(spec, base_dir=base_dir)
        except MergeAlignError as exc:
            error = error or exc
            continue
        if ref is None or candidate.is_local:
            ref = candidate
        if ref.is_local:
            break
    if ref is None:
        assert error is not None
        raise error
    if ref.is_local:
        assert ref.local_path is not None
        return ref.local_path, None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(ref.repo_id, revision=ref.revision, local_files_only=True)  # type: ignore[arg-type]
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise CheckpointError(
            f"model {spec!r}: not a local directory and not in the local Hugging Face cache; download it first "
            "(the pipeline's download step) or name a local directory"
        ) from None
    return Path(path), Path(path).name


def open_inputs(cfg: MergeConfig) -> tuple[MergeInput | None, list[MergeInput]]:
    """Open the base and every model / vector from headers only. CheckpointErrors are collected."""
    config_dir = cfg.source_path.parent if cfg.source_path else None
    errors: list[str] = []

    def _open(spec: str, label: str, kind: str, role: str | None = None) -> MergeInput | None:
        try:
            path, commit = locate(spec, config_dir)
            ckpt = Checkpoint(path, label=label)
            meta: dict[str, Any] = {}
            if kind == "vector":
                meta_path = path / VECTOR_META
                if not meta_path.exists():
                    raise CheckpointError(
                        f"{path}: not a task vector directory (no {VECTOR_META}; see `mergealign diff`)"
                    )
                try:
                    meta = json.loads(meta_path.read_text())
                except (OSError, json.JSONDecodeError) as exc:
                    raise CheckpointError(f"{meta_path}: unreadable ({exc})") from None
            return MergeInput(label, spec, path, ckpt, kind, commit, meta, role)
        except MergeAlignError as exc:
            errors.append(f"{label}: {exc}")
            return None

    base = _open(cfg.base_model, "base", "base") if cfg.base_model else None
    models = []
    for entry, label in zip(cfg.models, cfg.labels(), strict=True):
        kind = "vector" if entry.vector is not None else "model"
        models.append(_open(entry.ref, label, kind, entry.role))
    if errors:
        raise PreflightError(errors)
    return base, [m for m in models if m is not None]


# --------------------------------------------------------------------------- plan
@dataclass
class MergePlan:
    """Everything decided before the first tensor is read."""

    config: MergeConfig
    method: Any
    base: MergeInput | None
    models: list[MergeInput]
    preflight: PreflightResult
    shards: list[ShardPlan]
    out_dir: Path
    device: torch.device
    config_hash: str
    cast_dtype: torch.dtype | None
    n_layers: int | None
    files_source: MergeInput
    tokenizer_source: MergeInput
    input_hashes: Mapping[str, str] | None = None

    @property
    def reference(self) -> MergeInput:
        return self.base if self.base is not None else self.models[0]


def _find_input(
    ref: str | None, cfg: MergeConfig, base: MergeInput | None, models: Sequence[MergeInput]
) -> MergeInput | None:
    if ref is None:
        return None
    target = cfg.resolve_ref(ref)
    if base is not None and target == base.spec:
        return base
    return next((m for m in models if m.spec == target), None)


def _extra_file_bytes(src: MergeInput, tok: MergeInput) -> int:
    total = 64 << 10  # config, card, index, progress
    for name in TOKENIZER_FILES:
        p = tok.path / name
        if p.exists():
            total += p.stat().st_size
    return total


def _peek_finished_bytes(out_dir: Path, config_hash: str) -> int:
    p = out_dir / PROGRESS_FILE
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return 0
    if data.get("config_hash") != config_hash:
        return 0
    return sum(int(r.get("bytes", 0)) for r in (data.get("shards") or {}).values())


def plan_merge(
    config: MergeConfig | str | os.PathLike[str] | Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    device: str | None = None,
    input_hashes: Mapping[str, str] | None = None,
) -> MergePlan:
    """Load and validate the config, open inputs from headers, run preflight, plan shards. Writes nothing."""
    cfg = load_merge_config(config)
    from mergealign.methods import get_method

    method = get_method(cfg.merge_method)
    dev = resolve_device(device if device is not None else cfg.device)
    base, models = open_inputs(cfg)
    out = Path(out_dir)
    ref = base if base is not None else models[0]
    files_source = _find_input(cfg.files_source(), cfg, base, models) or ref
    tok_ref = cfg.vocab_source if cfg.vocab_policy == "merge_shared" else cfg.tokenizer_ref
    tokenizer_source = _find_input(tok_ref, cfg, base, models) or files_source
    cast = dtype_from_name(cfg.dtype) if cfg.dtype else None
    out_dtype = dtype_from_name(cfg.out_dtype) if cfg.out_dtype else cast

    ids = {m.spec: m.identity(input_hashes) for m in ([base] if base else []) + models}
    config_hash = cfg.config_hash({"inputs": ids, "engine": ENGINE_VERSION, "device": dev.type})
    inputs = []
    if base is not None:
        inputs.append(Input(base.label, base.checkpoint))
    for m in models:
        fp = (m.vector_meta.get("base") or {}).get("fingerprint") if m.kind == "vector" else None
        inputs.append(Input(m.label, m.checkpoint, is_vector=m.kind == "vector", base_fingerprint=fp))
    vocab_label = None
    if cfg.vocab_source is not None:
        src = _find_input(cfg.vocab_source, cfg, base, models)
        vocab_label = src.label if src else cfg.vocab_source
    result = preflight(
        inputs,
        out_dir=out,
        cast_dtype=cast,
        out_dtype=out_dtype,
        vocab_policy=cfg.vocab_policy,
        vocab_source=vocab_label,
        finished_bytes=_peek_finished_bytes(out, config_hash),
        extra_bytes=_extra_file_bytes(files_source, tokenizer_source),
    )
    shards = plan_shards(result.tensors, cfg.shard_bytes)
    n_layers = (ref.checkpoint.config.get("text_config") or ref.checkpoint.config).get("num_hidden_layers")
    return MergePlan(
        cfg,
        method,
        base,
        models,
        result,
        shards,
        out,
        dev,
        config_hash,
        cast,
        n_layers,
        files_source,
        tokenizer_source,
        input_hashes,
    )


# --------------------------------------------------------------------------- reading
READ_PIECE = 4 << 20  # bytes per pread into the reusable staging buffer


class TensorReader:
    """Reads rows of one checkpoint's tensors with pread into a reusable buffer and converts them to float32.

    Why not the mmap views: faulting gigabytes of page cache into our address space cost more system time
    than the whole merge's arithmetic (measured 8 s of page faults for 6.6 GB, against 0.9 s for read()),
    and the staging buffer is reused, so nothing new is allocated per chunk. `prefetch` asks the kernel to
    read the next tensor ahead (posix_fadvise WILLNEED) while the current one is merged.
    """

    def __init__(self, checkpoint: Checkpoint):
        self.ckpt = checkpoint
        self._fds: dict[str, int] = {}
        self._buf: torch.Tensor | None = None

    def _fd(self, file: str) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = os.open(self.ckpt.path / file, os.O_RDONLY)
            self._fds[file] = fd
        return fd

    def read(
        self, name: str, rows: slice | None, out: torch.Tensor | None = None, cast: torch.dtype | None = None
    ) -> torch.Tensor:
        """Rows [rows] of tensor `name` (all if None) as float32 (CPU), written into `out` when given.

        cast: round through this dtype first (mergekit's `dtype`: inputs are cast on load).
        """
        info = self.ckpt.tensors[name]
        shape = info.shape
        if rows is not None:
            shape = (rows.stop - rows.start, *shape[1:])
        numel = 1
        for d in shape:
            numel *= d
        dest = out if out is not None else torch.empty(shape, dtype=torch.float32)
        if dest.shape != torch.Size(shape):
            dest = dest.reshape(-1)[:numel].view(shape)
        flat = dest.reshape(-1)
        if self.ckpt.format != "safetensors" or info.offset < 0:  # pickle: already in memory
            src = self.ckpt.view(name)
            src = src[rows] if rows is not None else src
            flat.copy_(src.to(cast) if cast is not None else src.reshape(-1))
            return dest
        size = dtype_size(info.dtype)
        start = info.offset + ((rows.start * (info.numel // info.shape[0])) if rows is not None else 0) * size
        total = numel * size
        piece = max(size, READ_PIECE - READ_PIECE % size)
        if self._buf is None:
            self._buf = torch.empty(piece, dtype=torch.uint8)
        buf = self._buf
        view = memoryview(buf.numpy())
        fd = self._fd(info.file)
        done = 0
        while done < total:
            n = min(piece, total - done)
            got = os.preadv(fd, [view[:n]], start + done)
            if got != n:  # a short read: the file shrank since its header was checked
                raise CheckpointError(
                    f"{self.ckpt.path / info.file}: truncated while reading tensor {name!r}"
                )
            src = buf[:n].view(info.torch_dtype)
            if cast is not None and src.dtype != cast:
                src = src.to(cast)
            flat[done // size : (done + n) // size].copy_(src)
            done += n
        return dest

    def prefetch(self, name: str) -> None:
        info = self.ckpt.tensors.get(name)
        if info is None or self.ckpt.format != "safetensors" or info.offset < 0:
            return
        try:
            os.posix_fadvise(self._fd(info.file), info.offset, info.nbytes, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):  # advisory only
            pass

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._buf = None


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


class _NonFinite:
    """NaN / Inf detection on float32 blocks: one cheap sum, and an exact count only when it is not finite."""

    def __init__(self, policy: str):
        self.policy = policy
        self.warned: set[tuple[str, str]] = set()

    def check(self, name: str, label: str, x: torch.Tensor) -> None:
        if x.numel() == 0 or math.isfinite(float(x.sum(dtype=torch.float32))):
            return
        finite = torch.isfinite(x)
        if bool(finite.all()):  # the sum overflowed; the values are fine
            return
        n_nan = int(torch.isnan(x).sum())
        n_inf = int((~finite).sum()) - n_nan
        msg = f"tensor {name!r} of {label}: {n_nan} NaN and {n_inf} Inf value(s)"
        if self.policy == "warn":
            if (name, label) not in self.warned:
                self.warned.add((name, label))
                log.warning("%s (nan_policy: warn, merging anyway)", msg)
            return
        raise MergeAlignError(f"{msg}; fix the input, or set nan_policy: warn to merge anyway")


class _Engine:
    def __init__(self, plan: MergePlan, observers: Sequence[Observer]):
        self.plan = plan
        self.cfg = plan.config
        self.method = plan.method
        self.observers = list(observers)
        self.device = plan.device
        self.nonfinite = _NonFinite(self.cfg.nan_policy)
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


# --------------------------------------------------------------------------- output files
def _out_dtype_name(tensors: Sequence[OutTensor]) -> str | None:
    codes = {t.dtype for t in tensors if t.dtype in FLOAT_CODES}
    if len(codes) != 1:
        return None
    return str(ST_DTYPES[codes.pop()]).removeprefix("torch.")


def _chat_template(plan: MergePlan) -> tuple[str | None, str]:
    """(template text or None to keep the tokenizer source's, description)."""
    ct = plan.config.chat_template
    if ct is None or ct == "auto":
        return None, "from the tokenizer source"
    if ct in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[ct], f"built-in {ct}"
    src = _find_input(ct, plan.config, plan.base, plan.models)
    if src is not None:
        p = src.path / "chat_template.jinja"
        if p.exists():
            return p.read_text(), f"copied from {src.label}"
        cfg_path = src.path / "tokenizer_config.json"
        if cfg_path.exists():
            text = json.loads(cfg_path.read_text()).get("chat_template")
            if isinstance(text, str):
                return text, f"copied from {src.label}"
        raise MergeAlignError(f"chat_template: {ct!r} has no chat template")
    return ct, "given in the config"


def write_model_files(plan: MergePlan) -> None:
    """config.json (patched), tokenizer files, chat template, generation_config.json, README.md model card."""
    out = plan.out_dir
    config = json.loads(json.dumps(plan.files_source.checkpoint.config))  # deep copy
    if not config.get("architectures"):
        for inp in ([plan.base] if plan.base else []) + plan.models:
            if inp.checkpoint.architectures:
                config["architectures"] = inp.checkpoint.architectures
                break
    dtype_name = _out_dtype_name(plan.preflight.tensors)
    if dtype_name:
        config["dtype"] = dtype_name
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name
    if plan.preflight.vocab_size is not None:
        target = config.get("text_config", config)
        target["vocab_size"] = plan.preflight.vocab_size
    atomic_write_json(out / "config.json", config)

    template, _ = _chat_template(plan)
    for name in TOKENIZER_FILES:
        src = plan.tokenizer_source.path / name
        if not src.exists():
            continue
        data = src.read_bytes()
        if template is not None and name == "tokenizer_config.json":
            tok_cfg = json.loads(data)
            if "chat_template" in tok_cfg:
                tok_cfg["chat_template"] = template
                data = (json.dumps(tok_cfg, indent=2) + "\n").encode()
        if template is not None and name in ("chat_template.jinja", "chat_template.json"):
            continue
        _atomic_bytes(out / name, data)
    if template is not None:
        atomic_write_text(out / "chat_template.jinja", template)
    gen = plan.files_source.path / GENERATION_CONFIG
    if gen.exists():
        _atomic_bytes(out / GENERATION_CONFIG, gen.read_bytes())
    atomic_write_text(out / "README.md", model_card(plan))


def _atomic_bytes(path: Path, data: bytes) -> None:
    from mergealign.writer import atomic_write_bytes

    atomic_write_bytes(path, data)


def model_card(plan: MergePlan) -> str:
    cfg = plan.config
    method = plan.method
    hub = [i.spec for i in ([plan.base] if plan.base else []) + plan.models if i.commit]
    tags = ["merge", "mergealign"] + ([cfg.merge_method] if cfg.merge_method != "mergealign" else [])
    front: dict[str, Any] = {"library_name": "transformers", "tags": tags}
    if plan.base is not None and plan.base.commit:
        front["base_model"] = plan.base.spec
    elif hub:
        front["base_model"] = hub
    rows = []
    for inp in ([plan.base] if plan.base else []) + plan.models:
        kind = (
            "base"
            if inp.kind == "base"
            else ("task vector" if inp.kind == "vector" else (inp.role or "model"))
        )
        rows.append(f"| {kind} | `{inp.spec}` | {inp.identity(plan.input_hashes)} |")
    globals_ = resolve_params(plan.config.method_inputs(method)[0], "", plan.n_layers)
    try:
        resolved = method.resolved_globals(globals_)
    except Exception:  # a card must not fail a finished merge
        resolved = globals_
    given = cfg.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    template_note = _chat_template(plan)[1]
    parts = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        "# Merged model",
        "",
        f"Merged with mergealign {mergealign.__version__}, method `{cfg.merge_method}`: {getattr(method, 'formula', '')}",
        "",
        "## Inputs",
        "",
        "| role | model | identity |",
        "|---|---|---|",
        *rows,
        "",
        "## Parameters",
        "",
        "Resolved global parameters: `" + json.dumps(resolved, sort_keys=True, default=str) + "`",
        "",
        "Configuration as given:",
        "",
        "```yaml",
        yaml.safe_dump(given, sort_keys=False).strip(),
        "```",
        "",
        "## Output",
        "",
        f"- tensors: {len(plan.preflight.tensors)} in {len(plan.shards)} shard(s), dtype "
        f"{_out_dtype_name(plan.preflight.tensors) or 'mixed'}",
        f"- config, generation config from `{plan.files_source.spec}`; tokenizer from `{plan.tokenizer_source.spec}`; "
        f"chat template {template_note}",
        f"- seed {cfg.seed}; config hash `{plan.config_hash}`",
        "",
    ]
    return "\n".join(parts)


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
        summary = _execute(plan, observers, progress, overwrite)
    summary.wall_s = time.perf_counter() - t0
    summary.peak_rss_anon_bytes = mem.peak
    log.info("%s", summary.line())
    return summary


def _execute(plan: MergePlan, observers: Sequence[Observer], progress: bool, overwrite: bool) -> MergeSummary:
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
    threads = torch.get_num_threads()
    torch.set_num_threads(compute_threads(plan.device))
    try:
        with torch.inference_mode():
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
        torch.set_num_threads(threads)
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
