"""Parameter specs shared by several methods (mergekit names and defaults unless stated)."""

from __future__ import annotations

from mergealign.methods.base import ParamSpec

WEIGHT = ParamSpec(1.0, "weight of this model's contribution (mergekit requires it; here it defaults to 1)")
DENSITY = ParamSpec(1.0, "fraction of the task vector's entries kept", low=0.0, high=1.0, low_open=True)
LAMBDA = ParamSpec(1.0, "scale λ of the merged task vector")
NORMALIZE_FALSE = ParamSpec(
    False, "divide the weighted sum by the sum of weights (mergekit `normalize`)", kind=bool
)
INT8_MASK = ParamSpec(False, "accepted for mergekit configs; no effect (a mergekit memory option)", kind=bool)
RESCALE_L1 = ParamSpec(
    False, "rescale each sparsified task vector to its original L1 norm (mergekit `rescale`)", kind=bool
)
