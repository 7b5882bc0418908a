"""Per-tensor parameter values: a method parameter as written in the merge config (a scalar, a gradient over
layers, a list of ``{filter, layers, value}``) resolved to one scalar for one tensor.

Gradient positions are mergekit's: t = layer / (n_layers − 1), linear between the points; tensors outside
layers take t = 0 (mergealign.tensor_names.layer_position). In a filter list the first match wins; ``filter``
absent or "*" matches all; ``layers: [first, last]`` also requires the tensor's layer index to lie in
[first, last] (tensors outside layers never match it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mergealign.errors import MergeAlignError
from mergealign.merge.config import Conditional, Scalar
from mergealign.tensor_names import layer_index, layer_position


def _gradient(values: list[Scalar], t: float) -> Scalar:
    if not values:
        return None  # type: ignore[return-value]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not numeric:
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * float(values[i0]) + frac * float(values[i1])


def resolve_value(setting: Any, tensor_name: str, n_layers: int | None) -> Any:
    """One parameter's scalar for one tensor (None when a filter list matches nothing)."""
    if setting is None:
        return None
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, bool | int | float | str):
        return setting
    if isinstance(setting, list):
        if all(isinstance(v, bool | int | float | str) for v in setting):
            return _gradient(setting, layer_position(tensor_name, n_layers))
        idx = layer_index(tensor_name)
        for cond in setting:
            if not isinstance(cond, Conditional):
                continue
            if cond.filter not in (None, "*") and cond.filter not in tensor_name:
                continue
            if cond.layers is not None and (idx is None or not cond.layers[0] <= idx <= cond.layers[1]):
                continue
            return resolve_value(cond.value, tensor_name, n_layers)
        return None
    raise MergeAlignError(f"unexpected parameter value {setting!r}")


def resolve_params(settings: Mapping[str, Any], tensor_name: str, n_layers: int | None) -> dict[str, Any]:
    """Every parameter of a mapping resolved for one tensor; unset (None) ones are left out (method default)."""
    out = {}
    for key, setting in settings.items():
        value = resolve_value(setting, tensor_name, n_layers)
        if value is not None:
            out[key] = value
    return out
