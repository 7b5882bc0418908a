"""Checkpoints: model directories read lazily, one tensor at a time (hub references: mergealign.model_refs).

A `Checkpoint` knows every tensor's name, shape, dtype and file from the safetensors headers alone, so
preflight checks run before a single tensor is read. Pickle checkpoints (*.bin, *.pt) are refused unless
`allow_pickle` is set, and then loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergealign.errors import CheckpointError, MergeAlignError

log = logging.getLogger(__name__)

# safetensors dtype codes -> torch dtypes and element sizes.
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# A header larger than this is corrupt, not a model (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000

# Files that travel with a model: tokenizer, chat template, generation settings.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """'bfloat16' / 'bf16' / 'BF16' / torch.bfloat16 -> torch.bfloat16."""
    if isinstance(name, torch.dtype):
        return name
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "fp32": "float32",
        "float": "float32",
    }
    key = name.strip().lower()
    if name.upper() in ST_DTYPES:
        return ST_DTYPES[name.upper()]
    key = aliases.get(key, key)
    dtype = getattr(torch, key, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise MergeAlignError(f"unknown dtype {name!r}: use one of float32, bfloat16, float16")
    return dtype


def dtype_size(code: str) -> int:
    return torch.empty((), dtype=ST_DTYPES[code]).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its header describes it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code, e.g. "BF16"
    file: str  # file name inside the checkpoint directory
    offset: int = -1  # absolute byte offset of the data in `file` (safetensors); -1 if unknown (pickle)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype]


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and check one safetensors header without reading tensor data.

    Returns (header without __metadata__, header length). Truncation is caught here: the last data
    offset must end exactly at the end of the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header (header says {n} bytes, file has {size})"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    end = 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        numel = 1
        for d in shape:
            numel *= d
        if stop - begin != numel * dtype_size(dtype) or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} has data offsets that do not match its shape")
        end = max(end, stop)
    if end != data_len:
        raise CheckpointError(
            f"{path}: truncated or corrupt safetensors file (tensors need {end} data bytes, file has {data_len})"
        )
    return header, n


class Checkpoint:
    """A model directory, opened from headers; tensors are read lazily, one at a time."""

    def __init__(self, path: str | os.PathLike[str], *, allow_pickle: bool = False, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint directory not found")
        self.config: dict[str, Any] = self._read_config()
        self._handles: dict[str, Any] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._pickled: dict[str, dict[str, torch.Tensor]] = {}
        self.format, self.tensors = self._scan(allow_pickle)
        if not self.tensors:
            raise CheckpointError(f"{self.path}: no tensors found")

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors)"

    # ----------------------------------------------------------------- discovery
    def _read_config(self) -> dict[str, Any]:
        cfg = self.path / "config.json"
        if not cfg.exists():
            return {}
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg}: not valid JSON ({exc})") from None

    def _scan(self, allow_pickle: bool) -> tuple[str, dict[str, TensorInfo]]:
        index = self.path / SAFETENSORS_INDEX
        if index.exists():
            return "safetensors", self._scan_index(index)
        single = self.path / SAFETENSORS_SINGLE
        if single.exists():
            return "safetensors", self._scan_files([SAFETENSORS_SINGLE])
        loose = sorted(p.name for p in self.path.glob("*.safetensors"))
        if loose:
            return "safetensors", self._scan_files(loose)
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            if not allow_pickle:
                raise CheckpointError(
                    f"{self.path}: only pickle weights found ({', '.join(pickles)}); pickle can run code when "
                    "loaded, so it is refused. Convert to safetensors, or set allow_pickle (loads with "
                    "torch.load(weights_only=True))."
                )
            return "pickle", self._scan_pickles(pickles)
        raise CheckpointError(f"{self.path}: no model weights (*.safetensors) found")

    def _scan_index(self, index: Path) -> dict[str, TensorInfo]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: corrupt index ({exc!r})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (self.path / f).exists()]
        if missing:
            raise CheckpointError(f"{index}: points to missing shard(s): {', '.join(missing)}")
        tensors = self._scan_files(files)
        listed, found = set(weight_map), set(tensors)
        problems = [
            f"index lists {n!r} in {weight_map[n]} but that shard does not hold it"
            for n in sorted(listed - found)
        ]
        problems += [
            f"shard {tensors[n].file} holds {n!r} that the index does not list"
            for n in sorted(found - listed)
        ]
        problems += [
            f"index puts {n!r} in {weight_map[n]} but it is in {tensors[n].file}"
            for n in sorted(listed & found)
            if weight_map[n] != tensors[n].file
        ]
        if problems:
            raise CheckpointError(f"{index}: inconsistent with its shards: " + "; ".join(problems[:10]))
        return tensors

    def _scan_files(self, files: Iterable[str]) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for fname in files:
            header, n = read_safetensors_header(self.path / fname)
            for name, entry in header.items():
                if name in tensors:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} is in both {tensors[name].file} and {fname}"
                    )
                offset = 8 + n + entry["data_offsets"][0]
                tensors[name] = TensorInfo(name, tuple(entry["shape"]), entry["dtype"], fname, offset)
        return tensors

    def _scan_pickles(self, files: list[str]) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for fname in files:
            try:
                state = torch.load(self.path / fname, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
                raise CheckpointError(
                    f"{self.path / fname}: cannot load with weights_only=True ({exc})"
                ) from None
            if not isinstance(state, Mapping):
                raise CheckpointError(f"{self.path / fname}: not a state dict")
            self._pickled[fname] = dict(state)
            for name, t in state.items():
                if not isinstance(t, torch.Tensor) or t.dtype not in TORCH_TO_ST:
                    continue
                tensors[name] = TensorInfo(name, tuple(t.shape), TORCH_TO_ST[t.dtype], fname)
        return tensors

    # ----------------------------------------------------------------- reading
    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (CPU). safetensors files are memory-mapped, so only its pages are touched."""
        try:
            info = self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None
        if self.format == "pickle":
            return self._pickled[info.file][name]
        handle = self._handles.get(info.file)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(str(self.path / info.file), framework="pt", device="cpu")
            self._handles[info.file] = handle
        return handle.get_tensor(name)

    def content_fingerprint(self, sample_bytes: int = 4096) -> str:
        """sha256 over header_fingerprint() and the first and last `sample_bytes` of every tensor's data.

        Cheap (a few KB per tensor) yet content-sensitive: two fine-tunes of one base share every header
        (same header_fingerprint) but not their bytes. Used for config hashes and task-vector bases.
        """
        h = hashlib.sha256(self.header_fingerprint().encode())
        for name in sorted(self.tensors):
            info = self.tensors[name]
            if self.format != "safetensors" or info.offset < 0:
                raw = self.get(name).contiguous().view(-1).view(torch.uint8)
                h.update(raw[:sample_bytes].numpy().tobytes())
                h.update(raw[-sample_bytes:].numpy().tobytes())
                continue
            mm = self._map(info.file)
            end = info.offset + info.nbytes
            h.update(mm[info.offset : min(end, info.offset + sample_bytes)])
            h.update(mm[max(info.offset, end - sample_bytes) : end])
        return h.hexdigest()

    def view(self, name: str) -> torch.Tensor:
        """Zero-copy, copy-on-write view of one tensor in its memory-mapped file (CPU, stored dtype).

        Pages are file-backed (reclaimable), not anonymous memory, and are read only when touched, so a
        caller can convert a huge tensor chunk by chunk with flat memory. Do not write to it: writes would
        allocate private pages (the file is never changed). Falls back to get() for pickles and for data
        that is not aligned to its element size.
        """
        try:
            info = self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None
        size = dtype_size(info.dtype)
        if self.format != "safetensors" or info.offset < 0 or info.offset % size or info.numel == 0:
            return self.get(name)
        mm = self._map(info.file)
        flat = torch.frombuffer(mm, dtype=info.torch_dtype, count=info.numel, offset=info.offset)
        return flat.view(info.shape)

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's pages in the background (madvise WILLNEED)."""
        info = self.tensors.get(name)
        if info is None or self.format != "safetensors" or info.offset < 0 or not info.nbytes:
            return
        mm = self._map(info.file)
        page = mmap.PAGESIZE
        start = info.offset - info.offset % page
        try:
            mm.madvise(mmap.MADV_WILLNEED, start, info.offset + info.nbytes - start)
        except (AttributeError, OSError, ValueError):  # advisory only
            pass

    def _map(self, fname: str) -> mmap.mmap:
        mm = self._maps.get(fname)
        if mm is None:
            with open(self.path / fname, "rb") as f:
                # ACCESS_COPY: a private mapping that torch.frombuffer accepts as writable; never written.
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[fname] = mm
        return mm

    def close(self) -> None:
        self._handles.clear()
        # Views may still reference a map; dropping our references lets it close when they are gone.
        self._maps.clear()
        self._pickled.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- facts
    @property
    def architectures(self) -> list[str]:
        return list(self.config.get("architectures") or [])

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def tie_word_embeddings(self) -> bool:
        cfg = self.config.get("text_config", self.config)
        return bool(cfg.get("tie_word_embeddings", False))

    @property
    def vocab_size(self) -> int | None:
        cfg = self.config.get("text_config", self.config)
        return cfg.get("vocab_size")

    @property
    def weight_files(self) -> list[Path]:
        return [self.path / f for f in sorted({t.file for t in self.tensors.values()})]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def has_chat_template(self) -> bool:
        if (self.path / "chat_template.jinja").exists() or (self.path / "chat_template.json").exists():
            return True
        tok_cfg = self.path / "tokenizer_config.json"
        if tok_cfg.exists():
            try:
                return bool(json.loads(tok_cfg.read_text()).get("chat_template"))
            except json.JSONDecodeError:
                return False
        return False

    def header_fingerprint(self) -> str:
        """sha256 over the config and every tensor's name, shape, dtype and the weight files' sizes.

        Cheap identity for a local directory (the pipeline records full file sha256s in its manifests).
        """
        h = hashlib.sha256()
        h.update(json.dumps(self.config, sort_keys=True).encode())
        for name in sorted(self.tensors):
            t = self.tensors[name]
            h.update(f"{name}|{t.shape}|{t.dtype}\n".encode())
        for f in self.weight_files:
            h.update(f"{f.name}:{f.stat().st_size}\n".encode())
        return h.hexdigest()
