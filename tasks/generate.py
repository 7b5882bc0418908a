"""Step `generate`: one answer per prompt from one model (vLLM or transformers, in a child process).

Generation is resumable: a killed run leaves its partial file in the step's staging folder and the next run
continues from it. The key covers the model and prompt-set content hashes, the aligned model's (whose chat
template is used when a model has none) and the generation settings' fingerprint.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prefect import task

from mergealign.artifacts import Manifest, library_versions, step_key
from mergealign.config import GenerationConfig
from mergealign.generation import GenerationSettings, RuntimeSettings, generate
from tasks.common import ArtifactCachePolicy, StepContext, gpu_slot, publish_markdown, run_logger, run_step

STEP = "generate"
CODE_VERSION = "generate-1"
FILE = "generations.jsonl"


def generation_settings(gen: GenerationConfig, *, chat_template: str | None = None) -> GenerationSettings:
    """The evaluation module's settings from the run config's `generation` section."""
    runtime = RuntimeSettings(
        backend=gen.backend, python=gen.python, dtype=gen.dtype, batch_size=gen.batch_size,
        tensor_parallel_size=gen.tensor_parallel_size, gpu_memory_utilization=gen.gpu_memory_utilization,
        max_model_len=gen.max_model_len,
    )  # fmt: skip
    return GenerationSettings(
        runtime=runtime, max_tokens=gen.max_tokens, temperature=gen.temperature, top_p=gen.top_p, seed=gen.seed,
        system_prompt=gen.system_prompt, chat_template=chat_template,
    )  # fmt: skip


def generate_key(gen: GenerationConfig, model: Manifest, prompts: Manifest, template_model: Manifest) -> str:
    return step_key(
        STEP,
        inputs={
            "model": model.content_hash,
            "prompts": prompts.content_hash,
            "template": template_model.content_hash,
        },
        params={"settings": generation_settings(gen).cache_fingerprint()},
        code_version=CODE_VERSION,
    )


def _key(inputs: dict[str, Any]) -> str:
    return generate_key(inputs["gen"], inputs["model"], inputs["prompts"], inputs["template_model"])


def generate_answers(ctx: StepContext, label: str, gen: GenerationConfig, model: Manifest, prompts: Manifest,
                     template_model: Manifest) -> Manifest:  # fmt: skip
    logger = run_logger()
    store = ctx.store()
    key = generate_key(gen, model, prompts, template_model)

    def build(staging):
        settings = generation_settings(gen, chat_template=str(store.local_dir(template_model)))
        prompts_file = store.local_dir(prompts) / "prompts.jsonl"
        with gpu_slot(ctx) if gen.backend == "vllm" else contextlib.nullcontext():
            summary = generate(store.local_dir(model), prompts_file, staging / FILE, settings)
        logger.info("generate %s: %d answers (%d resumed), %s tokens/s", label, summary.n_prompts, summary.n_resumed,
                    f"{summary.tokens_per_second:.1f}" if summary.tokens_per_second else "n/a")  # fmt: skip
        return {"metrics": {"answers": summary.n_prompts, "resumed": summary.n_resumed,
                            "completion_tokens": summary.completion_tokens,
                            "tokens_per_second": summary.tokens_per_second, "backend": summary.backend},
                "extra": {"chat_template": summary.chat_template, "model_label": label}}  # fmt: skip

    manifest = run_step(ctx, STEP, key, build, params={"model": label, "prompt_set": prompts.params.get("label")},
                        inputs={"model": model.content_hash, "prompts": prompts.content_hash},
                        code_version=CODE_VERSION, versions=library_versions(("mergealign", "torch", "transformers",
                                                                              "vllm")))  # fmt: skip
    publish_markdown(manifest, f"Answers of {label} to {prompts.params.get('label')}",
                     label=f"{label}-{prompts.params.get('label')}")  # fmt: skip
    return manifest


@task(name="generate", cache_policy=ArtifactCachePolicy(step=STEP, key_fn=_key),
      task_run_name="generate-{label}-{prompt_set}")  # fmt: skip
def generate_task(ctx: StepContext, label: str, prompt_set: str, gen: GenerationConfig, model: Manifest,
                  prompts: Manifest, template_model: Manifest) -> Manifest:  # fmt: skip
    """Answers of one model to one prompt set (generations.jsonl)."""
    return generate_answers(ctx, label, gen, model, prompts, template_model)


@task(name="generate-remote", cache_policy=ArtifactCachePolicy(step=STEP, key_fn=_key, record_prefix="generate-remote"),
      task_run_name="generate-{label}-{prompt_set}")  # fmt: skip
def generate_remote_task(ctx: StepContext, label: str, prompt_set: str, gen: GenerationConfig, model: Manifest,
                         prompts: Manifest, template_model: Manifest, deployment: str,
                         config: dict[str, Any]) -> Manifest:  # fmt: skip
    """The generate step on a work pool: the `evaluate_flow` deployment, restricted to this model and set."""
    from tasks.remote import run_remote

    key = generate_key(gen, model, prompts, template_model)
    params = {"config": config, "models": [label], "prompt_sets": [prompt_set], "stages": ["generate"]}
    return run_remote(ctx, STEP, key, deployment, params, f"{label}/{prompt_set}")
