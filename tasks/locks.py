"""Per-key file locks for Prefect transactions (SERIALIZABLE isolation): a lock dies with its process."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from prefect.locking.protocol import LockManager

log = logging.getLogger(__name__)

_HELD: dict[tuple[str, str], tuple[int, str]] = {}  # (lock dir, key) -> (fd, holder); per process
_HELD_GUARD = threading.Lock()


class ArtifactLockManager(LockManager):
    """File locks (flock) per key in a directory; a lock dies with its process.

    Prefect's FileSystemLockManager marks a lock by a file's existence, so a run killed while holding it (a
    merge killed mid-way) leaves a lock that blocks every later run forever. flock is released by the kernel
    when its holder dies. State lives in a per-process table, so copies of this object (Prefect deep-copies
    cache policies) agree on who holds what.
    """

    def __init__(self, lock_files_directory: str | os.PathLike[str]):
        self.lock_files_directory = Path(lock_files_directory).expanduser().resolve()

    def __deepcopy__(self, memo: dict[int, Any]) -> ArtifactLockManager:
        return ArtifactLockManager(self.lock_files_directory)

    def _path(self, key: str) -> Path:
        return self.lock_files_directory / f"{key}.lock"

    def _id(self, key: str) -> tuple[str, str]:
        return (str(self.lock_files_directory), key)

    def _try(self, key: str, holder: str) -> bool:
        self.lock_files_directory.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:  # the file may have been unlinked by its last holder after we opened it: then retry
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return False
        info = {"holder": holder, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD[self._id(key)] = (fd, holder)
        return True

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        waited_msg = False
        while True:
            with _HELD_GUARD:
                held = _HELD.get(self._id(key))
                if held is not None and held[1] == holder:
                    return True
                if held is None and self._try(key, holder):
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if not waited_msg:
                log.info("waiting for another run that holds the lock on %s", key[:40])
                waited_msg = True
            time.sleep(0.2)

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(
            lambda: self.acquire_lock(key, holder, acquire_timeout, hold_timeout)
        )

    def release_lock(self, key: str, holder: str) -> None:
        with _HELD_GUARD:
            held = _HELD.get(self._id(key))
            if held is None or held[1] != holder:
                raise ValueError(f"No lock held by {holder} for transaction with key {key}")
            fd, _ = held
            self._path(key).unlink(missing_ok=True)  # unlink while still holding, then release
            os.close(fd)
            del _HELD[self._id(key)]

    def is_locked(self, key: str) -> bool:
        with _HELD_GUARD:
            if self._id(key) in _HELD:
                return True
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        with _HELD_GUARD:
            held = _HELD.get(self._id(key))
        return held is not None and held[1] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(lambda: self.wait_for_lock(key, timeout))
