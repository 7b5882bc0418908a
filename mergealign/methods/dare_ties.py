"""DARE + TIES (mergekit ``dare_ties``): DARE's random drop and rescale replaces the magnitude trim, then the TIES
sign election and disjoint merge: θ = θ_0 + λ·merge(τ̃) with τ̃_t = s_t·(m_t ⊙ τ_t) (mergealign.methods.dare)
and merge() as in mergealign.methods.ties (same options and ``convention``; under mergekit the default
merge_func is ``sum``, i.e. mergekit's normalize=false for dare_ties).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor

from mergealign.methods.base import MethodParams, ParamSpec, TensorContext
from mergealign.methods.dare import DARE_PARAMS, DareDefaults, dare_kept, rescale_mode, validate_rescale
from mergealign.methods.kernels import ties_consensus
from mergealign.methods.params import DENSITY, WEIGHT
from mergealign.methods.study import StudyMapping, VectorWeights
from mergealign.methods.ties import CONSENSUS_PARAMS, ConsensusMethodBase

_DARE_TIES_DEFAULTS: dict[str, dict[str, Any]] = {
    "mergekit": {
        "weights_in_election": "before",
        "merge_func": "sum",
        "zero_sign": "positive",
        "density": 1.0,
    },
    "paper": {"weights_in_election": "after", "merge_func": "mean", "zero_sign": "majority", "density": 1.0},
}


class DareTiesMethod(DareDefaults, ConsensusMethodBase):
    name: ClassVar[str] = "dare_ties"
    study: ClassVar[StudyMapping] = VectorWeights()
    formula: ClassVar[str] = "θ_0 + λ·disjoint_merge(s_t·(m_t⊙τ_t), elected sign), m_t ~ Bernoulli(density)"
    requires_base: ClassVar[bool] = True
    uses_deltas: ClassVar[bool] = True
    convention_defaults: ClassVar[dict[str, dict[str, Any]]] = _DARE_TIES_DEFAULTS
    global_params: ClassVar[dict[str, ParamSpec]] = {**CONSENSUS_PARAMS, **DARE_PARAMS}
    model_params: ClassVar[dict[str, ParamSpec]] = {"weight": WEIGHT, "density": DENSITY}

    def validate_extra(self, params: MethodParams) -> list[str]:
        return super().validate_extra(params) + validate_rescale(params)

    def merge(self, ctx: TensorContext, base: Tensor | None, tensors: Sequence[Tensor]) -> Tensor:
        self.check_inputs(ctx, base, tensors)
        assert base is not None
        mode = rescale_mode(ctx.globals)
        kept = [dare_kept(ctx, i, t, float(self.m(ctx, i, "density")), mode) for i, t in enumerate(tensors)]
        weights = [float(self.m(ctx, i, "weight")) for i in range(len(tensors))]
        out = tensors[0] if ctx.inputs_disposable else None
        return ties_consensus(base, kept, weights, self.consensus_options(ctx.globals), out=out)
