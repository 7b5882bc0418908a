"""What every step task shares: the step context, the artifact-key cache policy, locks, retries, artifacts.

A step task is a thin Prefect wrapper over a mergealign function. Its Prefect cache key is our artifact key
(`<step>-<sha256 of inputs, shas, params, code version>`, no run id), so a new run of the same config, a
scheduled run and a retry all reuse finished steps. Before a cache hit is trusted the policy verifies the
published files against their manifest; if they are missing or corrupt it drops the stale Prefect record,
so the step runs again. Keys are locked (SERIALIZABLE isolation with `ArtifactLockManager`), so two runs of
the same config compute each step once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.locking.protocol import LockManager
from pydantic import BaseModel, ConfigDict

from mergealign.artifacts import ArtifactStore, Manifest, VerifyLevel, sha256_bytes
from mergealign.config import RunConfig
from mergealign.hub import is_transient

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- context
class StepContext(BaseModel):
    """Where a step reads and writes, and how it checks reused work. Small and serialisable."""

    model_config = ConfigDict(frozen=True)

    study: str
    artifact_root: str
    results_dir: str
    locks_dir: str
    verify: VerifyLevel = "full"
    device: str = "auto"
    hf_cache_dir: str | None = None
    hf_token_secret: str | None = None
    gpu_slot: str | None = "gpu"

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.artifact_root)


def context_for(cfg: RunConfig) -> StepContext:
    """The step context of a run config. Prefect records and locks live under the artifact root when it is
    local (`<root>/.prefect/`), else under `execution.results_dir` or a local cache folder."""
    root = cfg.artifact_url
    store = ArtifactStore(root)
    if cfg.execution.results_dir:
        prefect_dir = Path(cfg.resolve_url(cfg.execution.results_dir))
    elif store.is_local:
        prefect_dir = Path(store.root) / ".prefect"
    else:
        cache = Path(os.environ.get("MERGEALIGN_CACHE", Path.home() / ".cache" / "mergealign"))
        prefect_dir = cache / "prefect" / sha256_bytes(root.encode())[:16]
    return StepContext(
        study=cfg.name,
        artifact_root=store.root if store.is_local else root,
        results_dir=str(prefect_dir / "results"),
        locks_dir=str(prefect_dir / "locks"),
        verify=cfg.execution.verify,
        device=cfg.execution.device,
        hf_cache_dir=cfg.resolve_url(cfg.execution.hf_cache_dir) if cfg.execution.hf_cache_dir else None,
        hf_token_secret=cfg.execution.hf_token_secret,
        gpu_slot=cfg.execution.gpu_slot,
    )


# --------------------------------------------------------------------------- locks
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


# --------------------------------------------------------------------------- cache policy
KeyFn = Callable[[Mapping[str, Any]], str]


@dataclasses.dataclass
class ArtifactCachePolicy(CachePolicy):
    """Cache key = `<step>-<artifact key>`; a hit is trusted only if the published artifacts verify."""

    step: str = ""
    key_fn: KeyFn | None = None
    # Record and lock name prefix; remote wrappers use their own ("merge-remote"), or the wrapper (holding the
    # lock while it waits for the deployment) and the remote step (needing it to run) would deadlock.
    record_prefix: str | None = None

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        if self.key_fn is None:
            return None
        ctx: StepContext = inputs["ctx"]
        key = self.key_fn(inputs)
        record_key = record_key_for(self.record_prefix or self.step, key)
        store = ctx.store()
        if store.lookup(self.step, key, ctx.verify) is None:
            record = Path(ctx.results_dir) / record_key
            if record.exists():
                log.warning(
                    "%s %s: cached record found but its artifacts are missing or corrupt; recomputing",
                    self.step,
                    key[:12],
                )
                record.unlink(missing_ok=True)
        return record_key


def record_key_for(step: str, key: str) -> str:
    return f"{step}-{key}"


def bind(task: Task[..., Any], ctx: StepContext, *, retries: int = 2, retry_delay_seconds: list[float] | None = None,
         **options: Any) -> Task[..., Any]:  # fmt: skip
    """A task configured for one study: records under the context's results dir, keys locked, retries for
    transient failures only."""
    policy = task.cache_policy
    if not isinstance(policy, ArtifactCachePolicy):
        raise TypeError(f"task {task.name!r} has no ArtifactCachePolicy")
    policy = policy.configure(
        isolation_level="SERIALIZABLE", lock_manager=ArtifactLockManager(Path(ctx.locks_dir))
    )
    Path(ctx.results_dir).mkdir(parents=True, exist_ok=True)
    return task.with_options(
        cache_policy=policy,
        result_storage=Path(ctx.results_dir),
        persist_result=True,
        cache_result_in_memory=False,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds if retry_delay_seconds is not None else [5, 30],
        retry_condition_fn=retry_if_transient,
        **options,
    )


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry network failures, HTTP 5xx/429 and timeouts; never 401/404, config or
    validation errors, or out-of-memory."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception as err:  # the state could not even be read: do not retry blindly
        log.debug("retry condition could not read the failed state: %r", err)
        return False
    if not isinstance(exc, BaseException):
        return False
    transient = is_transient(exc)
    if not transient:
        log.info(
            "not retrying %s: %s is not a transient failure",
            getattr(task, "name", "task"),
            type(exc).__name__,
        )
    return transient


# --------------------------------------------------------------------------- running a step
def run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a run (unit tests calling .fn)
        return log


def run_step(
    ctx: StepContext,
    step: str,
    key: str,
    build: Callable[[Path], Mapping[str, Any] | None],
    *,
    params: Mapping[str, Any] | None = None,
    inputs: Mapping[str, str] | None = None,
    shas: Mapping[str, str] | None = None,
    code_version: str = "",
    versions: Mapping[str, str] | None = None,
) -> Manifest:
    """Idempotent body of a step: reuse a published, verified result; else build in the staging dir and publish.

    `build(staging_dir)` writes the step's files and returns {"metrics": {...}, "extra": {...}} (both optional).
    """
    logger = run_logger()
    store = ctx.store()
    existing = store.lookup(step, key, ctx.verify)
    if existing is not None:
        logger.info("%s %s: already published at %s", step, key[:12], existing.location)
        return existing
    staging = store.staging_dir(step, key)
    started = time.time()
    info = dict(build(staging) or {})
    manifest = store.publish(
        step, key, staging, params=params, inputs=inputs, shas=shas, metrics=info.get("metrics"),
        extra=info.get("extra"), code_version=code_version, versions=versions, started=started,
    )  # fmt: skip
    logger.info("%s %s: published %d file(s), %.1f MB in %.1f s -> %s", step, key[:12], len(manifest.files),
                manifest.total_bytes / 1e6, manifest.duration_s, manifest.location)  # fmt: skip
    return manifest


# --------------------------------------------------------------------------- Prefect artifacts
def artifact_key(*parts: str) -> str:
    """Prefect artifact keys: lower-case letters, digits and dashes only."""
    text = "-".join(parts).lower()
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return text[:200] or "artifact"


def publish_markdown(manifest: Manifest, title: str, *, label: str, metrics: Mapping[str, Any] | None = None,
                     notes: str = "") -> None:  # fmt: skip
    """A markdown artifact for one step: what it produced, where, how long, key metrics."""
    from prefect.artifacts import create_markdown_artifact

    lines = [
        f"# {title}",
        "",
        "| | |",
        "|---|---|",
        f"| step | `{manifest.step}` |",
        f"| key | `{manifest.key[:16]}` |",
        f"| location | `{manifest.location}` |",
        f"| files | {len(manifest.files)} ({manifest.total_bytes / 1e6:.2f} MB) |",
        f"| time | {manifest.duration_s:.1f} s |",
        f"| content hash | `{manifest.content_hash[:16]}` |",
    ]
    shown = dict(metrics if metrics is not None else manifest.metrics)
    if shown:
        lines += ["", "| metric | value |", "|---|---|"]
        for k, v in shown.items():
            lines.append(f"| {k} | {_fmt(v)} |")
    if notes:
        lines += ["", notes]
    try:
        create_markdown_artifact("\n".join(lines), key=artifact_key(manifest.step, label),
                                 description=f"{manifest.step}: {label}")  # fmt: skip
    except Exception as exc:  # an artifact is a report, never a reason to fail the step
        log.warning("could not publish the Prefect artifact for %s %s: %s", manifest.step, label, exc)


def publish_table(rows: list[dict[str, Any]], *, key: str, description: str) -> None:
    from prefect.artifacts import create_table_artifact

    try:
        create_table_artifact([{k: _fmt(v) for k, v in r.items()} for r in rows], key=artifact_key(key),
                              description=description)  # fmt: skip
    except Exception as exc:
        log.warning("could not publish the Prefect table artifact %s: %s", key, exc)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return round(v, 4)
    if isinstance(v, dict | list):
        return json.dumps(v)[:200]
    return v


# --------------------------------------------------------------------------- resources
@contextlib.contextmanager
def gpu_slot(ctx: StepContext) -> Iterator[None]:
    """Hold a slot of the global concurrency limit `ctx.gpu_slot` while a GPU step runs, if that limit exists.

    Without a limit on the server (CPU-only local runs) the step runs unguarded, and says so.
    """
    logger = run_logger()
    name = ctx.gpu_slot
    if not name:
        yield
        return
    if not _limit_exists(name):
        logger.info("no global concurrency limit %r on the Prefect server: running without a GPU slot "
                    "(create one with `prefect gcl create %s --limit 1`)", name, name)  # fmt: skip
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(name, occupy=1, strict=False):
        yield


def _limit_exists(name: str) -> bool:
    try:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(name)
                return True
            except ObjectNotFound:
                return False
    except Exception as exc:
        log.debug("could not read concurrency limit %s: %s", name, exc)
        return False


def hf_token(ctx: StepContext) -> str | None:
    """The HF token: from the Prefect Secret block named in the config, else HF_TOKEN. Never logged."""
    if ctx.hf_token_secret:
        from prefect.blocks.system import Secret

        return Secret.load(ctx.hf_token_secret).get()
    from mergealign.hub import token_from_env

    return token_from_env()
