"""Sharded, atomic, resumable safetensors output, plus the files that make it a Hugging Face model directory.

Why we write the safetensors format ourselves: `safetensors.torch.save_file` wants every tensor of a shard
in memory at once. We know every output tensor's name, shape and dtype from the input headers before
merging, so each shard's header is written first and the tensors' bytes are appended one chunk at a time
as the merge produces them: a shard never sits whole in memory. The format is simple (8-byte little-endian
header length, JSON header with dtype/shape/data_offsets, space padding to 8 bytes, raw data) and the
result is read back by the official `safetensors` library in the tests.

Layout and life cycle of an output directory OUT:
- shards are planned up front by byte budget (mergealign.shards): one shard -> `model.safetensors` (HF convention: no index);
  n shards -> `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`.
- each shard is written to `<name>.tmp`, fsync'ed, then renamed to its final name; `.mergealign-progress.json`
  (written atomically) records the config hash and every finished shard with its size and sha256.
- the completion marker is written last: the index for sharded output; for a single shard the weights file
  itself, renamed into place after config, tokenizer and model card. A directory without it is never a
  finished model (transformers cannot load it either).
- on a re-run with the same config hash, finished shards whose sha256 verifies are kept (resume); the rest
  are redone. A different config hash is an error unless overwrite=True.
- a full disk (ENOSPC/EDQUOT) removes the shard being written and raises a MergeAlignError; finished
  shards stay, so freeing space and re-running resumes.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergealign.checkpoint import GENERATION_CONFIG, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, TOKENIZER_FILES
from mergealign.errors import MergeAlignError
from mergealign.files import atomic_write_json, fsync_dir, is_disk_full, sha256_file
from mergealign.shards import OutTensor, ShardPlan, safetensors_header

log = logging.getLogger(__name__)

PROGRESS_FILE = ".mergealign-progress.json"
LOCK_FILE = ".mergealign-lock"
PROGRESS_VERSION = 1
TMP_SUFFIX = ".tmp"
# Files a model directory may hold that OUT --overwrite removes (besides shards and temp files).
_MODEL_FILES = (
    "config.json",
    GENERATION_CONFIG,
    "README.md",
    SAFETENSORS_INDEX,
    PROGRESS_FILE,
    *TOKENIZER_FILES,
)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is already contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


# --------------------------------------------------------------------------- shard writer
WRITEBACK_EVERY = 32 << 20  # start the disk write of each 32 MB as it is written, so fsync finds little left
INFLIGHT_BYTES = 16 << 20  # bytes queued for the writer thread before the merge waits for it
_SYNC_FILE_RANGE_WRITE = 2
_libc: Any = None


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Linux sync_file_range(SYNC_FILE_RANGE_WRITE): begin writing a range to disk without waiting.

    Spreads the disk writes over the merge instead of leaving gigabytes of dirty pages for the final fsync.
    A no-op where the call does not exist (the fsync at the end of the shard still makes it durable).
    """
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


