"""Merge methods, one module each, on the per-tensor contract of mergealign.methods.base.

Engine protocol (mergealign/merge.py):
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

import difflib

from mergealign.errors import MergeAlignError
from mergealign.methods.base import (
    CHUNK_ELEMENTS,
    MergeMethod,
    MethodParams,
    ParamSpec,
    TensorContext,
    derive_seed,
)
from mergealign.methods.breadcrumbs import BreadcrumbsMethod
from mergealign.methods.dare_linear import DareLinearMethod
from mergealign.methods.dare_ties import DareTiesMethod
from mergealign.methods.linear import LinearMethod
from mergealign.methods.mergealign import MergeAlignMethod, resolve_coefficients, resolve_lambdas
from mergealign.methods.slerp import SlerpMethod
from mergealign.methods.slerp_vectors import SlerpVectorsMethod
from mergealign.methods.task_arithmetic import TaskArithmeticMethod
from mergealign.methods.ties import TiesMethod

METHODS: dict[str, type[MergeMethod]] = {
    cls.name: cls
    for cls in (
        MergeAlignMethod,
        LinearMethod,
        TaskArithmeticMethod,
        SlerpMethod,
        SlerpVectorsMethod,
        TiesMethod,
        DareLinearMethod,
        DareTiesMethod,
        BreadcrumbsMethod,
    )
}


def get_method(name: str) -> MergeMethod:
    """A new instance of the method registered as ``name``; MergeAlignError naming the closest names if unknown."""
    cls = METHODS.get(name)
    if cls is None:
        close = difflib.get_close_matches(str(name), list(METHODS), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise MergeAlignError(f"unknown method {name!r}{hint} (known: {', '.join(sorted(METHODS))})")
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
