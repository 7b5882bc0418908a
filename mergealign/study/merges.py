"""A planned merge made concrete: the engine's merge config for the study's three model folders.

The plan holds a merge as its method, coefficients, parameters, options and, for a contribution variant, its
scope; the method's own study mapping (mergealign.methods.study) turns that into an engine config. A scope's
module filters and layer range depend on the base model's tensor names, so they are resolved here, when the
models are there, not when the plan is made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mergealign.methods import get_method
from mergealign.methods.study import ALIGNED, BASE, EXPERT, Coefficients, fill


def coefficients(params: Mapping[str, Any]) -> Coefficients:
    c = params.get("coefficients") or {}
    return Coefficients(lam=c.get("lambda"), preset=c.get("preset"), lambda_domain=c.get("lambda_domain"),
                        lambda_alignment=c.get("lambda_alignment"))  # fmt: skip


def template(params: Mapping[str, Any]) -> dict[str, Any]:
    """The engine config of a planned merge with model placeholders (no scope applied)."""
    method = params["method"]
    cfg = get_method(method).study.config(method, coefficients(params), params.get("parameters") or {})
    cfg.update(params.get("options") or {})
    cfg["copy_files_from"] = (
        ALIGNED  # config, tokenizer, chat template and generation_config of the aligned model
    )
    return cfg


def engine_config(
    params: Mapping[str, Any],
    folders: Mapping[str, str],
    *,
    tensor_names: Sequence[str] | None = None,
    n_layers: int | None = None,
) -> dict[str, Any]:
    """The engine config of a planned merge (`Step.params` of a merge step) over `folders` (base, expert,
    aligned). A scope is resolved from `tensor_names` / `n_layers`, or from the base model's headers."""
    return resolve(params, folders, tensor_names=tensor_names, n_layers=n_layers)[0]


def resolve(
    params: Mapping[str, Any],
    folders: Mapping[str, str],
    *,
    tensor_names: Sequence[str] | None = None,
    n_layers: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(engine config, the variant's description with its resolved part, or None for a plain merge)."""
    cfg = fill(
        template(params), {BASE: folders["base"], EXPERT: folders["expert"], ALIGNED: folders["aligned"]}
    )
    scope = params.get("scope")
    if not scope:
        return cfg, None
    from mergealign.contributions import scope_variant

    variant = scope_variant(cfg, scope, tensor_names=tensor_names, n_layers=n_layers)
    return variant.config, variant.describe()
