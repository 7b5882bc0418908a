"""Streamed weight-space similarity of the domain vector τ_D, the alignment vector τ_A and merged models.

With θ_0 the base, τ_D = θ_expert − θ_0, τ_A = θ_aligned − θ_0 and, for each merged model m, δ_m = θ_m − θ_0,
one pass over the checkpoints (one tensor at a time from each, walked in small blocks by a fused kernel —
mergealign.similarity.kernels — so memory stays flat in model size) collects per tensor only *sums*:

- inner products of (θ_0, τ_D, τ_A, δ_m): ``bb, bd, ba, dd, da, aa`` and per merged model ``mb, md, ma, mm``
  (τ and δ formed in float32 as the merge engine does, products accumulated in float64);
- ``both_nonzero`` (entries where τ_D ≠ 0 and τ_A ≠ 0) and ``conflicts`` (entries where they have opposite
  signs);
- TIES trim statistics at density k (``ties_density``, default 0.2): T_D is the set of entries that a per-tensor
  TIES trim keeps, {i : |τ_D,i| ≥ t_D} with t_D the k'-th largest |τ_D| and k' = max(1, int(k·n)) (the engine's
  convention, see mergealign.methods.selection); likewise T_A. Counted: ``top_d`` = |T_D|, ``top_a``,
  ``top_energy_d`` = Σ_{T_D} τ_D², ``top_energy_a``, ``top_both`` = |T_D ∩ T_A| and ``top_both_conflicts``
  (entries of T_D ∩ T_A with opposite signs). t_D is exact for tensors of at most ``ties_sample`` entries;
  for larger ones it is the same order statistic of a seeded random sample of ``ties_sample`` entries (rank
  error ≈ ±0.2 % of n at the default 65 536; ``ties_sample=None`` makes every threshold exact at the cost of
  extra passes). Counts are exact for the recorded thresholds (``thr_d``, ``thr_a``).

Every figure at every level (tensor, layer, module type, layer × module, overall) is derived from these sums
summed over the level's tensors, so aggregates are exact, never averages of per-tensor ratios:

======================  ===========================================================================
``norm_d``, ``norm_a``  ‖τ_D‖ = √dd, ‖τ_A‖ = √aa; ``norm_base`` = ‖θ_0‖; ``rel_norm_d`` = ‖τ_D‖/‖θ_0‖
``cos_da``              cos(τ_D, τ_A) = da / √(dd·aa)
``sign_conflict``       conflicts / both_nonzero: share of opposite signs where both vectors are non-zero
``both_nonzero``        both_nonzero / n
``ties_energy_d``       top_energy_d / dd: share of ‖τ_D‖² that a TIES trim at density k keeps (same for a)
``ties_overlap``        top_both / n (independent masks would give ≈ k²)
``ties_jaccard``        top_both / (top_d + top_a − top_both)
``ties_conflict``       top_both_conflicts / top_both: sign conflicts that TIES's election must resolve
``cos_expert_aligned``  cos(θ_expert, θ_aligned), from the Gram; > 0.9995 means SLERP ≡ linear interpolation
======================  ===========================================================================

Per merged model m (δ = δ_m):

======================  ===========================================================================
``cos_d``, ``cos_a``    cos(δ, τ_D), cos(δ, τ_A); ``norm_delta`` = ‖δ‖
``coef_d``, ``coef_a``  least-squares coefficients of δ ≈ c_D·τ_D + c_A·τ_A (the effective λ_D, λ_A: a
                        MergeAlign merge gives its λs back, up to the output rounding)
``share_d``             c_D·⟨τ_D, δ⟩ / ‖δ‖²: τ_D's share of ‖δ‖² (same for a). share_d + share_a +
                        ``share_residual`` = 1, where share_residual = ‖δ − c_D·τ_D − c_A·τ_A‖² / ‖δ‖² is the
                        part of the merged delta that neither vector explains (TIES, DARE, SLERP)
``cos_expert``          cos(θ_m, θ_expert); ``cos_aligned`` = cos(θ_m, θ_aligned)
======================  ===========================================================================

The standalone pass (:func:`compute_similarity`) reads the checkpoints; :class:`SimilarityObserver` computes
the same sums inside a merge pass from the tensors the engine already holds (whole, or in row blocks). Both use
one kernel that sums row by row into running accumulators, and aggregate tensors in name order, so they give
bit-identical numbers. Merged tensors are rounded to the output dtype first, as the standalone pass reads them
from disk. Without numba (the ``report`` extra) a plain-torch kernel gives the same sums up to float64 rounding.

Outputs of :meth:`SimilarityResult.write` (atomic): ``similarity.json`` (inputs, options, and per level the
sums and metrics), ``tensors.parquet`` (one row per tensor) and ``merged.parquet`` (one row per tensor and
merged model).

Modules: sums (options, TIES thresholds, per-tensor running sums), kernels (numba), accumulate (the
accumulator), metrics (figures from sums), result (aggregates per level), io (files), run (the two passes).
"""

from mergealign.similarity.accumulate import SimilarityAccumulator
from mergealign.similarity.io import load_similarity
from mergealign.similarity.metrics import merged_metrics, pair_metrics
from mergealign.similarity.result import SCHEMA_VERSION, SimilarityResult
from mergealign.similarity.run import (
    SimilarityObserver,
    check_compatible,
    compute_similarity,
    split_merged_specs,
)
from mergealign.similarity.sums import (
    DEFAULT_TIES_DENSITY,
    DEFAULT_TIES_SAMPLE,
    MERGED_SUMS,
    PAIR_SUMS,
    SimilarityOptions,
    TensorSums,
)

__all__ = [
    "DEFAULT_TIES_DENSITY",
    "DEFAULT_TIES_SAMPLE",
    "MERGED_SUMS",
    "PAIR_SUMS",
    "SCHEMA_VERSION",
    "SimilarityAccumulator",
    "SimilarityObserver",
    "SimilarityOptions",
    "SimilarityResult",
    "TensorSums",
    "check_compatible",
    "compute_similarity",
    "load_similarity",
    "merged_metrics",
    "pair_metrics",
    "split_merged_specs",
]
