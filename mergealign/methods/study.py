"""How a study's coefficients become one method's merge config: each method owns this mapping.

A study's merge entry names a method and, optionally, a λ grid, a preset (``interp``: λ_D = λ, λ_A = 1 − λ;
``sum``: λ_D = λ_A = 1) or explicit λ_D, λ_A, plus the method's own ``parameters``. A method declares, as its
class attribute ``study``, one StudyMapping that says whether those knobs apply to it and how they turn into
an engine merge config over the study's three models, which the config names by placeholder (BASE, EXPERT,
ALIGNED; the study fills in the folders per run). Adding a method is one module: it picks a mapping here (or
writes its own) and nothing outside methods/ changes.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

BASE, EXPERT, ALIGNED = "@base", "@expert", "@aligned"
PLACEHOLDERS = (BASE, EXPERT, ALIGNED)
PRESETS = ("interp", "sum")
DEFAULT_LAMBDA = 0.5


@dataclass(frozen=True)
class Coefficients:
    """What a study says about one merge: one λ of its grid (None: the default), its preset, explicit λ_D, λ_A."""

    lam: float | None = None
    preset: str | None = None
    lambda_domain: float | None = None
    lambda_alignment: float | None = None

    @property
    def explicit(self) -> bool:
        return self.lambda_domain is not None or self.lambda_alignment is not None

    def vector_weights(self) -> tuple[float, float]:
        """(λ_D, λ_A): explicit values, else the preset's (interp with λ, default 0.5; sum: 1, 1)."""
        if self.explicit:
            return (float(self.lambda_domain or 0.0), float(self.lambda_alignment or 0.0))
        if self.preset == "sum":
            return (1.0, 1.0)
        lam = DEFAULT_LAMBDA if self.lam is None else float(self.lam)
        return (lam, 1.0 - lam)

    def interpolation(self) -> float:
        """The one interpolation factor of a method with a single knob (λ, default 0.5)."""
        return DEFAULT_LAMBDA if self.lam is None else float(self.lam)


class StudyMapping(ABC):
    """How a study's λ / preset / λ_D, λ_A map onto one method's parameters."""

    takes_lambda: ClassVar[bool] = False  # a λ grid makes sense (one merged model per λ)
    takes_preset: ClassVar[bool] = False  # the method weights τ_D and τ_A: preset and explicit λ_D, λ_A apply

    def grid(self, lambdas: Sequence[float] | None, c: Coefficients) -> list[float | None]:
        """The λ values of one merge entry (None: the method's own default, or explicit λ_D, λ_A)."""
        if lambdas is not None:
            return list(lambdas)
        if c.explicit or c.preset == "sum" or not self.takes_lambda:
            return [None]
        return [DEFAULT_LAMBDA]

    def label(self, method: str, c: Coefficients) -> str:
        """The entry's default name (the merge id adds the expert and `-l<λ>` for grid values)."""
        if self.takes_preset and not c.explicit:
            return f"{method}-{c.preset or 'interp'}"
        return method.replace("_", "-")

    def weights(self, c: Coefficients) -> tuple[float, float] | None:
        """(λ_D, λ_A) this merge gives the expert and the aligned model, for reports; None if not meaningful."""
        return c.vector_weights() if self.takes_preset else None

    @abstractmethod
    def config(self, method: str, c: Coefficients, parameters: Mapping[str, Any]) -> dict[str, Any]:
        """The engine merge config (mergekit schema + extensions) with model placeholders."""

    def read(self, config: Mapping[str, Any]) -> Coefficients:
        """The coefficients of a config this mapping made (contribution variants start from one)."""
        raise NotImplementedError("this mapping cannot read coefficients back from a config")