class ShardFile:
    """One shard being written: header first, then each tensor's bytes in plan order, chunk by chunk.

    `account()` checks the plan order (caller's thread); `write_bytes()` appends and hashes (writer thread).
    """

    def __init__(self, out_dir: Path, plan: ShardPlan, metadata: dict[str, str]):
        self.plan = plan
        self.path = out_dir / plan.file
        self.tmp = out_dir / (plan.file + TMP_SUFFIX)
        self._sha = hashlib.sha256()
        self._order = iter(plan.tensors)
        self._current: OutTensor | None = None
        self._left = 0
        self.size = 0
        self._synced = 0
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self.write_bytes(safetensors_header(plan.tensors, metadata))
        except BaseException:
            self.abort()
            raise

    def write_bytes(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self._sha.update(view)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self.size += n
        if self.size - self._synced >= WRITEBACK_EVERY:
            _start_writeback(self._fd, self._synced, self.size - self._synced)
            self._synced = self.size

    def account(self, name: str, nbytes: int) -> None:
        """Check that the next `nbytes` belong to tensor `name` in plan order (the whole tensor or a chunk)."""
        if self._left == 0:
            self._current = next(self._order, None)
            if self._current is None or self._current.name != name:
                expected = self._current.name if self._current else "nothing more"
                raise RuntimeError(f"{self.plan.file}: got tensor {name!r}, plan expects {expected}")
            self._left = self._current.nbytes
        elif self._current is None or self._current.name != name:
            raise RuntimeError(
                f"{self.plan.file}: tensor {self._current and self._current.name!r} is incomplete"
            )
        if nbytes > self._left:
            raise RuntimeError(f"{self.plan.file}: too many bytes for tensor {name!r}")
        self._left -= nbytes

    def check_complete(self) -> None:
        if self._left or next(self._order, None) is not None:
            raise RuntimeError(f"{self.plan.file}: closed before every tensor was written")

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()

    def sync_and_close(self) -> None:
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = -1

    def abort(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1
        self.tmp.unlink(missing_ok=True)


@dataclass
class ResumeState:
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> {"sha256", "bytes"}
    complete: bool = False


class OutputDir:
    """Owns OUT: checks what is there, skips verified finished shards, writes shards and files atomically.

    Bytes are written, hashed and flushed by one background thread (os.write and sha256 release the GIL),
    so disk I/O overlaps the merge; the caller only waits when more than INFLIGHT_BYTES are queued. The
    writer thread's first error (e.g. ENOSPC) is raised in the caller at its next write / finish / wait.
    """

    def __init__(self, path: str | os.PathLike[str], config_hash: str, *, overwrite: bool = False):
        self.path = Path(path)
        self.config_hash = config_hash
        self.overwrite = overwrite
        self.state = ResumeState()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._open: ShardFile | None = None
        self._single: dict[str, Any] | None = None
        self._cv = threading.Condition()
        self._inflight = 0
        self._tasks = 0
        self._error: tuple[BaseException, Path] | None = None
        self._lock_fd = -1

    # ------------------------------------------------------------------ existing content
    def prepare(self, shards: Sequence[ShardPlan]) -> ResumeState:
        """Create OUT or validate what it holds; return finished shards to skip (verified by sha256)."""
        self.path.mkdir(parents=True, exist_ok=True)
        entries = [p for p in self.path.iterdir() if p.name != LOCK_FILE]
        if not (self.path / PROGRESS_FILE).exists() and entries and not self.overwrite:
            names = ", ".join(sorted(p.name for p in entries)[:5])
            raise MergeAlignError(
                f"{self.path} exists and is not a mergealign output in progress (holds {names}); "
                "use --overwrite or another directory"
            )
        self._lock()
        try:
            return self._prepare_locked(shards)
        except BaseException:
            self.close()
            raise

    def _prepare_locked(self, shards: Sequence[ShardPlan]) -> ResumeState:
        progress = self._read_progress()
        if progress is not None and progress.get("config_hash") != self.config_hash:
            if not self.overwrite:
                raise MergeAlignError(
                    f"{self.path} holds a merge of a different config (config hash "
                    f"{str(progress.get('config_hash'))[:12]}…, this one {self.config_hash[:12]}…); "
                    "use --overwrite or another directory"
                )
            progress = None
        if progress is None:
            if self.overwrite:
                self._clear()
            self._write_progress()
            return self.state
        # Same config: keep what verifies, redo the rest.
        self._remove_temp_files()
        planned = {s.file: s for s in shards}
        for file, rec in (progress.get("shards") or {}).items():
            target = self.path / file
            ok = (
                file in planned
                and target.is_file()
                and target.stat().st_size == rec.get("bytes")
                and sha256_file(target) == rec.get("sha256")
            )
            if ok:
                self.state.finished[file] = rec
            else:
                log.info("shard %s does not verify; it will be rewritten", file)
                target.unlink(missing_ok=True)
        self.state.complete = bool(progress.get("complete")) and len(self.state.finished) == len(shards)
        self._write_progress()
        if self.state.finished:
            log.info(
                "resuming: %d of %d shard(s) already finished in %s",
                len(self.state.finished),
                len(shards),
                self.path,
            )
        return self.state

    def _lock(self) -> None:
        """One writer per OUT: an exclusive flock, released by close() or when the process dies."""
        import fcntl

        fd = os.open(self.path / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MergeAlignError(
                f"{self.path} is being written by another process (it holds {LOCK_FILE})"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        """Stop the writer thread and release OUT's lock (finalize() and abort() call it)."""
        self._pool.shutdown(wait=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _read_progress(self) -> dict[str, Any] | None:
        p = self.path / PROGRESS_FILE
        if not p.exists():
            return None
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("%s is unreadable; treating the directory as foreign", p)
            return {"config_hash": None}
        if not isinstance(data, dict) or data.get("version") != PROGRESS_VERSION:
            return {"config_hash": None}
        return data

    def _write_progress(self) -> None:
        atomic_write_json(
            self.path / PROGRESS_FILE,
            {
                "version": PROGRESS_VERSION,
                "config_hash": self.config_hash,
                "shards": dict(sorted(self.state.finished.items())),
                "complete": self.state.complete,
            },
        )

    def _remove_temp_files(self) -> None:
        for p in self.path.glob("*" + TMP_SUFFIX):
            p.unlink(missing_ok=True)

    def _clear(self) -> None:
        """--overwrite: remove what a model directory of ours may hold; leave anything else alone."""
        for p in self.path.iterdir():
            if p.is_file() and (p.name in _MODEL_FILES or p.name.endswith((".safetensors", TMP_SUFFIX))):
                p.unlink()

    # ------------------------------------------------------------------ shards
    def _submit(self, fn: Callable[[], None], nbytes: int, where: Path) -> None:
        """Run fn on the writer thread, in order; wait while the queue holds more than INFLIGHT_BYTES."""
        with self._cv:
            while self._inflight and self._inflight + nbytes > INFLIGHT_BYTES and self._error is None:
                self._cv.wait()
            self._raise_if_failed()
            self._inflight += nbytes
            self._tasks += 1

        def run() -> None:
            try:
                if self._error is None:  # after a failure the rest of the queue is dropped
                    fn()
            except BaseException as exc:  # handed to the caller's thread
                with self._cv:
                    if self._error is None:
                        self._error = (exc, where)
            finally:
                with self._cv:
                    self._inflight -= nbytes
                    self._tasks -= 1
                    self._cv.notify_all()

        self._pool.submit(run)

    def _raise_if_failed(self) -> None:
        if self._error is None:
            return
        exc, where = self._error
        if isinstance(exc, OSError):
            if self._open is not None:
                self._open.abort()
                self._open = None
            self._raise_write_error(exc, where)
        raise exc

    def open_shard(self, plan: ShardPlan, metadata: dict[str, str] | None = None) -> ShardFile:
        self._raise_if_failed()
        try:
            self._open = ShardFile(self.path, plan, metadata or {"format": "pt"})
        except OSError as exc:
            self._raise_write_error(exc, self.path / (plan.file + TMP_SUFFIX))
        return self._open

    def write(self, shard: ShardFile, name: str, chunk: torch.Tensor) -> None:
        """Queue the bytes of `chunk` (the next part of tensor `name`); the tensor must not change afterwards."""
        if chunk.device.type != "cpu":
            chunk = chunk.cpu()
        chunk = chunk.detach().contiguous()
        nbytes = chunk.numel() * chunk.element_size()
        shard.account(name, nbytes)
        self._submit(lambda: shard.write_bytes(tensor_bytes(chunk)), nbytes, shard.tmp)

    def finish_shard(self, shard: ShardFile, *, keep_temp_name: bool = False) -> None:
        """Queue fsync + rename + progress record for a fully written shard (on the writer thread).

        keep_temp_name: the single-shard case, whose rename is the completion marker (see finalize()).
        """
        shard.check_complete()
        self._open = None

        def finish() -> None:
            try:
                shard.sync_and_close()
                if not keep_temp_name:
                    os.replace(shard.tmp, shard.path)
                    fsync_dir(self.path)
            except BaseException:
                shard.abort()
                raise
            record = {"sha256": shard.sha256, "bytes": shard.size}
            if keep_temp_name:
                self._single = record
            else:
                self.state.finished[shard.plan.file] = record
                self._write_progress()

        self._submit(finish, 0, shard.tmp)

    def wait(self) -> None:
        """Wait until the writer thread has done everything queued; raise its error if it had one."""
        with self._cv:
            while self._tasks:
                self._cv.wait()
        self._raise_if_failed()

    def abort(self) -> None:
        """After an error: drop the shard in progress, drain the writer, remove every temp file."""
        with self._cv:  # shards queued complete before the error still finish (and resume later)
            while self._tasks:
                self._cv.wait()
        if self._open is not None:
            self._open.abort()
            self._open = None
        self._remove_temp_files()
        self.close()

    def _raise_write_error(self, exc: OSError, where: Path) -> None:
        where.unlink(missing_ok=True)
        if is_disk_full(exc):
            usage = shutil.disk_usage(self.path)
            raise MergeAlignError(
                f"disk full while writing {where.name} in {self.path} ({usage.free} bytes free); the partial "
                "file was removed. Free space and re-run the same command: finished shards are kept and resumed."
            ) from None
        raise MergeAlignError(f"cannot write {where}: {exc}") from None

    # ------------------------------------------------------------------ end
    def finalize(self, shards: Sequence[ShardPlan], write_files: Callable[[], None]) -> list[Path]:
        """Write the model's other files, then the completion marker (index, or the single shard's rename)."""
        self.wait()
        write_files()
        if len(shards) == 1:
            only = shards[0]
            tmp = self.path / (only.file + TMP_SUFFIX)
            if self._single is not None and tmp.exists():  # written in this run
                os.replace(tmp, self.path / only.file)
                fsync_dir(self.path)
                self.state.finished[only.file] = self._single
        else:
            weight_map = {t.name: s.file for s in shards for t in s.tensors}
            total = sum(s.data_bytes for s in shards)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write_json(self.path / SAFETENSORS_INDEX, index, ensure_ascii=True)
        self.state.complete = True
        self._write_progress()
        self.close()
        return sorted(p for p in self.path.iterdir() if p.is_file() and p.name != LOCK_FILE)


def output_is_finished(path: str | os.PathLike[str]) -> bool:
    """True when OUT holds a finished merge: the progress file says complete and the marker file exists."""
    p = Path(path)
    prog = p / PROGRESS_FILE
    if not prog.exists():
        return (p / SAFETENSORS_INDEX).exists() or (p / SAFETENSORS_SINGLE).exists()
    try:
        data = json.loads(prog.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    marker = SAFETENSORS_INDEX if len(data.get("shards") or {}) > 1 else SAFETENSORS_SINGLE
    return bool(data.get("complete")) and (p / marker).exists()
