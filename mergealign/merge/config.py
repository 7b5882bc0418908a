"""The merge config (YAML): mergekit's schema for the methods both tools have, plus mergealign's extensions.

A mergekit config is accepted unchanged (``merge_method``, ``base_model``, ``models[].model``,
``models[].parameters``, global ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source`` or
``tokenizer.source``, ``chat_template``). Extensions:

- ``models[].role: domain | alignment`` (mergealign's method needs one of each; elsewhere a label), and
  ``models[].vector: DIR`` to use a task vector persisted by ``mergealign diff`` instead of a model.
- parameter values: a scalar; a gradient list over layers (t = layer / (n_layers − 1), linear between the
  points; tensors outside layers take t = 0, as mergekit); a list of ``{filter: substring, value}`` (first
  match wins; ``filter`` absent or "*" matches all); and ``{filter, layers: [first, last], value}``, which
  also requires the tensor's layer index to lie in [first, last] (tensors outside layers never match it);
  each is resolved per tensor by mergealign.merge.params.
- options: ``seed`` (random methods; per-tensor streams), ``shard_size`` (bytes, K/M/G/T suffixes; default
  2G), ``vocab_policy`` (error | merge_shared) with ``vocab_source``, ``nan_policy`` (error | warn),
  ``device`` (auto | cpu | cuda[:N]), ``copy_files_from`` (input whose config, tokenizer, chat template
  and generation_config are copied; default: the model with role alignment, else the base, else the first).

Inputs are referred to (in tokenizer_source, copy_files_from, vocab_source, chat_template) by "base", by a
role, or by the model / vector string exactly as written in the config.
Every problem is reported at once, each with its field path (ConfigError, exit code 2).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
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

from mergealign.checkpoint import dtype_from_name
from mergealign.errors import ConfigError, MergeAlignError, validation_problems
from mergealign.files import sha256_text
from mergealign.shards import DEFAULT_SHARD_BYTES, parse_size

Scalar = bool | int | float | str
ROLES = ("domain", "alignment")
BUILTIN_CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Conditional(_Strict):
    """``{filter: substring, value}``; mergealign adds ``layers: [first, last]`` (inclusive)."""

    value: Scalar | list[Scalar]
    filter: str | None = None
    layers: tuple[int, int] | None = None

    @field_validator("layers")
    @classmethod
    def _order(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and (v[0] < 0 or v[1] < v[0]):
            raise ValueError(f"layers must be [first, last] with 0 <= first <= last, got {list(v)}")
        return v


ParamValue = Scalar | list[Scalar] | list[Conditional] | Conditional


class ModelEntry(_Strict):
    model: str | None = None
    vector: str | None = None
    role: Literal["domain", "alignment"] | None = None
    parameters: dict[str, ParamValue] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelEntry:
        if (self.model is None) == (self.vector is None):
            raise ValueError(
                "give exactly one of `model` (a checkpoint) or `vector` (a task vector from `diff`)"
            )
        return self

    @property
    def ref(self) -> str:
        return self.model if self.model is not None else self.vector  # type: ignore[return-value]


class TokenizerSection(_Strict):
    source: str | None = None
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


class MergeConfig(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, ParamValue] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSection | None = None
    chat_template: str | None = None
    # mergekit layouts mergealign does not support: accepted by the schema to give a clear error.
    slices: Any = None
    modules: Any = None
    # mergealign options
    seed: int = 0
    shard_size: int | str = DEFAULT_SHARD_BYTES
    vocab_policy: Literal["error", "merge_shared"] = "error"
    vocab_source: str | None = None
    nan_policy: Literal["error", "warn"] = "error"
    device: str = "auto"
    copy_files_from: str | None = None

    _source: Path | None = PrivateAttr(default=None)

    # ------------------------------------------------------------------ derived
    @property
    def source_path(self) -> Path | None:
        """The YAML file the config came from (relative model paths may be relative to its directory)."""
        return self._source

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)

    @property
    def tokenizer_ref(self) -> str | None:
        if self.tokenizer is not None and self.tokenizer.source is not None:
            return self.tokenizer.source
        return self.tokenizer_source

    def labels(self) -> list[str]:
        """Short label per model entry: its role if no other entry has it, else the model / vector string."""
        roles = [m.role for m in self.models]
        return [m.role if m.role and roles.count(m.role) == 1 else m.ref for m in self.models]

    def files_source(self) -> str:
        """Reference whose config / tokenizer / chat template / generation_config are copied."""
        if self.copy_files_from:
            return self.copy_files_from
        for m in self.models:
            if m.role == "alignment" and m.model is not None:
                return m.model
        if self.base_model:
            return self.base_model
        return next((m.model for m in self.models if m.model is not None), self.models[0].ref)

    def resolve_ref(self, ref: str) -> str | None:
        """'base' / a role / a model or vector string -> the model or base string it names (None if none)."""
        if ref == "base":
            return self.base_model
        if ref == self.base_model:
            return ref
        for m in self.models:
            if ref == m.ref:
                return m.ref
        matches = [m.ref for m in self.models if m.role == ref]
        return matches[0] if len(matches) == 1 else None

    def method_inputs(self, method: Any) -> tuple[dict[str, ParamValue], list[dict[str, ParamValue]]]:
        """(global settings, per-model settings) as the method sees them (unresolved).

        Per-model parameters given in the global `parameters` apply to every model that does not set them
        (mergekit precedence); `role` joins the model's parameters.
        """
        globals_ = dict(self.parameters or {})
        shared = {
            k: v for k, v in globals_.items() if k in method.model_params and k not in method.global_params
        }
        for k in shared:
            globals_.pop(k)
        models = []
        for m in self.models:
            params: dict[str, ParamValue] = {**shared, **(m.parameters or {})}
            if m.role is not None and "role" in method.model_params:
                params["role"] = m.role
            models.append(params)
        return globals_, models

    def canonical_json(self) -> str:
        """Stable text of the config, for hashing (device excluded: it is not part of the result's identity
        on CPU; the engine adds the resolved device type to the hash). ASCII-escaped, unlike
        files.canonical_json: every finished output's config hash depends on these exact bytes."""
        data = self.model_dump(mode="json", exclude={"device"})
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def config_hash(self, extra: Mapping[str, Any] | None = None) -> str:
        tail = json.dumps(dict(extra), sort_keys=True, separators=(",", ":")) if extra else ""
        return sha256_text(self.canonical_json() + tail)


