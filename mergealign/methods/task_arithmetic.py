"""Task arithmetic (Ilharco et al., ICLR 2023): θ = θ_0 + λ·Σ_t w_t·τ_t (÷ Σ_t w_t when ``normalize``).

mergekit defaults: ``lambda`` 1, ``normalize`` false; a weight sum with |Σw| < 1e-8 is not divided (as mergekit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor

from mergealign.methods.base import MergeMethod, ParamSpec, TensorContext
from mergealign.methods.kernels import Kept, gta_coefficients, weighted_sum
from mergealign.methods.params import INT8_MASK, LAMBDA, NORMALIZE_FALSE, WEIGHT
from mergealign.methods.study import StudyMapping, VectorWeights


class TaskArithmeticMethod(MergeMethod):
    name: ClassVar[str] = "task_arithmetic"
    study: ClassVar[StudyMapping] = VectorWeights()
    formula: ClassVar[str] = "θ_0 + λ·Σ w_t·τ_t (÷ Σ w_t if normalize)"
    requires_base: ClassVar[bool] = True
    uses_deltas: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True
    global_params: ClassVar[dict[str, ParamSpec]] = {
        "lambda": LAMBDA,
        "normalize": NORMALIZE_FALSE,
        "int8_mask": INT8_MASK,
    }
    model_params: ClassVar[dict[str, ParamSpec]] = {"weight": WEIGHT}

    def merge(self, ctx: TensorContext, base: Tensor | None, tensors: Sequence[Tensor]) -> Tensor:
        self.check_inputs(ctx, base, tensors)
        weights = [float(self.m(ctx, i, "weight")) for i in range(len(tensors))]
        coeffs = gta_coefficients(
            float(self.g(ctx.globals, "lambda")), weights, self.g(ctx.globals, "normalize")
        )
        return weighted_sum(base, [Kept(t) for t in tensors], coeffs, like=tensors[0])
