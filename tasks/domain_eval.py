"""Step `domain_eval`: domain benchmark scores of one model through lm-eval (mergealign.evaluation.domain).

Task YAMLs named in the run config may write `__CONFIG_DIR__` for the run config's folder (e.g. in
`data_files`); they are rendered into a temporary folder before lm-eval reads them. Every file next to such a
YAML (its data) is part of the key.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from mergealign.artifacts import Manifest, library_versions, sha256_file, step_key
from mergealign.config import DomainEvalConfig
from mergealign.evaluation.domain import DomainEvalSettings, evaluate_domain
from tasks.common import ArtifactCachePolicy, StepContext, gpu_slot, publish_markdown, run_logger, run_step

STEP = "domain_eval"
CODE_VERSION = "domain-eval-1"
FILE = "domain.json"
CONFIG_DIR_TOKEN = "__CONFIG_DIR__"


def domain_settings(cfg: DomainEvalConfig, device: str | None = None) -> DomainEvalSettings:
    return DomainEvalSettings(backend=cfg.backend, limit=cfg.limit, num_fewshot=cfg.num_fewshot,
                              batch_size=cfg.batch_size, dtype=cfg.dtype, data_dir=cfg.data_dir,
                              device=cfg.device or device)  # fmt: skip


def _device(ctx: StepContext) -> str | None:
    """lm-eval's hf backend defaults to cuda; follow execution.device (auto: cuda if there is one)."""
    if ctx.device != "auto":
        return ctx.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _yaml_entries(tasks: list[str]) -> list[Path]:
    return [Path(t) for t in tasks if t.endswith((".yaml", ".yml"))]


def domain_key(cfg: DomainEvalConfig, tasks: list[str], model: Manifest) -> str:
    files = {}
    for y in _yaml_entries(tasks):
        for f in sorted(p for p in y.parent.iterdir() if p.is_file()):
            files[f"{y.parent.name}/{f.name}"] = sha256_file(f)
    plain = [t if not t.endswith((".yaml", ".yml")) else Path(t).name for t in tasks]
    return step_key(STEP, inputs={"model": model.content_hash}, shas=files,
                    params={"tasks": plain, "settings": domain_settings(cfg).cache_fingerprint()},
                    code_version=CODE_VERSION)  # fmt: skip


def _key(inputs: dict[str, Any]) -> str:
    return domain_key(inputs["cfg"], inputs["tasks"], inputs["model"])


def _render(tasks: list[str], config_dir: str, into: Path) -> list[str]:
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


@task(
    name="domain_eval",
    cache_policy=ArtifactCachePolicy(step=STEP, key_fn=_key),
    task_run_name="domain-{label}",
)
def domain_eval_task(ctx: StepContext, label: str, cfg: DomainEvalConfig, tasks: list[str], model: Manifest,
                     config_dir: str) -> Manifest:  # fmt: skip
    """lm-eval accuracy per task and the average for one model (domain.json)."""
    logger = run_logger()
    store = ctx.store()
    key = domain_key(cfg, tasks, model)

    def build(staging):
        with tempfile.TemporaryDirectory(prefix="mergealign-tasks-") as tmp:
            rendered = _render(tasks, config_dir, Path(tmp))
            guard = gpu_slot(ctx) if cfg.backend == "vllm" else contextlib.nullcontext()
            with guard:
                settings = domain_settings(cfg, _device(ctx) if cfg.backend == "hf" else None)
                result = evaluate_domain(store.local_dir(model), rendered, staging / FILE, settings)
        avg = result.get("average") or {}
        logger.info(
            "domain eval %s: average acc %s over %s task(s)", label, avg.get("acc"), avg.get("n_tasks")
        )
        metrics = {"average_acc": avg.get("acc"), "tasks": avg.get("n_tasks")}
        metrics.update({f"acc:{k}": v.get("acc") for k, v in (result.get("tasks") or {}).items()})
        return {"metrics": metrics}

    manifest = run_step(ctx, STEP, key, build, params={"model": label, "tasks": tasks},
                        inputs={"model": model.content_hash}, code_version=CODE_VERSION,
                        versions=library_versions(("mergealign", "lm_eval", "transformers")))  # fmt: skip
    publish_markdown(manifest, f"Domain evaluation of {label}", label=label)
    return manifest


@task(name="domain_eval-remote", cache_policy=ArtifactCachePolicy(step=STEP, key_fn=_key, record_prefix="domain_eval-remote"),
      task_run_name="domain-{label}")  # fmt: skip
def domain_eval_remote_task(ctx: StepContext, label: str, cfg: DomainEvalConfig, tasks: list[str], model: Manifest,
                            config_dir: str, deployment: str, config: dict[str, Any]) -> Manifest:  # fmt: skip
    """The domain evaluation on a work pool: the `evaluate_flow` deployment for this model, stage domain_eval."""
    from tasks.remote import run_remote

    key = domain_key(cfg, tasks, model)
    params = {"config": config, "models": [label], "stages": ["domain_eval"]}
    return run_remote(ctx, STEP, key, deployment, params, label)
