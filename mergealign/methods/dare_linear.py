"""DARE + task arithmetic (mergekit ``dare_linear``): θ = θ_0 + λ·Σ_t w_t·τ̃_t (÷ Σ w_t when ``normalize``),
with τ̃_t the dropped and rescaled task vector of mergealign.methods.dare (rescale_mode inverse by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor

from mergealign.methods.base import MergeMethod, MethodParams, ParamSpec, TensorContext
from mergealign.methods.dare import DARE_PARAMS, DareDefaults, dare_kept, rescale_mode, validate_rescale
from mergealign.methods.kernels import gta_coefficients, weighted_sum
from mergealign.methods.params import DENSITY, INT8_MASK, LAMBDA, NORMALIZE_FALSE, WEIGHT
from mergealign.methods.study import StudyMapping, VectorWeights


class DareLinearMethod(DareDefaults, MergeMethod):
    name: ClassVar[str] = "dare_linear"
    study: ClassVar[StudyMapping] = VectorWeights()
    formula: ClassVar[str] = "θ_0 + λ·Σ w_t·s_t·(m_t⊙τ_t), m_t ~ Bernoulli(density), s_t = 1/density (or L1)"
    requires_base: ClassVar[bool] = True
    uses_deltas: ClassVar[bool] = True
    global_params: ClassVar[dict[str, ParamSpec]] = {
        "lambda": LAMBDA,
        "normalize": NORMALIZE_FALSE,
        "int8_mask": INT8_MASK,
        **DARE_PARAMS,
    }
    model_params: ClassVar[dict[str, ParamSpec]] = {"weight": WEIGHT, "density": DENSITY}

    def validate_extra(self, params: MethodParams) -> list[str]:
        return validate_rescale(params)

    def merge(self, ctx: TensorContext, base: Tensor | None, tensors: Sequence[Tensor]) -> Tensor:
        self.check_inputs(ctx, base, tensors)
        mode = rescale_mode(ctx.globals)
        kept = [dare_kept(ctx, i, t, float(self.m(ctx, i, "density")), mode) for i, t in enumerate(tensors)]
        weights = [float(self.m(ctx, i, "weight")) for i in range(len(tensors))]
        coeffs = gta_coefficients(
            float(self.g(ctx.globals, "lambda")), weights, self.g(ctx.globals, "normalize")
        )
        return weighted_sum(base, kept, coeffs, like=tensors[0])
