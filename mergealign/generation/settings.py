"""Settings of a model run (where and how a model is executed) and of a generation; pydantic, so the
pipeline's run config can embed them. `cache_fingerprint()` hashes everything that changes the output."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from mergealign.files import canonical_json

# Bump when a change in mergealign/generation changes what a generation writes.
GENERATION_CODE_VERSION = "generation-v1"

Backend = Literal["vllm", "transformers"]


class RuntimeSettings(BaseModel):
    """Where a model runs: backend, interpreter of the child process, device and engine knobs."""

    model_config = ConfigDict(extra="forbid")

    backend: Backend = "transformers"
    python: str | None = Field(
        default=None,
        description="Interpreter of the child process. Default: for vllm, $MERGEALIGN_VLLM_PYTHON, else "
        "<project root>/.venv-vllm/bin/python, else this interpreter if it has vllm; for transformers, this "
        "interpreter. Relative paths are resolved against the project root.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: str = Field(default="auto", description="transformers: auto | cpu | cuda | cuda:N")
    batch_size: int = Field(default=8, ge=1, description="transformers: prompts per generate() call")
    num_threads: int | None = Field(default=None, ge=1, description="transformers on CPU: torch threads")
    chunk_size: int = Field(default=64, ge=1, description="rows per checkpoint write (what a kill can lose)")
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    max_model_len: int | None = Field(default=None, ge=16)
    enforce_eager: bool = False
    vllm_single_process: bool = Field(
        default=False,
        description="vllm, tensor_parallel_size 1: run engine core and model worker inside the child process "
        "(halves start-up on CPU, slower decoding; for tests and short CPU runs)",
    )
    trust_remote_code: bool = False

    def output_affecting(self) -> dict:
        # The interpreter path, checkpoint granularity and process layout never change what is generated.
        return self.model_dump(exclude={"python", "chunk_size", "vllm_single_process", "num_threads"})


class GenerationSettings(BaseModel):
    """How answers are generated. Greedy (temperature 0) by default; max_tokens is always explicit."""

    model_config = ConfigDict(extra="forbid")

    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    max_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0
    system_prompt: str | None = None
    chat_template: str | None = Field(
        default=None,
        description="Used only when the model has no chat template of its own: a model directory or hub id "
        "(its tokenizer's template; the pipeline passes the aligned model), a .jinja file, or template text.",
    )
    record_token_ids: bool = False
    ignore_eos: bool = False  # benchmarks only: always generate max_tokens

    def cache_fingerprint(self) -> str:
        payload = self.model_dump(exclude={"runtime"})
        payload["runtime"] = self.runtime.output_affecting()
        payload["code"] = GENERATION_CODE_VERSION
        return hashlib.sha256(canonical_json(payload).encode()).hexdigest()
