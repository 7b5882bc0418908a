"""Model Breadcrumbs (Davari & Belilovsky 2023): drop the largest and the smallest |τ|, then task arithmetic.

  M_t = 𝟙[|τ_t| not among the n_top largest] ⊙ 𝟙[|τ_t| not among the n_bot smallest];  θ = θ_0 + λ·Σ w_t·M_t⊙τ_t
  n_top = int(gamma·n), kept = int(density·n), n_bot = max(0, n − kept − n_top)   (÷ Σ w_t when ``normalize``)

mergekit convention (default, ``granularity: tensor``): n counts the whole flattened tensor; ``density`` is the
final kept fraction and ``gamma`` the removed top fraction (default 0.01); when density + gamma > 1 fewer top
entries are removed so that ``density`` is kept; density ≥ 1 keeps everything. ``granularity: row`` applies the
same counts to each row along the last dimension (the reference repository's TaskVectorMiddleKeep, whose β is
our density and γ our gamma). Entries equal to a boundary value are all kept. ``rescale`` L1-rescales M_t⊙τ_t.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from mergealign.methods.base import MergeMethod, ParamSpec, TensorContext, chunk_elements
from mergealign.methods.kernels import Kept, KeptBand, KeptMasked, gta_coefficients, weighted_sum
from mergealign.methods.params import DENSITY, INT8_MASK, LAMBDA, NORMALIZE_FALSE, RESCALE_L1, WEIGHT
from mergealign.methods.selection import kth_largest_abs
from mergealign.methods.study import StudyMapping, VectorWeights


def band_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_bot, kept): in ascending |τ| order the kept entries are ranks n_bot+1 … n_bot+kept (as mergekit)."""
    kept = int(density * n)
    n_top = int(gamma * n)
    return max(0, n - kept - n_top), kept


def tensor_band(t: Tensor, density: float, gamma: float) -> Kept:
    n = t.numel()
    n_bot, kept = band_counts(n, density, gamma)
    if kept == 0:
        return KeptBand(t, 1.0, 0.0)  # hi < lo: nothing kept
    # ascending rank r is the (n − r + 1)-th largest
    lo, hi = kth_largest_abs(t, [n - n_bot, n - n_bot - kept + 1])
    return KeptBand(t, lo, hi)


def row_band(t: Tensor, density: float, gamma: float) -> Kept:
    rows = t.reshape(-1, t.shape[-1]) if t.dim() > 0 else t.reshape(1, 1)
    n = rows.shape[1]
    n_bot, kept = band_counts(n, density, gamma)
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=t.device)
    if kept > 0:
        block = max(1, chunk_elements() // max(1, n))
        for start in range(0, rows.shape[0], block):
            a = rows[start : start + block].abs()
            lo = torch.kthvalue(a, n_bot + 1, dim=1, keepdim=True).values
            hi = torch.kthvalue(a, n_bot + kept, dim=1, keepdim=True).values
            torch.logical_and(a >= lo, a <= hi, out=mask[start : start + block])
    return KeptMasked(t, mask.reshape(t.shape))


class BreadcrumbsMethod(MergeMethod):
    name: ClassVar[str] = "breadcrumbs"
    study: ClassVar[StudyMapping] = VectorWeights()
    formula: ClassVar[str] = (
        "θ_0 + λ·Σ w_t·M_t⊙τ_t, M_t drops the gamma largest and the smallest |τ|, keeps density"
    )
    requires_base: ClassVar[bool] = True
    uses_deltas: ClassVar[bool] = True
    global_params: ClassVar[dict[str, ParamSpec]] = {
        "lambda": LAMBDA,
        "normalize": NORMALIZE_FALSE,
        "rescale": RESCALE_L1,
        "int8_mask": INT8_MASK,
        "granularity": ParamSpec(
            "tensor",
            "tensor: counts over the flattened tensor (mergekit); row: per row of the last dim (paper code)",
            kind=str,
            choices=("tensor", "row"),
        ),
    }
    model_params: ClassVar[dict[str, ParamSpec]] = {
        "weight": WEIGHT,
        "density": DENSITY,
        "gamma": ParamSpec(0.01, "fraction of the largest |τ| removed", low=0.0, high=1.0, high_open=True),
    }

    def merge(self, ctx: TensorContext, base: Tensor | None, tensors: Sequence[Tensor]) -> Tensor:
        self.check_inputs(ctx, base, tensors)
        per_row = self.g(ctx.globals, "granularity") == "row"
        kept: list[Kept] = []
        for i, t in enumerate(tensors):
            density, gamma = float(self.m(ctx, i, "density")), float(self.m(ctx, i, "gamma"))
            if density >= 1.0 or t.numel() == 0:
                kept.append(Kept(t))
            else:
                kept.append(row_band(t, density, gamma) if per_row else tensor_band(t, density, gamma))
        if self.g(ctx.globals, "rescale"):
            for k in kept:
                k.l1_rescale()
        weights = [float(self.m(ctx, i, "weight")) for i in range(len(tensors))]
        coeffs = gta_coefficients(
            float(self.g(ctx.globals, "lambda")), weights, self.g(ctx.globals, "normalize")
        )
        return weighted_sum(base, kept, coeffs, like=tensors[0])