def _params(parameters: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(dict(parameters))


def _role_weight(config: Mapping[str, Any], role: str) -> float:
    model = next(m for m in config.get("models", []) if m.get("role") == role)
    return float((model.get("parameters") or {}).get("weight", 1.0))


class VectorWeights(StudyMapping):
    """θ_0 + λ_D·τ_D + λ_A·τ_A through the method's per-model ``weight`` (task arithmetic, TIES, DARE, ...)."""

    takes_lambda = True
    takes_preset = True

    def config(self, method: str, c: Coefficients, parameters: Mapping[str, Any]) -> dict[str, Any]:
        lam_d, lam_a = c.vector_weights()
        return {
            "merge_method": method,
            "base_model": BASE,
            "models": [
                {"model": EXPERT, "role": "domain", "parameters": {"weight": lam_d}},
                {"model": ALIGNED, "role": "alignment", "parameters": {"weight": lam_a}},
            ],
            "parameters": _params(parameters),
        }

    def read(self, config: Mapping[str, Any]) -> Coefficients:
        return Coefficients(lambda_domain=_role_weight(config, "domain"),
                            lambda_alignment=_role_weight(config, "alignment"))  # fmt: skip


class OwnLambdas(StudyMapping):
    """The method takes ``preset``, ``lambda``, ``lambda_domain`` and ``lambda_alignment`` itself (MergeAlign)."""

    takes_lambda = True
    takes_preset = True

    def config(self, method: str, c: Coefficients, parameters: Mapping[str, Any]) -> dict[str, Any]:
        params = _params(parameters)
        params["preset"] = c.preset or "interp"
        if c.explicit:
            params.update(lambda_domain=c.lambda_domain, lambda_alignment=c.lambda_alignment)
        elif c.lam is not None:
            params["lambda"] = c.lam
        return {
            "merge_method": method,
            "base_model": BASE,
            "models": [{"model": EXPERT, "role": "domain"}, {"model": ALIGNED, "role": "alignment"}],
            "parameters": params,
        }

    def read(self, config: Mapping[str, Any]) -> Coefficients:
        params = config.get("parameters") or {}
        return Coefficients(lam=params.get("lambda"), preset=params.get("preset"),
                            lambda_domain=params.get("lambda_domain"),
                            lambda_alignment=params.get("lambda_alignment"))  # fmt: skip


class Interpolation(StudyMapping):
    """λ·θ_expert + (1 − λ)·θ_aligned through per-model weights, no base (linear)."""

    takes_lambda = True

    def weights(self, c: Coefficients) -> tuple[float, float]:
        lam = c.interpolation()
        return (lam, 1.0 - lam)

    def config(self, method: str, c: Coefficients, parameters: Mapping[str, Any]) -> dict[str, Any]:
        lam = c.interpolation()
        return {
            "merge_method": method,
            "models": [
                {"model": EXPERT, "role": "domain", "parameters": {"weight": lam}},
                {"model": ALIGNED, "role": "alignment", "parameters": {"weight": 1.0 - lam}},
            ],
            "parameters": _params(parameters),
        }


class Parameter(StudyMapping):
    """λ is one global parameter of the method (SLERP's ``t``) over a given base and models."""

    takes_lambda = True

    def __init__(self, name: str, base: str, models: Sequence[tuple[str, str]]):
        self.name = name
        self.base = base
        self.models = tuple(models)  # (placeholder, role), in the method's order

    def weights(self, c: Coefficients) -> tuple[float, float]:
        lam = c.interpolation()
        return (lam, 1.0 - lam)

    def config(self, method: str, c: Coefficients, parameters: Mapping[str, Any]) -> dict[str, Any]:
        params = _params(parameters)
        if c.lam is not None:  # a grid value wins over the parameter as written
            params[self.name] = c.lam
        else:
            params.setdefault(self.name, DEFAULT_LAMBDA)
        return {
            "merge_method": method,
            "base_model": self.base,
            "models": [{"model": model, "role": role} for model, role in self.models],
            "parameters": params,
        }


class AsGiven(StudyMapping):
    """No λ: the expert and the aligned model over the base, with the method's parameters as given."""

    def config(self, method: str, c: Coefficients, parameters: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "merge_method": method,
            "base_model": BASE,
            "models": [{"model": EXPERT, "role": "domain"}, {"model": ALIGNED, "role": "alignment"}],
            "parameters": _params(parameters),
        }


def fill(config: Any, folders: Mapping[str, str]) -> Any:
    """A config with its placeholders (BASE, EXPERT, ALIGNED) replaced by the folders they stand for."""
    if isinstance(config, str):
        return folders.get(config, config)
    if isinstance(config, Mapping):
        return {k: fill(v, folders) for k, v in config.items()}
    if isinstance(config, list):
        return [fill(v, folders) for v in config]
    return config