# ---------------------------------------------------------------------- loading and checks
def _plain(value: Any) -> Any:
    """Settings as plain data (for the method's validate, which walks dicts and lists)."""
    if isinstance(value, Conditional):
        return value.model_dump(exclude_none=True)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _semantic_problems(cfg: MergeConfig) -> list[str]:
    from mergealign.methods import get_method
    from mergealign.methods.base import MethodParams

    problems: list[str] = []
    if cfg.slices is not None or cfg.modules is not None:
        which = "slices" if cfg.slices is not None else "modules"
        problems.append(
            f"{which}: not supported by mergealign (layer stacking / multi-module); use `models:`"
        )
    try:
        method = get_method(cfg.merge_method)
    except MergeAlignError as exc:
        method = None
        problems.append(f"merge_method: {exc}")
    if method is not None:
        globals_, _ = cfg.method_inputs(method)
        # Per-model parameters given globally are checked here, so the message names `parameters.X`;
        # the models then see only the valid ones (no second report under models[i]).
        shared: dict[str, Any] = {}
        for key, value in (cfg.parameters or {}).items():
            if key in method.model_params and key not in method.global_params:
                found = method._check_value(method.model_params[key], _plain(value), f"parameters.{key}")
                problems += found
                if not found:
                    shared[key] = _plain(value)
        models = []
        for e in cfg.models:
            m = {**shared, **{k: _plain(v) for k, v in (e.parameters or {}).items()}}
            if e.role is not None and "role" in method.model_params:
                m["role"] = e.role
            models.append(m)
        params = MethodParams(
            globals={k: _plain(v) for k, v in globals_.items()},
            models=models,
            has_base=cfg.base_model is not None,
            model_labels=[f"models[{i}]" for i in range(len(cfg.models))],
        )
        for p in method.validate(params):
            if p not in problems:
                problems.append(p)
        if any(m.vector is not None for m in cfg.models) and cfg.base_model is None:
            problems.append("base_model: required when a model entry names a task `vector`")
    for field in ("dtype", "out_dtype"):
        value = getattr(cfg, field)
        if value is not None:
            try:
                dtype_from_name(value)
            except MergeAlignError as exc:
                problems.append(f"{field}: {exc}")
    try:
        cfg.shard_bytes  # noqa: B018 - validation by parsing
    except ValueError as exc:
        problems.append(f"shard_size: {exc}")
    if cfg.tokenizer_source is not None and cfg.tokenizer is not None:
        problems.append("tokenizer_source / tokenizer: give one of them, not both")
    if cfg.tokenizer is not None:
        for key in ("tokens", "pad_to_multiple_of"):
            if getattr(cfg.tokenizer, key) is not None:
                problems.append(
                    f"tokenizer.{key}: not supported by mergealign (it copies a tokenizer, never rebuilds one)"
                )
    refs = {
        "copy_files_from": cfg.copy_files_from,
        "vocab_source": cfg.vocab_source,
        "tokenizer_source" if cfg.tokenizer is None else "tokenizer.source": cfg.tokenizer_ref,
    }
    known = ["base"] if cfg.base_model else []
    known += [m.ref for m in cfg.models] + sorted({m.role for m in cfg.models if m.role})
    for field, ref in refs.items():
        if ref is None:
            continue
        if ref == "union":
            problems.append(f"{field}: 'union' is not supported (mergealign copies one input's tokenizer)")
            continue
        target = cfg.resolve_ref(ref)
        if target is None:
            problems.append(
                f"{field}: {ref!r} is not an input of this merge (use one of: {', '.join(known)})"
            )
        elif any(m.vector == target for m in cfg.models):
            problems.append(f"{field}: {ref!r} is a task vector; name a model (or base)")
    if cfg.vocab_policy == "merge_shared" and cfg.vocab_source is None:
        problems.append(
            "vocab_source: required with vocab_policy merge_shared (the input giving the extra rows)"
        )
    if cfg.vocab_policy == "error" and cfg.vocab_source is not None:
        problems.append("vocab_source: only used with vocab_policy merge_shared")
    if cfg.vocab_policy == "merge_shared" and cfg.vocab_source and cfg.tokenizer_ref:
        if cfg.resolve_ref(cfg.tokenizer_ref) != cfg.resolve_ref(cfg.vocab_source):
            problems.append("tokenizer_source: must name the vocab_source under vocab_policy merge_shared")
    ct = cfg.chat_template
    if ct is not None and ct != "auto" and ct not in BUILTIN_CHAT_TEMPLATES and "{" not in ct:
        if cfg.resolve_ref(ct) is None:
            problems.append(
                f"chat_template: {ct!r} is not 'auto', a built-in ({', '.join(BUILTIN_CHAT_TEMPLATES)}), "
                "an input of this merge, or a Jinja template"
            )
    device = cfg.device.strip().lower()
    if device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", device):
        problems.append(f"device: {cfg.device!r}: use auto, cpu, cuda or cuda:N")
    return problems


