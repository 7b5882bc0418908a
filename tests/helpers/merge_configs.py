"""The merge config of a trio, as most merge tests write it: the expert as the domain model, the aligned model
as the alignment model, over the trio's base.

    from tests.helpers.merge_configs import merge_config
    merge_config(trio)                                            # MergeAlign with its defaults
    merge_config(trio, "ties", {"topk_scope": "model"}, domain={"weight": 0.75, "density": 0.3},
                 alignment={"weight": 0.5, "density": 0.3}, dtype="bfloat16")

Keys are written only when given (no "parameters" without parameters), so a test states exactly the config it
means; tests whose config differs on purpose (no base, one model, task-vector inputs, relative paths) write
their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class TrioLike(Protocol):
    base: Path
    aligned: Path
    expert: Path


def _model(path: Path, role: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": str(path), "role": role}
    if parameters is not None:
        entry["parameters"] = parameters
    return entry


def merge_config(
    trio: TrioLike,
    method: str = "mergealign",
    parameters: dict[str, Any] | None = None,
    *,
    domain: dict[str, Any] | None = None,
    alignment: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """{merge_method, base_model, models: [expert as domain, aligned as alignment], parameters, **extra}.

    `domain` / `alignment`: the per-model parameters of the expert / the aligned model (None: no key);
    `extra`: further top-level fields (dtype, shard_size, seed, vocab_policy ...), in the order given.
    """
    cfg: dict[str, Any] = {
        "merge_method": method,
        "base_model": str(trio.base),
        "models": [_model(trio.expert, "domain", domain), _model(trio.aligned, "alignment", alignment)],
    }
    if parameters is not None:
        cfg["parameters"] = parameters
    return {**cfg, **extra}
