"""SLERP of two task vectors over the base, as mergekit ``nuslerp`` with a base model and nuslerp_flatten=true:
θ = θ_0 + sin((1−t)ω)/sin ω·τ_1 + sin(tω)/sin ω·τ_2 with cos ω = cos(τ_1, τ_2) over the flattened tensor, and
linear interpolation θ_0 + (1−t)·τ_1 + t·τ_2 when |cos ω| > ``dot_threshold`` (0.9995) or a vector is zero.

t = ``t`` if given, else w_2/(w_1 + w_2) from the per-model weights (0.5 when the sum is ~0), as nuslerp.
Difference from nuslerp: nuslerp falls back to linear only for exactly colinear vectors; near-colinear SLERP
and linear interpolation differ by O(ω²) and the threshold keeps the fp32 angle well conditioned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor

from mergealign.methods.base import MergeMethod, ParamSpec, TensorContext
from mergealign.methods.params import WEIGHT
from mergealign.methods.slerp import DOT_THRESHOLD_SPEC, T_SPEC, combine2, slerp_coefficients
from mergealign.methods.study import ALIGNED, BASE, EXPERT, Parameter, StudyMapping


def vector_t(globals_: Mapping[str, Any], weights: Sequence[float]) -> float:
    """``t`` if given, else w_2/(w_1 + w_2) (0.5 when |w_1 + w_2| < 1e-6), as mergekit nuslerp."""
    if globals_.get("t") is not None:
        return float(globals_["t"])
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


class SlerpVectorsMethod(MergeMethod):
    name: ClassVar[str] = "slerp_vectors"
    # τ_A is the t = 0 end, τ_D t = 1
    study: ClassVar[StudyMapping] = Parameter("t", BASE, [(ALIGNED, "alignment"), (EXPERT, "domain")])
    formula: ClassVar[str] = (
        "θ_0 + sin((1−t)ω)/sin ω·τ_1 + sin(tω)/sin ω·τ_2, ω = ∠(τ_1, τ_2) per flattened tensor"
    )
    requires_base: ClassVar[bool] = True
    uses_deltas: ClassVar[bool] = True
    min_models: ClassVar[int] = 2
    max_models: ClassVar[int | None] = 2
    global_params: ClassVar[dict[str, ParamSpec]] = {
        "t": ParamSpec(None, T_SPEC.doc + " (default: w_2/(w_1+w_2))", low=0.0, high=1.0),
        "dot_threshold": DOT_THRESHOLD_SPEC,
    }
    model_params: ClassVar[dict[str, ParamSpec]] = {"weight": WEIGHT}

    def merge(self, ctx: TensorContext, base: Tensor | None, tensors: Sequence[Tensor]) -> Tensor:
        self.check_inputs(ctx, base, tensors)
        t = vector_t(ctx.globals, [float(self.m(ctx, i, "weight")) for i in range(2)])
        c0, c1, _ = slerp_coefficients(t, tensors[0], tensors[1], float(self.g(ctx.globals, "dot_threshold")))
        return combine2(c0, tensors[0], c1, tensors[1], base=base)
