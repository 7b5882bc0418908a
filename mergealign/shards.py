"""The layout of a safetensors output, decided before a byte is written: every output tensor (name, shape,
dtype), the shards they are split into by byte budget, each shard's header, and size strings ('2G').

Preflight computes the output tensors, the writer (mergealign.writer) streams their bytes into these shards.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mergealign.checkpoint import SAFETENSORS_SINGLE, dtype_size

DEFAULT_SHARD_BYTES = 2 * 1024**3
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)


# --------------------------------------------------------------------------- sizes
def parse_size(value: int | str) -> int:
    """Bytes from an int or '500M', '2G', '1.5GB', '64KiB' (K/M/G/T = powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (use bytes or a K/M/G/T suffix, e.g. 2G)")
    n = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ")
    if n < 1:
        raise ValueError(f"size must be positive, got {value!r}")
    return int(n)


# --------------------------------------------------------------------------- output tensors and shards
@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code, e.g. "BF16"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


@dataclass(frozen=True)
class ShardPlan:
    file: str
    tensors: tuple[OutTensor, ...]

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: Sequence[OutTensor], max_bytes: int = DEFAULT_SHARD_BYTES) -> list[ShardPlan]:
    """Split tensors, in order, into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    groups: list[list[OutTensor]] = []
    size = 0
    for t in tensors:
        if not groups or (size + t.nbytes > max_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    n = len(groups)
    if n == 1:
        return [ShardPlan(SAFETENSORS_SINGLE, tuple(groups[0]))]
    return [ShardPlan(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]


def safetensors_header(tensors: Iterable[OutTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes before the data: 8-byte length + JSON header padded with spaces to a multiple of 8."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
