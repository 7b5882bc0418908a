"""Step `domain_eval`: domain benchmark scores of one model through lm-eval (mergealign.evaluation.domain).

Task YAMLs named in the run config may write `__CONFIG_DIR__` for the run config's folder (e.g. in
`data_files`); they are rendered into a temporary folder before lm-eval reads them. Every file next to such a
YAML (its data) is hashed into the key when the step is submitted.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mergealign.evaluation.domain import DomainEvalSettings, evaluate_domain, render_task_templates
from mergealign.files import sha256_file
from mergealign.study.plan import Step
from tasks.context import StepContext
from tasks.steps import Pins, StepKind, StepRun, register

FILE = "domain.json"


def domain_settings(settings: dict[str, Any], device: str | None = None) -> DomainEvalSettings:
    """The evaluation module's settings from a run config's `domain_eval` section (as plain data)."""
    fields = ("backend", "limit", "num_fewshot", "batch_size", "dtype", "data_dir")
    return DomainEvalSettings(**{k: settings.get(k) for k in fields if k in settings}, device=device)


def _device(ctx: StepContext, step: Step) -> str | None:
    """lm-eval's hf backend defaults to cuda: follow domain_eval.device, else execution.device (auto: cuda if
    there is one); the vllm backend picks its own."""
    if step.params["settings"].get("backend") != "hf":
        return None
    if step.info.get("device"):
        return step.info["device"]
    if ctx.device != "auto":
        return ctx.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _pin(ctx: StepContext, step: Step, memo: dict[str, Any]) -> Pins:
    files = {}
    for task in step.info["tasks"]:
        if task.endswith((".yaml", ".yml")):
            folder = Path(task).parent
            for f in sorted(p for p in folder.iterdir() if p.is_file()):
                files[f"{folder.name}/{f.name}"] = sha256_file(f)
    return Pins(shas=files)


def _build(run: StepRun, staging: Path) -> dict[str, Any]:
    step = run.step
    with tempfile.TemporaryDirectory(prefix="mergealign-tasks-") as tmp:
        tasks = render_task_templates(step.info["tasks"], step.info["config_dir"], Path(tmp))
        settings = domain_settings(step.params["settings"], _device(run.ctx, step))
        result = evaluate_domain(run.dir("model"), tasks, staging / FILE, settings)
    avg = result.get("average") or {}
    run.logger.info(
        "domain eval %s: average acc %s over %s task(s)", step.name, avg.get("acc"), avg.get("n_tasks")
    )
    metrics = {"average_acc": avg.get("acc"), "tasks": avg.get("n_tasks")}
    metrics.update({f"acc:{k}": v.get("acc") for k, v in (result.get("tasks") or {}).items()})
    return {"metrics": metrics}


DOMAIN_EVAL = register(StepKind(
    "domain_eval", "domain-eval-1", build=_build, pin=_pin, title=lambda step: f"Domain evaluation of {step.name}",
    manifest_params=lambda step: {"model": step.name, "tasks": step.info["tasks"]},
    key_params=lambda step: {"tasks": step.params["tasks"],
                             "settings": domain_settings(step.params["settings"]).cache_fingerprint()},
    uses_gpu=lambda step: step.params["settings"].get("backend") == "vllm",
    versions=("mergealign", "lm_eval", "transformers"),
    remote=lambda step: {"models": [step.name], "stages": ["domain_eval"]},
))  # fmt: skip
