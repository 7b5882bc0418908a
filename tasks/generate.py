"""Step `generate`: one answer per prompt from one model (vLLM or transformers, in a child process).

Generation is resumable: a killed run leaves its partial file in the step's staging folder and the next run
continues from it. The aligned model's chat template is used for a model that has none.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergealign.generation import GenerationSettings, RuntimeSettings, generate
from mergealign.study.plan import Step
from tasks.steps import StepKind, StepRun, register

FILE = "generations.jsonl"
RUNTIME_FIELDS = ("backend", "python", "dtype", "batch_size", "tensor_parallel_size", "gpu_memory_utilization",
                  "max_model_len")  # fmt: skip
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "system_prompt")


def generation_settings(gen: Mapping[str, Any], *, chat_template: str | None = None) -> GenerationSettings:
    """The generation module's settings from a run config's `generation` section (as plain data)."""
    runtime = RuntimeSettings(**{k: gen[k] for k in RUNTIME_FIELDS if k in gen})
    return GenerationSettings(runtime=runtime, chat_template=chat_template,
                              **{k: gen[k] for k in SAMPLING_FIELDS if k in gen})  # fmt: skip


def _build(run: StepRun, staging: Path) -> dict[str, Any]:
    settings = generation_settings(
        run.step.params["generation"], chat_template=str(run.dir("template_model"))
    )
    label = run.step.info["model"]
    summary = generate(run.dir("model"), run.dir("prompts") / "prompts.jsonl", staging / FILE, settings)
    tps = f"{summary.tokens_per_second:.1f}" if summary.tokens_per_second else "n/a"
    run.logger.info("generate %s: %d answers (%d resumed), %s tokens/s", label, summary.n_prompts,
                    summary.n_resumed, tps)  # fmt: skip
    return {"metrics": {"answers": summary.n_prompts, "resumed": summary.n_resumed,
                        "completion_tokens": summary.completion_tokens,
                        "tokens_per_second": summary.tokens_per_second, "backend": summary.backend},
            "extra": {"chat_template": summary.chat_template, "model_label": label}}  # fmt: skip


def _remote(step: Step) -> dict[str, Any]:
    return {"models": [step.info["model"]], "prompt_sets": [step.info["prompt_set"]], "stages": ["generate"]}


GENERATE = register(StepKind(
    "generate", "generate-1", build=_build,
    title=lambda step: f"Answers of {step.info['model']} to {step.info['prompt_set']}",
    label=lambda step: f"{step.info['model']}-{step.info['prompt_set']}",
    manifest_params=lambda step: {"model": step.info["model"], "prompt_set": step.info["prompt_set"]},
    key_params=lambda step: {"settings": generation_settings(step.params["generation"]).cache_fingerprint()},
    uses_gpu=lambda step: step.params["generation"].get("backend") == "vllm",
    versions=("mergealign", "torch", "transformers", "vllm"), remote=_remote,
))  # fmt: skip
