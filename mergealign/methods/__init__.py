"""Merge methods, one module each, on the per-tensor contract of mergealign.methods.base.

Engine protocol (mergealign/merge/engine.py):
    method = get_method(name)                   # a fresh instance per merge (TIES keeps whole-model state)
    problems = method.validate(MethodParams(globals=..., models=[...], has_base=...))   # before heavy work
    for p in range(method.observe_passes(globals)):   # 0, or 2 for TIES with topk_scope: model
        for each tensor: method.observe(TensorContext(name, model, globals, seed, observe_pass=p), base, tensors)
    for each tensor: theta = method.merge(TensorContext(name, model, globals, seed), base, tensors)
- ``tensors``: one per input model other than the base, config order (``uses_base = False``, i.e. linear: every
  model, base included if listed); task vectors τ_i = θ_i − θ_0 if ``uses_deltas`` else full weights θ_i;
  float32 on the compute device; never modified. ``base``: θ_0 or None. Result: float32 θ of the input shape.
- ``elementwise`` methods may be called once per row block of a tensor with the same ctx; others need it whole.
- Random methods draw from ``ctx.generator(device, stream=i)``: seeded from (seed, tensor name, model index).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from mergealign.errors import MergeAlignError, unknown_name
from mergealign.methods.base import (
    CHUNK_ELEMENTS,
    MergeMethod,
    MethodParams,
    ParamSpec,
    TensorContext,
    derive_seed,
)
from mergealign.methods.mergealign import resolve_coefficients, resolve_lambdas


def _discover() -> dict[str, type[MergeMethod]]:
    """Every concrete MergeMethod defined in a module of this package, by its name: adding a method is adding
    its module, nothing else."""
    found: dict[str, type[MergeMethod]] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (inspect.isclass(obj) and issubclass(obj, MergeMethod) and not inspect.isabstract(obj)
                    and obj.__module__ == module.__name__ and "name" in vars(obj)):  # fmt: skip
                if obj.name in found:
                    raise RuntimeError(
                        f"two merge methods are named {obj.name!r}: {found[obj.name]} and {obj}"
                    )
                found[obj.name] = obj
    return found


METHODS: dict[str, type[MergeMethod]] = _discover()


def get_method(name: str) -> MergeMethod:
    """A new instance of the method registered as ``name``; MergeAlignError naming the closest names if unknown."""
    cls = METHODS.get(name)
    if cls is None:
        raise MergeAlignError(unknown_name("method", str(name), METHODS, cutoff=0.4))
    return cls()


def list_methods() -> list[tuple[str, str]]:
    """(name, one-line formula) of every registered method, sorted by name."""
    return [(name, METHODS[name].formula) for name in sorted(METHODS)]


__all__ = [
    "CHUNK_ELEMENTS",
    "METHODS",
    "MergeMethod",
    "MethodParams",
    "ParamSpec",
    "TensorContext",
    "derive_seed",
    "get_method",
    "list_methods",
    "resolve_coefficients",
    "resolve_lambdas",
]
