"""Parent side of a model run: pick the interpreter, resume from rows a killed run left behind, start the
worker in its own process, stream its log, and collect its rows.

Resume contract: the worker appends rows to `<out>.partial-<fingerprint>.jsonl`, fsync'ed chunk by chunk.
A re-run with the same fingerprint keeps the complete rows (dropping a torn last line and duplicates) and
sends only the missing inputs to a new worker. A run with other settings never reuses them.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergealign.errors import ConfigError, MergeAlignError
from mergealign.files import (
    atomic_write_json,
    read_complete_jsonl_rows,
    write_jsonl,
)
from mergealign.generation.settings import RuntimeSettings

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
WORKER_SCRIPT = Path(__file__).resolve().with_name("worker.py")
VLLM_PYTHON_ENV = "MERGEALIGN_VLLM_PYTHON"
DEFAULT_VLLM_VENV = ".venv-vllm/bin/python"
_LOG_TAIL_LINES = 60


def _interpreter(value: str, what: str) -> str:
    if os.sep not in value and "/" not in value:  # a bare command name: look it up on PATH
        found = shutil.which(value)
        if not found:
            raise ConfigError([f"{what}: interpreter {value!r} is not on PATH"])
        return found
    path = Path(value)
    if not path.is_absolute():
        path = PROJECT_ROOT / path
    if not path.exists():
        raise ConfigError([f"{what}: interpreter {path} does not exist"])
    return str(path)


def resolve_python(runtime: RuntimeSettings) -> str:
    """The interpreter of the child process (see RuntimeSettings.python)."""
    if runtime.python:
        return _interpreter(runtime.python, "runtime.python")
    if runtime.backend == "transformers":
        return sys.executable
    if os.environ.get(VLLM_PYTHON_ENV):
        return _interpreter(os.environ[VLLM_PYTHON_ENV], f"${VLLM_PYTHON_ENV}")
    default = PROJECT_ROOT / DEFAULT_VLLM_VENV
    if default.exists():
        return str(default)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise MergeAlignError(
        f"the vllm backend needs a Python with vllm: none found (runtime.python unset, ${VLLM_PYTHON_ENV} unset, "
        f"{default} missing, and this interpreter has no vllm). Run `make setup-vllm` or set {VLLM_PYTHON_ENV}."
    )


def vllm_python_available() -> str | None:
    """The vllm interpreter if one can be found, else None (tests use this to decide whether to skip)."""
    try:
        return resolve_python(RuntimeSettings(backend="vllm"))
    except MergeAlignError:
        return None


@dataclass
class ModelRunResult:
    rows: dict[str, dict[str, Any]]  # worker rows by input id
    stats: dict[str, Any]  # this run's worker statistics ({} when nothing was left to do)
    n_resumed: int
    n_new: int
    seconds: float
    python: str


def partial_path(out_path: Path, fingerprint: str) -> Path:
    return out_path.with_name(f"{out_path.name}.partial-{fingerprint[:16]}.jsonl")


def _recover(partial: Path, wanted: set[str]) -> dict[str, dict[str, Any]]:
    """Complete rows of an earlier run, each id once; the file is rewritten to hold exactly those."""
    if not partial.exists():
        return {}
    rows: dict[str, dict[str, Any]] = {}
    for row in read_complete_jsonl_rows(partial):
        key = str(row.get("id"))
        if key in wanted and key not in rows:
            rows[key] = row
    write_jsonl(partial, rows.values())
    return rows


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the worker gets SIGKILL when its parent dies, so a killed step leaves no orphan writing rows."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _spawn(python: str, request_path: Path, backend: str, label: str) -> None:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if backend == "vllm":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    command = [python, str(WORKER_SCRIPT), str(request_path)]
    logger.info("%s: starting %s worker with %s", label, backend, python)
    tail: collections.deque[str] = collections.deque(maxlen=_LOG_TAIL_LINES)
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        errors="replace",
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            tail.append(line)
            if line.startswith("[worker]"):
                logger.info("%s: %s", label, line[len("[worker] ") :])
            else:
                logger.debug("%s: %s", label, line)
        code = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    if code != 0:
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        raise MergeAlignError(
            f"{label}: {backend} worker failed ({how}); rows finished so far are kept and a re-run resumes "
            f"from them. Last lines of its output:\n" + "\n".join(tail)
        )


def run_model(
    *,
    model: str,
    inputs: list[dict[str, Any]],
    out_path: Path,
    fingerprint: str,
    runtime: RuntimeSettings,
    sampling: dict[str, Any],
    chat_template: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    content_format: str = "string",
    label: str = "generate",
) -> ModelRunResult:
    """Run `model` over `inputs` ({"id", "messages"} or {"id", "text"}) in a child process, resuming."""
    started = time.perf_counter()
    python = resolve_python(runtime)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out_path, fingerprint)
    wanted = {str(row["id"]) for row in inputs}
    done = _recover(partial, wanted)
    remaining = [row for row in inputs if str(row["id"]) not in done]
    if done:
        logger.info("%s: resuming, %d of %d rows already in %s", label, len(done), len(inputs), partial)
    stats: dict[str, Any] = {}
    if remaining:
        work = out_path.with_name(f".{out_path.name}.work-{fingerprint[:16]}")
        work.mkdir(exist_ok=True)
        write_jsonl(work / "inputs.jsonl", remaining)
        request = {
            "backend": runtime.backend,
            "model": str(model),
            "runtime": runtime.model_dump(exclude={"python", "backend"}),
            "sampling": sampling,
            "chat_template": chat_template,
            "chat_template_kwargs": chat_template_kwargs,
            "content_format": content_format,
            "inputs": str(work / "inputs.jsonl"),
            "output": str(partial),
            "stats": str(work / "stats.json"),
        }
        atomic_write_json(work / "request.json", request)
        _spawn(python, work / "request.json", runtime.backend, label)
        stats = json.loads((work / "stats.json").read_text(encoding="utf-8"))
        shutil.rmtree(work, ignore_errors=True)
        done = _recover(partial, wanted)
    missing = wanted - set(done)
    if missing:
        raise MergeAlignError(
            f"{label}: the worker finished but {len(missing)} row(s) are missing from {partial} "
            f"(e.g. {sorted(missing)[:3]}); re-run to resume"
        )
    return ModelRunResult(
        rows=done,
        stats=stats,
        n_resumed=len(inputs) - len(remaining),
        n_new=len(remaining),
        seconds=time.perf_counter() - started,
        python=python,
    )


def discard_partial(out_path: Path, fingerprint: str) -> None:
    """After the output is complete: drop its partial file and any left by runs with other settings."""
    out_path = Path(out_path)
    partial_path(out_path, fingerprint).unlink(missing_ok=True)
    for stale in out_path.parent.glob(f"{out_path.name}.partial-*.jsonl"):
        stale.unlink(missing_ok=True)
    for work in out_path.parent.glob(f".{out_path.name}.work-*"):
        shutil.rmtree(work, ignore_errors=True)
