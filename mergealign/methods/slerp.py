"""SLERP of weights (Shoemake 1985), one angle per whole flattened tensor, as mergekit ``slerp``:
θ = sin((1−t)ω)/sin ω·θ_a + sin(tω)/sin ω·θ_b with cos ω = ⟨θ_a, θ_b⟩/(‖θ_a‖‖θ_b‖) on the unnormalised vectors,
and θ = (1−t)·θ_a + t·θ_b when |cos ω| > ``dot_threshold`` (0.9995).

Inputs: base model + one model (mergekit: the base is the t = 0 end), or two models and no base (the first is
the t = 0 end). Fine-tunes of one base are nearly colinear (cos ≈ 0.9999), so this is then exactly linear
interpolation; ``slerp_vectors`` interpolates the task vectors instead. Difference from mergekit: when one
vector is (near) zero, it has no direction, so we interpolate linearly (mergekit takes ω = π/2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from mergealign.errors import MergeAlignError
from mergealign.methods.base import MergeMethod, MethodParams, ParamSpec, TensorContext
from mergealign.methods.kernels import chunk_slices
from mergealign.methods.study import ALIGNED, EXPERT, Parameter, StudyMapping

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8

T_SPEC = ParamSpec(
    None, "interpolation factor: 0 gives the first (base) model, 1 the other", low=0.0, high=1.0
)
DOT_THRESHOLD_SPEC = ParamSpec(
    DOT_THRESHOLD, "use linear interpolation when |cos ω| exceeds this", low=0.0, high=1.0
)


def slerp_coefficients(
    t: float, v0: Tensor, v1: Tensor, dot_threshold: float = DOT_THRESHOLD
) -> tuple[float, float, float]:
    """(c0, c1, cos ω) such that SLERP(v0, v1; t) = c0·v0 + c1·v1; norms and dot accumulated in float64."""
    f0, f1 = v0.reshape(-1), v1.reshape(-1)
    n0 = n1 = dot = 0.0
    for sl in chunk_slices(f0.numel()):
        a, b = f0[sl].double(), f1[sl].double()
        n0 += float(a.dot(a))
        n1 += float(b.dot(b))
        dot += float(a.dot(b))
    n0, n1 = math.sqrt(n0), math.sqrt(n1)
    if n0 <= NORM_EPS or n1 <= NORM_EPS:
        return 1.0 - t, t, float("nan")
    cos = max(-1.0, min(1.0, dot / (n0 * n1)))
    if abs(cos) > dot_threshold:
        return 1.0 - t, t, cos
    omega = math.acos(cos)
    s = math.sin(omega)
    return math.sin((1.0 - t) * omega) / s, math.sin(t * omega) / s, cos


def combine2(c0: float, v0: Tensor, c1: float, v1: Tensor, base: Tensor | None = None) -> Tensor:
    """[base +] c0·v0 + c1·v1 as a new float32 tensor, chunk by chunk."""
    out = torch.empty(v0.shape, dtype=torch.float32, device=v0.device)
    of, f0, f1 = out.reshape(-1), v0.reshape(-1), v1.reshape(-1)
    fb = base.reshape(-1) if base is not None else None
    for sl in chunk_slices(of.numel()):
        acc = of[sl]
        torch.mul(f0[sl], c0, out=acc)
        acc.add_(f1[sl], alpha=c1)
        if fb is not None:
            acc.add_(fb[sl])
    return out


class SlerpMethod(MergeMethod):
    name: ClassVar[str] = "slerp"
    # the aligned model is the t = 0 end, the expert t = 1
    study: ClassVar[StudyMapping] = Parameter("t", ALIGNED, [(EXPERT, "domain")])
    formula: ClassVar[str] = (
        "sin((1−t)ω)/sin ω·θ_a + sin(tω)/sin ω·θ_b per flattened tensor; lerp if |cos ω|>0.9995"
    )
    requires_base: ClassVar[bool] = False
    uses_deltas: ClassVar[bool] = False
    max_models: ClassVar[int | None] = 2
    global_params: ClassVar[dict[str, ParamSpec]] = {
        "t": ParamSpec(None, T_SPEC.doc, low=0.0, high=1.0, required=True),
        "dot_threshold": DOT_THRESHOLD_SPEC,
    }
    model_params: ClassVar[dict[str, ParamSpec]] = {}

    def validate_extra(self, params: MethodParams) -> list[str]:
        want = 1 if params.has_base else 2
        if len(params.models) != want:
            return [
                f"models: slerp takes a base model and one other model, or two models without a base model; got "
                f"{len(params.models)} model(s){' besides the base' if params.has_base else ''} "
                "(to interpolate two task vectors over a base use slerp_vectors)"
            ]
        return []

    def merge(self, ctx: TensorContext, base: Tensor | None, tensors: Sequence[Tensor]) -> Tensor:
        self.check_inputs(ctx, base, tensors)
        if len(tensors) != (1 if base is not None else 2):
            raise MergeAlignError(
                f"tensor {ctx.name}: slerp needs base + 1 model or 2 models, got "
                f"{'a base and ' if base is not None else ''}{len(tensors)} model(s)"
            )
        v0, v1 = (base, tensors[0]) if base is not None else (tensors[0], tensors[1])
        t = float(self.g(ctx.globals, "t"))
        c0, c1, _ = slerp_coefficients(t, v0, v1, float(self.g(ctx.globals, "dot_threshold")))
        return combine2(c0, v0, c1, v1)