def load_merge_config(source: MergeConfig | str | os.PathLike[str] | Mapping[str, Any]) -> MergeConfig:
    """A validated MergeConfig from a YAML file path, a YAML string, a dict, or a MergeConfig.

    Raises ConfigError listing every problem with its field path.
    """
    if isinstance(source, MergeConfig):
        return source
    origin: Path | None = None
    where: str | None = None
    is_path = isinstance(source, os.PathLike) or (
        isinstance(source, str)
        and "\n" not in source
        and (source.endswith((".yaml", ".yml")) or Path(source).is_file())
    )
    if is_path:
        origin = Path(source)
        where = str(origin)
        try:
            text = origin.read_text()
        except OSError as exc:
            raise ConfigError([f"cannot read config: {exc}"], where) from None
        data = _parse_yaml(text, where)
    elif isinstance(source, str):
        data = _parse_yaml(source, None)
    else:
        data = dict(source)
    if not isinstance(data, dict):
        raise ConfigError(["the config must be a mapping (merge_method, models, ...)"], where)
    try:
        cfg = MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc, MergeConfig), where) from None
    cfg._source = origin.resolve() if origin is not None else None
    problems = _semantic_problems(cfg)
    if problems:
        raise ConfigError(problems, where)
    return cfg


def _parse_yaml(text: str, where: str | None) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], where) from None
