"""The per-tensor contract every merge method implements, and its parameter specs.

The streaming engine (mergealign/merge/engine.py) calls, for each output tensor, ``method.merge(ctx, base, tensors)``
with float32 inputs on the compute device and writes the float32 result it gets back. It resolves mergekit-style
parameter values (filters, layer gradients) to one scalar per tensor before the call; methods only see scalars.

Contract of ``merge`` / ``observe``:
- ``base`` is θ_0 (or None when the method does not use a base or the config names none).
- ``tensors`` holds one tensor per input model other than the base, in config order; ``ctx.model[i]`` holds the
  parameters of ``tensors[i]``. If ``uses_deltas`` is True they are task vectors τ_i = θ_i − θ_0, else full
  weights θ_i.
- Inputs are never modified, unless ``ctx.inputs_disposable``: then the engine will not read ``tensors`` again
  and the result may be written into the storage of ``tensors[0]`` (one whole-tensor copy less). The result is
  a float32 tensor (θ, base already added) of the input shape.
- A method with ``uses_deltas`` may get ``base`` in the checkpoint's stored dtype (a read-only memory-mapped
  view): it must only read it, and only in chunks (the kernels add it back chunk by chunk, cast on the fly).
- ``elementwise`` methods give the same result when the engine splits a tensor into row blocks and calls
  ``merge`` once per block with the same ctx; all others need the whole tensor in one call.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from mergealign.errors import MergeAlignError
from mergealign.methods.study import AsGiven, StudyMapping

# Elements per working chunk of the chunked kernels: large enough that per-call overhead is negligible, small
# enough that the temporaries stay in cache and the peak memory stays near the size of the output. With several
# intra-op threads, chunks are THREADED_CHUNK_FACTOR times larger: every op is a parallel region whose end waits
# for all threads, and on a busy machine fewer, larger regions were 1.5-3x faster (1M vs 4M elements measured).
CHUNK_ELEMENTS = 1 << 20
THREADED_CHUNK_FACTOR = 4


def chunk_elements() -> int:
    """The current chunk size (read at call time, so tests can lower it to exercise multi-chunk paths)."""
    return CHUNK_ELEMENTS * (THREADED_CHUNK_FACTOR if torch.get_num_threads() > 1 else 1)


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method: type, default, allowed range, and a one-line doc.

    ``kind`` is float, int, bool or str. Bounds apply to numbers (``low_open``/``high_open`` make them exclusive);
    ``choices`` to strings. ``default=None`` with ``required=False`` means "optional; None unless given" or, for
    methods whose defaults depend on another parameter (TIES ``convention``), "resolved by the method".
    """

    default: Any
    doc: str
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    required: bool = False

    def range_text(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is bool:
            return "true or false"
        if self.low is None and self.high is None:
            return "a finite number"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"in {left}{lo}, {hi}{right}"

    def check(self, value: Any, field_path: str) -> str | None:
        """Return a problem text naming ``field_path`` if ``value`` (a scalar) is not allowed, else None."""
        if self.kind is bool:
            if not isinstance(value, bool):
                return f"{field_path}: must be true or false, got {value!r}"
            return None
        if self.kind is str:
            if not isinstance(value, str) or (self.choices is not None and value not in self.choices):
                return f"{field_path}: must be {self.range_text()}, got {value!r}"
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{field_path}: must be a number, got {value!r}"
        if self.kind is int and int(value) != value:
            return f"{field_path}: must be an integer, got {value!r}"
        bad = not math.isfinite(value)
        if self.low is not None:
            bad = bad or value < self.low or (self.low_open and value == self.low)
        if self.high is not None:
            bad = bad or value > self.high or (self.high_open and value == self.high)
        if bad:
            return f"{field_path}: must be {self.range_text()}, got {value!r}"
        return None


@dataclass(frozen=True)
class MethodParams:
    """Parameters of a merge as written in a config, before per-tensor resolution (what ``validate`` checks).

    ``globals``: the method's global parameters. ``models``: per input model other than the base, in config
    order, its ``parameters`` mapping. Values may be scalars, mergekit layer gradients (lists of scalars) or
    filter lists (``[{filter: ..., value: ...}, ...]``); every scalar inside is checked.
    ``model_labels`` optionally gives the field prefix of each model (default ``models[i]``).
    """

    globals: Mapping[str, Any] = field(default_factory=dict)
    models: Sequence[Mapping[str, Any]] = ()
    has_base: bool = True
    model_labels: Sequence[str] | None = None

    def model_label(self, i: int) -> str:
        if self.model_labels is not None and i < len(self.model_labels):
            return self.model_labels[i]
        return f"models[{i}]"


def derive_seed(seed: int, name: str, stream: int = 0) -> int:
    """A 63-bit seed from (seed, tensor name, stream) through SHA-256: stable across runs, processes and
    Python versions (unlike ``hash()``), and independent of the order in which tensors are merged."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}\x00{int(stream)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class TensorContext:
    """Everything a method needs to know about the tensor being merged.

    ``model[i]``: resolved scalar parameters of input model i (same order as ``tensors``; string-valued ones such
    as mergealign's ``role`` pass through). ``globals``: resolved global parameters. Missing names take the
    method's defaults. ``observe_pass``: index of the observe pass when calling ``observe``.
    ``inputs_disposable``: the caller will not read ``tensors`` after ``merge`` (see the module's contract).
    """

    name: str
    model: Sequence[Mapping[str, Any]]
    globals: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    observe_pass: int = 0
    inputs_disposable: bool = False

    def generator(self, device: torch.device | str = "cpu", stream: int = 0) -> torch.Generator:
        """A torch.Generator on ``device`` seeded from (seed, tensor name, stream); ``stream`` separates the
        random draws of several models of one tensor. The same inputs give the same numbers on one device type."""
        gen = torch.Generator(device=torch.device(device))
        gen.manual_seed(derive_seed(self.seed, self.name, stream))
        return gen


def _scalars(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every scalar inside a parameter value: a scalar, a layer gradient (list) or a filter list."""
    if isinstance(value, Mapping):
        if "value" in value:
            yield from _scalars(value["value"], f"{path}.value")
        else:
            yield path, value
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _scalars(item, f"{path}[{i}]")
    else:
        yield path, value


def unknown_name_problem(path: str, name: str, known: Sequence[str], method: str) -> str:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    listed = ", ".join(sorted(known)) or "none"
    return f"{path}: unknown parameter {name!r} for method {method!r} (known: {listed}){hint}"


class MergeMethod(ABC):
    """Base of every merge method; one instance may merge every tensor of one model."""

    name: ClassVar[str]
    formula: ClassVar[str]  # one line, shown by list_methods()
    requires_base: ClassVar[bool]
    uses_base: ClassVar[bool] = True  # False: ``base`` is ignored (linear); every model comes in ``tensors``
    uses_deltas: ClassVar[bool]
    global_params: ClassVar[dict[str, ParamSpec]] = {}
    model_params: ClassVar[dict[str, ParamSpec]] = {}
    needs_model_pass: ClassVar[bool] = False  # True: may need observe() passes; ask observe_passes(globals)
    elementwise: ClassVar[bool] = False
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    # How a study's λ / preset / λ_D, λ_A become this method's parameters (mergealign.methods.study).
    study: ClassVar[StudyMapping] = AsGiven()

    # ---------------------------------------------------------------- parameters
    def default_global(self, name: str, globals_: Mapping[str, Any]) -> Any:
        """Default of a global parameter; may depend on other globals (TIES ``convention``)."""
        return self.global_params[name].default

    def default_model(self, name: str, globals_: Mapping[str, Any]) -> Any:
        """Default of a per-model parameter; may depend on globals."""
        return self.model_params[name].default

    def g(self, globals_: Mapping[str, Any], name: str) -> Any:
        """Value of a global parameter, or its default."""
        value = globals_.get(name)
        return self.default_global(name, globals_) if value is None else value

    def m(self, ctx: TensorContext, i: int, name: str) -> Any:
        """Value of a per-model parameter of model i, or its default."""
        value = ctx.model[i].get(name)
        return self.default_model(name, ctx.globals) if value is None else value

    def resolved_globals(self, globals_: Mapping[str, Any]) -> dict[str, Any]:
        """All global parameters with defaults filled in (for logs and model cards)."""
        return {name: self.g(globals_, name) for name in self.global_params}

    # ---------------------------------------------------------------- validation
    def validate(self, params: MethodParams) -> list[str]:
        """Every problem of ``params`` for this method, each naming its field; empty when valid."""
        problems: list[str] = []
        if self.requires_base and not params.has_base:
            problems.append(f"base_model: method {self.name!r} requires a base model")
        n = len(params.models)
        if n < self.min_models or (self.max_models is not None and n > self.max_models):
            want = (
                f"exactly {self.min_models}"
                if self.max_models == self.min_models
                else f"at least {self.min_models}"
                if self.max_models is None
                else f"{self.min_models} to {self.max_models}"
            )
            base_note = " besides the base model" if self.uses_base and params.has_base else ""
            problems.append(f"models: method {self.name!r} takes {want} input model(s){base_note}, got {n}")
        for key, value in params.globals.items():
            spec = self.global_params.get(key)
            if spec is None:
                problems.append(
                    unknown_name_problem(f"parameters.{key}", key, list(self.global_params), self.name)
                )
                continue
            problems += self.check_value(spec, value, f"parameters.{key}")
        for i, model in enumerate(params.models):
            label = params.model_label(i)
            for key, value in model.items():
                spec = self.model_params.get(key)
                if spec is None:
                    problems.append(
                        unknown_name_problem(
                            f"{label}.parameters.{key}", key, list(self.model_params), self.name
                        )
                    )
                    continue
                problems += self.check_value(spec, value, f"{label}.parameters.{key}")
            for key, spec in self.model_params.items():
                if spec.required and model.get(key) is None:
                    problems.append(f"{label}.parameters.{key}: required by method {self.name!r}")
        for key, spec in self.global_params.items():
            if spec.required and params.globals.get(key) is None:
                problems.append(f"parameters.{key}: required by method {self.name!r}")
        if not problems:
            problems += self.validate_extra(params)
        return problems

    @staticmethod
    def check_value(spec: ParamSpec, value: Any, path: str) -> list[str]:
        """Problems of one parameter value (scalar, layer gradient or filter list) against ``spec``."""
        if value is None:
            return []
        out = []
        for sub_path, scalar in _scalars(value, path):
            problem = spec.check(scalar, sub_path)
            if problem:
                out.append(problem)
        return out

    _check_value = check_value  # earlier name, kept for callers

    def validate_extra(self, params: MethodParams) -> list[str]:
        """Method-specific checks across parameters (run when the generic checks pass)."""
        return []

    # ---------------------------------------------------------------- merging
    def observe_passes(self, globals_: Mapping[str, Any]) -> int:
        """How many full passes of ``observe`` over every tensor the engine must run before the first ``merge``
        (pass p calls observe with ``ctx.observe_pass == p``). 0 for all methods but whole-model TIES."""
        return 0

    def observe(self, ctx: TensorContext, base: Tensor | None, tensors: Sequence[Tensor]) -> None:
        """Look at one tensor during a model-wide pre-pass (no output)."""
        raise NotImplementedError(f"method {self.name!r} has no model pass")

    @abstractmethod
    def merge(self, ctx: TensorContext, base: Tensor | None, tensors: Sequence[Tensor]) -> Tensor:
        """The merged θ of one tensor (float32, the shape of the inputs)."""

    def check_inputs(self, ctx: TensorContext, base: Tensor | None, tensors: Sequence[Tensor]) -> None:
        """Fail with a clear message on a call that breaks the contract (cheap: shapes and counts only)."""
        if len(tensors) != len(ctx.model):
            raise MergeAlignError(
                f"tensor {ctx.name}: {len(tensors)} input tensors but parameters for {len(ctx.model)} models"
            )
        if not tensors:
            raise MergeAlignError(f"tensor {ctx.name}: method {self.name!r} got no input tensors")
        if self.requires_base and base is None:
            raise MergeAlignError(f"tensor {ctx.name}: method {self.name!r} requires the base tensor")
        shape = tensors[0].shape
        others = list(tensors[1:]) + ([base] if base is not None and self.uses_base else [])
        for t in others:
            if t.shape != shape:
                raise MergeAlignError(
                    f"tensor {ctx.name}: input shapes differ ({tuple(shape)} vs {tuple(t.shape)})"
                )
