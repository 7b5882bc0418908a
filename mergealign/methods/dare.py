"""DARE drop-and-rescale (Yu et al., ICML 2024), shared by dare_linear and dare_ties.

  τ̃_t = s_t·(m_t ⊙ τ_t),  m_t ~ Bernoulli(density_t) (keep probability = 1 − drop rate p)
  ``rescale_mode``: ``inverse`` s = 1/density (the paper; default) | ``l1`` s = ‖τ_t‖₁/‖m_t⊙τ_t‖₁ (mergekit, equal
  to 1/density only in expectation) | ``none`` s = 1 (DropOnly). mergekit's ``rescale`` is accepted as an alias
  (true = l1, false = none); for mergekit-compatible results set ``rescale_mode: l1``.

The masks come from ``ctx.generator(device, stream=t)``: one stream per model, seeded by (seed, tensor name, t),
drawn in fixed chunks, so a tensor's masks do not depend on which other tensors are merged or in which order.
They differ from mergekit's (which draws from torch's global RNG) and between CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from mergealign.methods.base import MethodParams, ParamSpec, TensorContext
from mergealign.methods.kernels import Kept, KeptRandom, chunk_slices, random_keep

RESCALE_MODES = ("inverse", "l1", "none")

DARE_PARAMS: dict[str, ParamSpec] = {
    "rescale_mode": ParamSpec(
        None,
        "inverse: ×1/density (paper, default); l1: keep the L1 norm (mergekit); none: no rescale",
        kind=str,
        choices=RESCALE_MODES,
    ),
    "rescale": ParamSpec(None, "mergekit alias of rescale_mode: true = l1, false = none", kind=bool),
}


def rescale_mode(globals_: Mapping[str, Any]) -> str:
    """``rescale_mode`` if given, else mergekit's ``rescale`` (true = l1, false = none), else ``inverse``."""
    if globals_.get("rescale_mode") is not None:
        return str(globals_["rescale_mode"])
    if globals_.get("rescale") is not None:
        return "l1" if globals_["rescale"] else "none"
    return "inverse"


class DareDefaults:
    """Mixin: report the resolved ``rescale_mode`` / ``rescale`` as defaults (for logs and model cards)."""

    def default_global(self, name: str, globals_: Mapping[str, Any]) -> Any:
        if name == "rescale_mode":
            return rescale_mode(globals_)
        if name == "rescale":
            return rescale_mode(globals_) == "l1"
        return super().default_global(name, globals_)  # type: ignore[misc]


def validate_rescale(params: MethodParams) -> list[str]:
    mode, flag = params.globals.get("rescale_mode"), params.globals.get("rescale")
    if mode is not None and flag is not None and (mode == "l1") != bool(flag):
        return [
            f"parameters.rescale: {flag} contradicts parameters.rescale_mode: {mode!r} "
            "(rescale is the mergekit name: true = l1, false = none); give only one"
        ]
    return []


def dare_generator_factory(
    ctx: TensorContext, index: int, device: torch.device
) -> Callable[[], torch.Generator]:
    """A function making the (restartable) generator of model ``index``'s mask: stream ``index`` of this tensor."""
    return lambda: ctx.generator(device, stream=index)


def dare_mask(ctx: TensorContext, index: int, like: Tensor, density: float) -> Tensor:
    """The boolean keep-mask that DARE draws for model ``index`` of this tensor (P(keep) = density)."""
    gen = ctx.generator(like.device, stream=index)
    flat = torch.empty(like.numel(), dtype=torch.bool, device=like.device)
    for sl in chunk_slices(flat.numel()):
        flat[sl] = random_keep(gen, sl.stop - sl.start, density, like.device) > 0
    return flat.reshape(like.shape)


def dare_kept(ctx: TensorContext, index: int, tensor: Tensor, density: float, mode: str) -> Kept:
    """The dropped and rescaled task vector τ̃ of model ``index``; density ≥ 1 keeps τ unchanged (as mergekit)."""
    if density >= 1.0:
        return Kept(tensor)
    kept = KeptRandom(tensor, dare_generator_factory(ctx, index, tensor.device), density)
    if mode == "inverse":
        kept.scale = 1.0 / density
    elif mode == "l1":
        kept.l1_rescale()
    return kept
