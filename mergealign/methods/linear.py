"""Linear (Model Soups, Wortsman et al. 2022): θ = Σ_i w_i·θ_i / Σ_i w_i (``normalize``, default true) or Σ w_i·θ_i.

No base model: every input model comes in ``tensors`` (as mergekit, a base model listed under ``models`` with a
weight is an ordinary input).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor

from mergealign.errors import MergeAlignError
from mergealign.methods.base import MergeMethod, ParamSpec, TensorContext
from mergealign.methods.kernels import Kept, weighted_sum
from mergealign.methods.params import WEIGHT
from mergealign.methods.study import Interpolation, StudyMapping


class LinearMethod(MergeMethod):
    name: ClassVar[str] = "linear"
    study: ClassVar[StudyMapping] = Interpolation()
    formula: ClassVar[str] = "Σ w_i·θ_i / Σ w_i (normalize=true) or Σ w_i·θ_i"
    requires_base: ClassVar[bool] = False
    uses_base: ClassVar[bool] = False
    uses_deltas: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True
    global_params: ClassVar[dict[str, ParamSpec]] = {
        "normalize": ParamSpec(True, "divide by the sum of weights (mergekit default true)", kind=bool),
    }
    model_params: ClassVar[dict[str, ParamSpec]] = {"weight": WEIGHT}

    def merge(self, ctx: TensorContext, base: Tensor | None, tensors: Sequence[Tensor]) -> Tensor:
        self.check_inputs(ctx, None, tensors)
        weights = [float(self.m(ctx, i, "weight")) for i in range(len(tensors))]
        if self.g(ctx.globals, "normalize"):
            total = sum(weights)
            if abs(total) < 1e-8:
                raise MergeAlignError(
                    f"tensor {ctx.name}: linear weights sum to {total:g}, cannot normalize "
                    "(set parameters.normalize: false or change the weights)"
                )
            weights = [w / total for w in weights]
        return weighted_sum(None, [Kept(t) for t in tensors], weights, like=tensors[0])
