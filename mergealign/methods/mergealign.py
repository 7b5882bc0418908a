"""MergeAlign (Thakkar et al., ACL 2025): θ = θ_0 + λ_D·Σ_{domain} w_i·τ_i + λ_A·Σ_{alignment} w_i·τ_i.

Presets: ``interp`` λ_D = λ, λ_A = 1 − λ (one expert, unit weights: λ·θ_expert + (1 − λ)·θ_aligned);
``sum`` λ_D = λ_A = 1 (θ_expert + θ_aligned − θ_0). ``lambda_domain`` / ``lambda_alignment`` override either.
Each input model has a ``role`` (domain | alignment) and a ``weight`` (default 1); several domain models may be
merged (each gets λ_D). This is mergekit's ``task_arithmetic`` with weights λ_D·w and λ_A·w.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor

from mergealign.errors import MergeAlignError
from mergealign.methods.base import MergeMethod, MethodParams, ParamSpec, TensorContext
from mergealign.methods.kernels import Kept, weighted_sum
from mergealign.methods.params import WEIGHT
from mergealign.methods.study import OwnLambdas, StudyMapping

ROLES = ("domain", "alignment")
PRESETS = ("interp", "sum")
DEFAULT_LAMBDA = 0.5


def resolve_lambdas(globals_: Mapping[str, Any]) -> tuple[float, float]:
    """(λ_D, λ_A) from ``preset`` (default interp), ``lambda`` (default 0.5) and the explicit overrides."""
    preset = globals_.get("preset") or "interp"
    if preset not in PRESETS:
        raise MergeAlignError(f"parameters.preset: must be one of {', '.join(PRESETS)}, got {preset!r}")
    if preset == "interp":
        lam = globals_.get("lambda")
        lam = DEFAULT_LAMBDA if lam is None else float(lam)
        lam_d, lam_a = lam, 1.0 - lam
    else:
        lam_d = lam_a = 1.0
    if globals_.get("lambda_domain") is not None:
        lam_d = float(globals_["lambda_domain"])
    if globals_.get("lambda_alignment") is not None:
        lam_a = float(globals_["lambda_alignment"])
    return lam_d, lam_a


def resolve_coefficients(
    globals_: Mapping[str, Any], roles: Sequence[str], weights: Sequence[float] | None = None
) -> list[float]:
    """Per-model coefficient c_i = λ_{role_i}·w_i, so θ = θ_0 + Σ_i c_i·τ_i. ``weights`` default to 1."""
    lam_d, lam_a = resolve_lambdas(globals_)
    weights = [1.0] * len(roles) if weights is None else list(weights)
    if len(weights) != len(roles):
        raise MergeAlignError(f"mergealign: {len(roles)} roles but {len(weights)} weights")
    out = []
    for i, (role, w) in enumerate(zip(roles, weights, strict=True)):
        if role not in ROLES:
            raise MergeAlignError(
                f"models[{i}].parameters.role: must be one of {', '.join(ROLES)}, got {role!r}"
            )
        out.append((lam_d if role == "domain" else lam_a) * float(w))
    return out


class MergeAlignMethod(MergeMethod):
    name: ClassVar[str] = "mergealign"
    study: ClassVar[StudyMapping] = OwnLambdas()
    formula: ClassVar[str] = (
        "θ_0 + λ_D·Σ_domain w·τ + λ_A·Σ_alignment w·τ (interp: λ_D=λ, λ_A=1−λ; sum: 1, 1)"
    )
    requires_base: ClassVar[bool] = True
    uses_deltas: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True
    min_models: ClassVar[int] = 2
    global_params: ClassVar[dict[str, ParamSpec]] = {
        "preset": ParamSpec("interp", "interp: λ_D=λ, λ_A=1−λ; sum: λ_D=λ_A=1", kind=str, choices=PRESETS),
        "lambda": ParamSpec(None, "λ of the interp preset (default 0.5)", low=0.0, high=1.0),
        "lambda_domain": ParamSpec(None, "explicit λ_D, overrides the preset"),
        "lambda_alignment": ParamSpec(None, "explicit λ_A, overrides the preset"),
    }
    model_params: ClassVar[dict[str, ParamSpec]] = {
        "role": ParamSpec(
            None, "domain (expert) or alignment (aligned model)", kind=str, choices=ROLES, required=True
        ),
        "weight": WEIGHT,
    }

    def default_global(self, name: str, globals_: Mapping[str, Any]) -> Any:
        if name == "lambda":
            return DEFAULT_LAMBDA if (globals_.get("preset") or "interp") == "interp" else None
        return super().default_global(name, globals_)

    def validate_extra(self, params: MethodParams) -> list[str]:
        problems = []
        roles = [m.get("role") for m in params.models]
        for role in ROLES:
            if role not in roles:
                problems.append(f"models: method 'mergealign' needs at least one model with role {role!r}")
        if params.globals.get("preset") == "sum" and params.globals.get("lambda") is not None:
            problems.append(
                "parameters.lambda: has no effect with preset 'sum' (λ_D = λ_A = 1); "
                "use lambda_domain / lambda_alignment to scale the vectors"
            )
        return problems

    def merge(self, ctx: TensorContext, base: Tensor | None, tensors: Sequence[Tensor]) -> Tensor:
        self.check_inputs(ctx, base, tensors)
        roles = [self.m(ctx, i, "role") for i in range(len(tensors))]
        weights = [float(self.m(ctx, i, "weight")) for i in range(len(tensors))]
        coeffs = resolve_coefficients(ctx.globals, roles, weights)
        return weighted_sum(base, [Kept(t) for t in tensors], coeffs, like=tensors[0])
