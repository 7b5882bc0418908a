"""Files, written once for the whole library: hashing, canonical JSON, atomic writes, JSONL.

Every output goes through a temp name in the target's own directory, is fsynced, then renamed over the
target: a crash leaves the old file or the new one, never half of either. A full disk is an error that
names the file (the partial temp file is removed).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mergealign.errors import MergeAlignError

HASH_CHUNK = 8 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# --------------------------------------------------------------------------- hashing
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str], *, fs: Any = None) -> str:
    """sha256 of a file, read in 8 MB blocks; `fs`: an fsspec filesystem for remote paths."""
    digest = hashlib.sha256()
    opener = fs.open if fs is not None else open
    with opener(path, "rb") as handle:
        while block := handle.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _json_default(value: Any) -> Any:
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"cannot write a value of type {type(value).__name__} as canonical JSON")


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, no NaN: the same value always gives the same text (for keys and hashes).
    Pydantic models, paths and sets are written as plain values."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_json_default)  # fmt: skip


def json_safe(value: Any) -> Any:
    """A value with non-finite floats (NaN, ±Inf) as None, so it is valid JSON; mappings' keys as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def sha256_json(value: Any) -> str:
    return sha256_text(canonical_json(value))


# --------------------------------------------------------------------------- atomic writes
def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it survives a crash (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_chunks(path: str | os.PathLike[str], chunks: Iterable[bytes | str]) -> Path:
    """Stream `chunks` (bytes or text, UTF-8) into `path` atomically; the parent directory is created."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk.encode("utf-8") if isinstance(chunk, str) else chunk)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(exc):
            raise MergeAlignError(f"disk full while writing {target}; the partial file was removed") from None
        raise
    fsync_dir(target.parent)
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write_chunks(path, [data])


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_chunks(path, [text])


def atomic_write_json(
    path: str | os.PathLike[str], value: Any, *, indent: int | None = 2, ensure_ascii: bool = False
) -> Path:
    """Readable JSON (keys in the order given) with a final newline; `ensure_ascii` escapes non-ASCII text
    (the bytes transformers writes, kept for model files such as config.json)."""
    return atomic_write_text(path, json.dumps(value, indent=indent, ensure_ascii=ensure_ascii) + "\n")


# --------------------------------------------------------------------------- JSONL
def jsonl_line(row: dict[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    """Write rows atomically, one JSON object per line; returns how many."""
    count = 0

    def lines() -> Iterator[str]:
        nonlocal count
        for row in rows:
            count += 1
            yield jsonl_line(row)

    atomic_write_chunks(path, lines())
    return count


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file; a malformed line is an error naming the file and line number."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MergeAlignError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise MergeAlignError(
                    f"{path}, line {number}: expected a JSON object, got {type(row).__name__}"
                )
            yield row


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    return list(iter_jsonl(path))


def read_complete_jsonl_rows(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of an append-only file that a killed writer may have left with a torn last line.

    Only newline-terminated lines that parse as JSON objects count; anything after the last good line is
    a write that did not finish and is dropped.
    """
    rows: list[dict[str, Any]] = []
    with open(path, "rb") as handle:
        data = handle.read()
    for raw in data.split(b"\n")[:-1]:  # the piece after the last newline was never completed
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
