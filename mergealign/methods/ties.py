"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

  τ̂_t = τ_t ⊙ 𝟙[|τ_t| ≥ k_t-th largest |τ_t|],  k_t = max(1, int(density_t·n));  θ = θ_0 + λ·merge(τ̂)
  before (mergekit): γ = sgn(Σ w_t·τ̂_t), A = {t: sgn(w_t·τ̂_t) = γ}, mean = Σ_A w_t·τ̂_t / Σ_A w_t, sum = Σ_A w_t·τ̂_t
  after (paper Alg. 1): γ = sgn(Σ τ̂_t), A = {t: sgn(τ̂_t) = γ}, mean = Σ_A w_t·τ̂_t / |A|, sum = Σ_A w_t·τ̂_t

Options (global parameters), with their defaults under ``convention`` mergekit (default) / paper:
- ``topk_scope``: ``tensor`` (mergekit: k-th largest per tensor) / ``model`` (paper reference code: one threshold
  per task vector over the whole flattened model, an exact k-th largest over every tensor the engine passes to
  ``observe``; needs two observe passes, histograms of the float32 bit patterns, memory-flat).
- ``weights_in_election``: ``before`` / ``after`` (see above; with unit weights both are the paper's formula).
- ``merge_func``: ``mean`` / ``mean`` (disjoint mean) or ``sum``; mergekit's ``normalize`` is accepted as its alias
  (true = mean, false = sum).
- ``zero_sign`` (γ where Σ is exactly 0): ``positive`` (mergekit: counts as +) / ``majority`` (reference code: the
  sign of Σγ; over this tensor here, over the whole model there; it matters only where entries cancel exactly).
- per-model ``density``: 1.0 (mergekit default: no trim) / 0.2 (the paper's k = 20 %); ``lambda`` 1 / 1;
  ``rescale`` false: true L1-rescales each trimmed vector to its untrimmed norm (mergekit ``rescale``).
Entries equal to the threshold are all kept (as the reference code), so ties at the threshold may keep a few more
than k; mergekit keeps an arbitrary k of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor

from mergealign.errors import MergeAlignError
from mergealign.methods.base import MergeMethod, MethodParams, ParamSpec, TensorContext
from mergealign.methods.kernels import ConsensusOptions, KeptAboveThreshold, ties_consensus
from mergealign.methods.params import DENSITY, INT8_MASK, LAMBDA, RESCALE_L1, WEIGHT
from mergealign.methods.selection import KthLargestAbs, flat_chunks, keep_count, kth_largest_abs
from mergealign.methods.study import StudyMapping, VectorWeights

CONVENTIONS = ("mergekit", "paper")

# Options of the sign election and disjoint merge, shared with dare_ties.
CONSENSUS_PARAMS: dict[str, ParamSpec] = {
    "convention": ParamSpec(
        "mergekit", "sets the defaults of the options below: mergekit or paper", kind=str, choices=CONVENTIONS
    ),
    "weights_in_election": ParamSpec(
        None,
        "before: weights scale τ before the sign vote (mergekit); after: unweighted vote (paper)",
        kind=str,
        choices=("before", "after"),
    ),
    "merge_func": ParamSpec(
        None, "disjoint mean or sum of the agreeing entries", kind=str, choices=("mean", "sum")
    ),
    "normalize": ParamSpec(None, "mergekit alias of merge_func: true = mean, false = sum", kind=bool),
    "zero_sign": ParamSpec(
        None,
        "sign of an exactly-zero vote: positive (mergekit) or majority (paper reference code)",
        kind=str,
        choices=("positive", "majority"),
    ),
    "lambda": LAMBDA,
    "int8_mask": INT8_MASK,
}

_CONVENTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "mergekit": {
        "weights_in_election": "before",
        "merge_func": "mean",
        "zero_sign": "positive",
        "topk_scope": "tensor",
        "density": 1.0,
    },
    "paper": {
        "weights_in_election": "after",
        "merge_func": "mean",
        "zero_sign": "majority",
        "topk_scope": "model",
        "density": 0.2,
    },
}


class ConsensusMethodBase(MergeMethod):
    """Parameter handling shared by ties and dare_ties (convention-dependent defaults, normalize alias)."""

    convention_defaults: ClassVar[dict[str, dict[str, Any]]] = _CONVENTION_DEFAULTS

    def _convention(self, globals_: Mapping[str, Any]) -> str:
        return globals_.get("convention") or "mergekit"

    def default_global(self, name: str, globals_: Mapping[str, Any]) -> Any:
        defaults = self.convention_defaults[self._convention(globals_)]
        if name == "merge_func" and globals_.get("normalize") is not None:
            return "mean" if globals_["normalize"] else "sum"
        if name == "normalize":
            return self.g(globals_, "merge_func") == "mean"
        if name in defaults:
            return defaults[name]
        return super().default_global(name, globals_)

    def default_model(self, name: str, globals_: Mapping[str, Any]) -> Any:
        defaults = self.convention_defaults[self._convention(globals_)]
        return defaults[name] if name in defaults else super().default_model(name, globals_)

    def consensus_options(self, globals_: Mapping[str, Any]) -> ConsensusOptions:
        return ConsensusOptions(
            weights_in_election=self.g(globals_, "weights_in_election"),
            merge_func=self.g(globals_, "merge_func"),
            zero_sign=self.g(globals_, "zero_sign"),
            lam=float(self.g(globals_, "lambda")),
        )

    def validate_extra(self, params: MethodParams) -> list[str]:
        mf, norm = params.globals.get("merge_func"), params.globals.get("normalize")
        if mf is not None and norm is not None and (mf == "mean") != bool(norm):
            return [
                f"parameters.normalize: {norm} contradicts parameters.merge_func: {mf!r} "
                "(normalize is the mergekit name: true = mean, false = sum); give only one"
            ]
        return []


class TiesMethod(ConsensusMethodBase):
    name: ClassVar[str] = "ties"
    study: ClassVar[StudyMapping] = VectorWeights()
    formula: ClassVar[str] = "θ_0 + λ·disjoint_merge(trim_top_density(τ_t), elected sign)"
    requires_base: ClassVar[bool] = True
    uses_deltas: ClassVar[bool] = True
    needs_model_pass: ClassVar[bool] = True  # only with topk_scope: model
    global_params: ClassVar[dict[str, ParamSpec]] = {
        **CONSENSUS_PARAMS,
        "topk_scope": ParamSpec(
            None,
            "tensor: top-k per tensor (mergekit); model: over the whole model per task vector (paper code)",
            kind=str,
            choices=("tensor", "model"),
        ),
        "rescale": RESCALE_L1,
    }
    model_params: ClassVar[dict[str, ParamSpec]] = {
        "weight": WEIGHT,
        "density": ParamSpec(
            None, DENSITY.doc + " (default 1.0 mergekit, 0.2 paper)", low=0.0, high=1.0, low_open=True
        ),
    }

    def __init__(self) -> None:
        self._selectors: dict[int, KthLargestAbs] = {}
        self._densities: dict[int, float] = {}
        self._thresholds: list[float] | None = None
        self._pass = -1

    # ------------------------------------------------------------ whole-model top-k
    def observe_passes(self, globals_: Mapping[str, Any]) -> int:
        if self.g(globals_, "topk_scope") != "model" or self._thresholds is not None:
            return 0
        return 2

    def observe(self, ctx: TensorContext, base: Tensor | None, tensors: Sequence[Tensor]) -> None:
        """Pass 0 counts the high bits of every |τ_t|, pass 1 the low bits inside the bin of the k-th largest."""
        if ctx.observe_pass not in (0, 1):
            raise MergeAlignError(f"ties: observe pass {ctx.observe_pass} (only passes 0 and 1 exist)")
        if len(tensors) != len(ctx.model):
            raise MergeAlignError(f"tensor {ctx.name}: {len(tensors)} tensors for {len(ctx.model)} models")
        if ctx.observe_pass == 1 and self._pass == 0:
            for i, sel in self._selectors.items():
                sel.plan([keep_count(self._densities[i], sel.count)])
        self._pass = ctx.observe_pass
        for i, t in enumerate(tensors):
            density = float(self.m(ctx, i, "density"))
            seen = self._densities.setdefault(i, density)
            if seen != density:
                raise MergeAlignError(
                    f"tensor {ctx.name}: models[{i}].parameters.density is {density} here but {seen} on other "
                    "tensors; topk_scope: model needs one density per model"
                )
            if density >= 1.0:
                continue
            sel = self._selectors.setdefault(i, KthLargestAbs(t.device))
            if ctx.observe_pass == 1 and not sel.planned:
                raise MergeAlignError(
                    f"tensor {ctx.name}: ties observe pass 1 saw a model that pass 0 did not"
                )
            for c in flat_chunks(t):
                sel.add(c)

    def model_thresholds(self) -> list[float]:
        """Per input model, the |τ| threshold of the whole-model trim (0.0 = keep all); ends the observe passes."""
        if self._thresholds is None:
            if self._pass != 1:
                raise MergeAlignError(
                    "ties with topk_scope: model needs two observe() passes over every tensor before merge() "
                    "(see observe_passes), or thresholds restored with set_model_thresholds()"
                )
            n = max(self._densities, default=-1) + 1
            self._thresholds = [
                self._selectors[i].values()[0] if i in self._selectors else 0.0 for i in range(n)
            ]
        return list(self._thresholds)

    def set_model_thresholds(self, thresholds: Sequence[float]) -> None:
        """Restore thresholds saved from ``model_thresholds()`` (e.g. on resume), skipping the observe passes."""
        self._thresholds = [float(x) for x in thresholds]

    # ------------------------------------------------------------ merge
    def tensor_threshold(self, t: Tensor, density: float) -> float:
        """k-th largest |τ| of one tensor, k = max(1, int(density·n)); 0.0 (keep all) when density ≥ 1."""
        if density >= 1.0 or t.numel() == 0:
            return 0.0
        return kth_largest_abs(t, [keep_count(density, t.numel())])[0]

    def merge(self, ctx: TensorContext, base: Tensor | None, tensors: Sequence[Tensor]) -> Tensor:
        self.check_inputs(ctx, base, tensors)
        assert base is not None
        if self.g(ctx.globals, "topk_scope") == "model":
            thresholds = self.model_thresholds()
            if len(thresholds) < len(tensors):
                raise MergeAlignError(f"tensor {ctx.name}: no whole-model threshold for some models")
        else:
            thresholds = [
                self.tensor_threshold(t, float(self.m(ctx, i, "density"))) for i, t in enumerate(tensors)
            ]
        kept = [KeptAboveThreshold(t, thr) for t, thr in zip(tensors, thresholds, strict=False)]
        if self.g(ctx.globals, "rescale"):
            for k in kept:
                k.l1_rescale()
        weights = [float(self.m(ctx, i, "weight")) for i in range(len(tensors))]
        out = tensors[0] if ctx.inputs_disposable else None
        return ties_consensus(base, kept, weights, self.consensus_options(ctx.globals), out=out)
