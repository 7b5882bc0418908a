"""Contribution analysis: which parts of τ_A carry the safety gain, which parts of τ_D carry the knowledge.

Given a base MergeAlign merge config (θ = θ_0 + λ_D·τ_D + λ_A·τ_A, roles ``domain`` / ``alignment``), a
*scope variant* keeps one vector only in a part of the model (or everywhere but there) and the other vector
everywhere:

    θ = θ_0 + λ_D·w_D(t)·τ_D + λ_A·w_A(t)·τ_A,   w(t) = 1 inside the part, 0 outside (``~part``: the reverse)

Scopes are written ``VECTOR@PART``: VECTOR ``align`` (τ_A) or ``domain`` (τ_D); PART a module group —
``attn`` (q/k/v/o), ``mlp`` (gate/up/down), one projection (``attn_q`` … ``mlp_down``), ``norm``, ``embed``
(input embeddings), ``lm_head`` — or a layer range — ``first_half`` (blocks 0 … ⌈L/2⌉−1), ``second_half``,
``layers:A-B`` (blocks A … B, inclusive). ``~PART`` is the complement (``align@~attn``: τ_A everywhere but
attention). Layer ranges hold transformer blocks only: embeddings, the final norm and lm_head lie outside.

A variant is an ordinary merge config the engine runs: the scoped model's ``weight`` becomes a filter list
(first match wins) ``[{filter: <module substring>, value: w}, …, {value: 0}]`` or
``[{layers: [A, B], value: w}, {value: 0}]``. Module filters are derived from the base model's tensor names and
checked to select exactly the tensors of the part (mergealign.tensor_names.module_type), so a substring never
catches a neighbour (Qwen3's ``q_norm`` is a norm, not attention).

*λ sweeps* vary λ of the ``interp`` preset (or λ_D or λ_A alone). Names are stable:
``mergealign-interp-0.5`` (λ_D = λ, λ_A = 1 − λ), ``mergealign-sum`` (1, 1), ``mergealign-ld0.8-la0.5``
(explicit), and a scope variant appends ``+align@attn``, ``+domain@~mlp``, ``+align@layers0-3``.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergealign.errors import ConfigError, MergeAlignError
from mergealign.methods.study import Coefficients
from mergealign.tensor_names import MODULE_GROUPS, MODULE_TYPES, count_layers, module_key, module_type

# The analysis decomposes MergeAlign merges (θ_0 + λ_D·τ_D + λ_A·τ_A): the user-facing default method.
METHOD = "mergealign"
VECTORS = {"align": "alignment", "alignment": "alignment", "domain": "domain"}
LAYER_PARTS = ("first_half", "second_half")
DEFAULT_SCOPES = (
    "align@attn",
    "align@mlp",
    "align@first_half",
    "align@second_half",
    "domain@attn",
    "domain@mlp",
    "domain@first_half",
    "domain@second_half",
)
_LAYERS_RE = re.compile(r"^layers:(\d+)-(\d+)$")


def module_parts() -> dict[str, tuple[str, ...]]:
    """Part name -> module types: the groups (attn, mlp, norm, embed, lm_head) and each single type."""
    parts = dict(MODULE_GROUPS)
    for t in MODULE_TYPES:
        if t != "other":
            parts.setdefault(t, (t,))
    return parts


@dataclass(frozen=True)
class Scope:
    """``vector`` (alignment | domain) kept only in ``part`` (or everywhere but there when ``exclude``)."""

    vector: Literal["alignment", "domain"]
    part: str
    exclude: bool = False
    layers: tuple[int, int] | None = None  # resolved layer range of a layer part

    @property
    def text(self) -> str:
        """The scope as written (`parse_scope(scope.text) == scope`)."""
        short = "align" if self.vector == "alignment" else "domain"
        return f"{short}@{'~' if self.exclude else ''}{self.part}"

    @property
    def token(self) -> str:
        """The scope as written in a variant name (file-name safe)."""
        short = "align" if self.vector == "alignment" else "domain"
        part = self.part.replace(":", "")
        return f"{short}@{'~' if self.exclude else ''}{part}"


def parse_scope(text: str) -> Scope:
    """``align@attn`` / ``domain@~mlp`` / ``align@layers:0-3`` -> Scope (layer ranges resolved later)."""
    vec, sep, part = text.strip().partition("@")
    problems = []
    if not sep or vec not in VECTORS:
        problems.append(f"scope {text!r}: write VECTOR@PART with VECTOR one of align, domain")
    exclude = part.startswith("~")
    part = part[1:] if exclude else part
    if part not in module_parts() and part not in LAYER_PARTS and not _LAYERS_RE.match(part):
        known = ", ".join([*module_parts(), *LAYER_PARTS, "layers:A-B"])
        problems.append(f"scope {text!r}: unknown part {part!r} (known: {known})")
    if problems:
        raise ConfigError(problems)
    return Scope(VECTORS[vec], part, exclude)  # type: ignore[arg-type]


def layer_range(part: str, n_layers: int) -> tuple[int, int]:
    """Inclusive block range of a layer part for a model of ``n_layers`` blocks."""
    half = (n_layers + 1) // 2
    if part == "first_half":
        return (0, half - 1)
    if part == "second_half":
        if n_layers < 2:
            raise ConfigError([f"scope part second_half: the model has {n_layers} layer(s)"])
        return (half, n_layers - 1)
    m = _LAYERS_RE.match(part)
    if not m:
        raise ConfigError([f"scope part {part!r} is not a layer range"])
    first, last = int(m.group(1)), int(m.group(2))
    if first > last or last >= n_layers:
        raise ConfigError([f"scope part {part!r}: needs 0 <= A <= B < {n_layers} (the model's layers)"])
    return (first, last)


def module_filters(part: str, tensor_names: Iterable[str]) -> list[str]:
    """Substrings that select exactly the tensors of a module part among ``tensor_names``."""
    names = list(tensor_names)
    kinds = set(module_parts()[part])
    inside = [n for n in names if module_type(n) in kinds]
    if not inside:
        raise ConfigError(
            [f"scope part {part!r}: no tensor of the model is of type {', '.join(sorted(kinds))}"]
        )
    filters = sorted({module_key(n) for n in inside})
    wrong = [n for n in names if module_type(n) not in kinds and any(f in n for f in filters)]
    if wrong:
        raise MergeAlignError(
            f"scope part {part!r}: module filters {filters} also select {wrong[:5]}; cannot express the part "
            "as substring filters for this model"
        )
    return filters


# --------------------------------------------------------------------------- base spec and variants
@dataclass(frozen=True)
class Variant:
    """One merge of the contribution analysis."""

    name: str
    config: dict[str, Any]  # the engine's merge config
    kind: Literal["base", "lambda", "scope"]
    lambda_domain: float
    lambda_alignment: float
    base_name: str | None = None
    scope: Scope | None = None
    description: str = ""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "base": self.base_name,
            "lambda_domain": self.lambda_domain,
            "lambda_alignment": self.lambda_alignment,
            "vector": self.scope.vector if self.scope else None,
            "part": self.scope.part if self.scope else None,
            "exclude": self.scope.exclude if self.scope else None,
            "layers": list(self.scope.layers) if self.scope and self.scope.layers else None,
            "description": self.description,
        }


def merge_label(lambda_domain: float, lambda_alignment: float, method: str = METHOD) -> str:
    """Stable name of a merge from its two coefficients."""
    if lambda_domain == 1.0 and lambda_alignment == 1.0:
        return f"{method}-sum"
    if abs(lambda_domain + lambda_alignment - 1.0) < 1e-12:
        return f"{method}-interp-{lambda_domain:g}"
    return f"{method}-ld{lambda_domain:g}-la{lambda_alignment:g}"


def _check_base(config: Mapping[str, Any]) -> dict[str, Any]:
    problems = []
    if config.get("merge_method") != METHOD:
        problems.append(
            f"merge_method: contribution variants need a {METHOD} merge, got {config.get('merge_method')!r}"
        )
    roles = [m.get("role") for m in config.get("models", [])]
    for role in ("domain", "alignment"):
        if roles.count(role) != 1:
            problems.append(f"models: need exactly one model with role {role!r}, got roles {roles}")
    for i, m in enumerate(config.get("models", [])):
        w = (m.get("parameters") or {}).get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, int | float):
            problems.append(
                f"models[{i}].parameters.weight: must be a number for contribution variants, got {w!r}"
            )
    if problems:
        raise ConfigError(problems)
    return copy.deepcopy(dict(config))


def lambdas_of(config: Mapping[str, Any]) -> tuple[float, float]:
    """(λ_D, λ_A) of a merge config, read back by its method's own study mapping."""
    from mergealign.methods import get_method

    return get_method(config["merge_method"]).study.read(config).vector_weights()


def model_facts(config: Mapping[str, Any]) -> tuple[list[str], int]:
    """(tensor names, number of layers) of the config's base model, from its headers."""
    from mergealign.checkpoint import Checkpoint

    base = config.get("base_model")
    if not base:
        raise ConfigError(["base_model: needed to derive module filters and layer ranges"])
    ck = Checkpoint(base)
    names = list(ck.tensors)
    cfg = ck.config.get("text_config", ck.config)
    n_layers = cfg.get("num_hidden_layers")
    return names, int(n_layers if n_layers is not None else count_layers(names))


def base_variant(config: Mapping[str, Any]) -> Variant:
    cfg = _check_base(config)
    lam_d, lam_a = lambdas_of(cfg)
    return Variant(
        merge_label(lam_d, lam_a), cfg, "base", lam_d, lam_a, description=_lambda_text(lam_d, lam_a)
    )


def _lambda_text(lam_d: float, lam_a: float) -> str:
    return f"λ_D = {lam_d:g}, λ_A = {lam_a:g}"


def lambda_sweep(
    config: Mapping[str, Any],
    lambdas: Sequence[float],
    *,
    vary: Literal["interp", "domain", "alignment"] = "interp",
) -> list[Variant]:
    """One variant per λ: ``interp`` sets λ_D = λ, λ_A = 1 − λ; ``domain`` / ``alignment`` set that vector's
    λ and keep the other from the base config."""
    cfg = _check_base(config)
    base_d, base_a = lambdas_of(cfg)
    out = []
    for lam in lambdas:
        lam = float(lam)
        params = {
            k: v
            for k, v in (cfg.get("parameters") or {}).items()
            if k not in ("lambda", "preset", "lambda_domain", "lambda_alignment")
        }
        if vary == "interp":
            lam_d, lam_a = lam, 1.0 - lam
            params.update(preset="interp", **{"lambda": lam})
        elif vary == "domain":
            lam_d, lam_a = lam, base_a
            params.update(lambda_domain=lam_d, lambda_alignment=lam_a)
        elif vary == "alignment":
            lam_d, lam_a = base_d, lam
            params.update(lambda_domain=lam_d, lambda_alignment=lam_a)
        else:
            raise ConfigError([f"vary: must be interp, domain or alignment, got {vary!r}"])
        new = copy.deepcopy(cfg)
        new["parameters"] = params
        out.append(
            Variant(
                merge_label(lam_d, lam_a),
                new,
                "lambda",
                lam_d,
                lam_a,
                description=f"λ sweep ({vary}): {_lambda_text(lam_d, lam_a)}",
            )
        )
    return out


def scope_variant(
    config: Mapping[str, Any],
    scope: Scope | str,
    *,
    tensor_names: Sequence[str] | None = None,
    n_layers: int | None = None,
) -> Variant:
    """The variant of a base MergeAlign config in which ``scope.vector`` is kept only in ``scope.part``."""
    cfg = _check_base(config)
    sc = parse_scope(scope) if isinstance(scope, str) else scope
    lam_d, lam_a = lambdas_of(cfg)
    is_layer_part = sc.part in LAYER_PARTS or bool(_LAYERS_RE.match(sc.part))
    if tensor_names is None or (is_layer_part and n_layers is None):
        names_found, layers_found = model_facts(cfg)
        tensor_names = tensor_names if tensor_names is not None else names_found
        n_layers = n_layers if n_layers is not None else layers_found
    entry_index = next(i for i, m in enumerate(cfg["models"]) if m.get("role") == sc.vector)
    model = cfg["models"][entry_index]
    w = float((model.get("parameters") or {}).get("weight", 1.0))
    inside, outside = (0.0, w) if sc.exclude else (w, 0.0)
    if is_layer_part:
        assert n_layers is not None
        first, last = layer_range(sc.part, n_layers)
        sc = Scope(sc.vector, sc.part, sc.exclude, (first, last))
        weight: list[dict[str, Any]] = [{"layers": [first, last], "value": inside}, {"value": outside}]
        where = f"blocks {first}–{last}"
    else:
        weight = [{"filter": f, "value": inside} for f in module_filters(sc.part, tensor_names)]
        weight.append({"value": outside})
        where = f"{sc.part} modules"
    model["parameters"] = {**(model.get("parameters") or {}), "weight": weight}
    base_name = merge_label(lam_d, lam_a)
    sym, other = ("τ_A", "τ_D") if sc.vector == "alignment" else ("τ_D", "τ_A")
    desc = f"{sym} {'everywhere but' if sc.exclude else 'only in'} {where}, {other} everywhere; {_lambda_text(lam_d, lam_a)}"
    return Variant(f"{base_name}+{sc.token}", cfg, "scope", lam_d, lam_a, base_name, sc, desc)


def contribution_variants(
    config: Mapping[str, Any],
    scopes: Iterable[Scope | str] | None = None,
    *,
    tensor_names: Sequence[str] | None = None,
    n_layers: int | None = None,
) -> list[Variant]:
    """Scope variants of one base config (default scopes: DEFAULT_SCOPES); header facts read once."""
    cfg = _check_base(config)
    if tensor_names is None or n_layers is None:
        names_found, layers_found = model_facts(cfg)
        tensor_names = tensor_names if tensor_names is not None else names_found
        n_layers = n_layers if n_layers is not None else layers_found
    out = [
        scope_variant(cfg, s, tensor_names=tensor_names, n_layers=n_layers)
        for s in (scopes or DEFAULT_SCOPES)
    ]
    names = [v.name for v in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError([f"contributions: scope given twice: {', '.join(dupes)}"])
    return out


def load_base_spec(path: str | os.PathLike[str], *, n_layers: int | None = None) -> dict[str, Any]:
    """A base merge config from YAML (validated by the engine's schema), as a plain dict."""
    import yaml

    from mergealign.merge.config import load_merge_config

    p = Path(path)
    load_merge_config(p)  # schema errors with field paths
    data = yaml.safe_load(p.read_text())
    base = data.get("base_model")
    if base and not Path(base).is_absolute() and (p.parent / base).exists():
        data["base_model"] = str((p.parent / base).resolve())
        for m in data.get("models", []):
            if m.get("model") and (p.parent / m["model"]).exists():
                m["model"] = str((p.parent / m["model"]).resolve())
    return _check_base(data)


# --------------------------------------------------------------------------- the run config's entries
class ContributionEntry(BaseModel):
    """One ``analysis.contributions`` entry of a run config.

    ``scopes``: VECTOR@PART strings (default DEFAULT_SCOPES), applied to the MergeAlign merge with each λ of
    ``lambda`` (interp preset; default [0.5]) or, with ``preset: sum``, to the sum merge. ``sweep``: extra λ
    values of a plain interp sweep (no scope).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    scopes: list[str] = Field(default_factory=lambda: list(DEFAULT_SCOPES))
    lambdas: list[float] = Field(default_factory=lambda: [0.5], alias="lambda")
    preset: Literal["interp", "sum"] = "interp"
    sweep: list[float] = Field(default_factory=list)

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: list[str]) -> list[str]:
        for s in v:
            parse_scope(s)
        return v

    @field_validator("lambdas", "sweep")
    @classmethod
    def _unit(cls, v: list[float]) -> list[float]:
        for x in v:
            if not 0.0 <= float(x) <= 1.0:
                raise ValueError(f"λ must be between 0 and 1, got {x!r}")
        return v

    def variants(
        self,
        config: Mapping[str, Any],
        *,
        tensor_names: Sequence[str] | None = None,
        n_layers: int | None = None,
    ) -> list[Variant]:
        """All variants of this entry for a mergealign engine config (its own λ settings are replaced)."""
        cfg = _check_base(config)
        if tensor_names is None or n_layers is None:
            names_found, layers_found = model_facts(cfg)
            tensor_names = tensor_names if tensor_names is not None else names_found
            n_layers = n_layers if n_layers is not None else layers_found
        bases: list[dict[str, Any]] = []
        if self.preset == "sum":
            c = copy.deepcopy(cfg)
            c["parameters"] = {"preset": "sum"}
            bases.append(c)
        else:
            bases += [v.config for v in lambda_sweep(cfg, self.lambdas)]
        out = [v for v in lambda_sweep(cfg, self.sweep)]
        for b in bases:
            out += contribution_variants(b, self.scopes, tensor_names=tensor_names, n_layers=n_layers)
        seen: dict[str, Variant] = {}
        for v in out:
            seen.setdefault(v.name, v)
        return list(seen.values())

    def planned(self) -> list[PlannedVariant]:
        """The variants of this entry, without reading any model: what a study plan holds. Same names and order
        as `variants`; module filters and layer ranges are resolved when each variant is merged."""
        sweep = [PlannedVariant.of(Coefficients(lam=float(x), preset="interp")) for x in self.sweep]
        if self.preset == "sum":
            bases = [Coefficients(preset="sum")]
        else:
            bases = [Coefficients(lam=float(x), preset="interp") for x in self.lambdas]
        scoped = [PlannedVariant.of(c, parse_scope(s)) for c in bases for s in self.scopes]
        seen: dict[str, PlannedVariant] = {}
        for v in sweep + scoped:
            seen.setdefault(v.name, v)
        return list(seen.values())


@dataclass(frozen=True)
class PlannedVariant:
    """A variant as a study plan holds it: its coefficients and scope, before any model is read."""

    name: str
    coefficients: Coefficients
    scope: Scope | None = None

    @classmethod
    def of(cls, c: Coefficients, scope: Scope | None = None) -> PlannedVariant:
        lam_d, lam_a = c.vector_weights()
        base = merge_label(lam_d, lam_a)
        return cls(f"{base}+{scope.token}" if scope else base, c, scope)

    def describe(self) -> dict[str, Any]:
        """Variant.describe() as far as it is known without the model (a layer part's blocks come later)."""
        lam_d, lam_a = self.coefficients.vector_weights()
        sc = self.scope
        if sc is None:
            kind, base, desc = "lambda", None, f"λ sweep (interp): {_lambda_text(lam_d, lam_a)}"
        else:
            sym, other = ("τ_A", "τ_D") if sc.vector == "alignment" else ("τ_D", "τ_A")
            layer_part = sc.part in LAYER_PARTS or bool(_LAYERS_RE.match(sc.part))
            where = f"{sc.part} blocks" if layer_part else f"{sc.part} modules"
            kind, base = "scope", merge_label(lam_d, lam_a)
            desc = f"{sym} {'everywhere but' if sc.exclude else 'only in'} {where}, {other} everywhere; {_lambda_text(lam_d, lam_a)}"
        return Variant(self.name, {}, kind, lam_d, lam_a, base, sc, desc).describe()

    def apply(self, config: Mapping[str, Any], *, tensor_names: Sequence[str] | None = None,
              n_layers: int | None = None) -> Variant:  # fmt: skip
        """The variant of a concrete merge config with this variant's coefficients (module filters and layer
        ranges resolved from the base model, or from the names and layer count given)."""
        lam_d, lam_a = self.coefficients.vector_weights()
        if self.scope is None:
            cfg = _check_base(config)
            return Variant(self.name, cfg, "lambda", lam_d, lam_a, description=self.describe()["description"])
        return scope_variant(config, self.scope, tensor_names=tensor_names, n_layers=n_layers)


def parse_contributions(entries: Sequence[Mapping[str, Any]]) -> list[ContributionEntry]:
    """Validate ``analysis.contributions`` of a run config; every problem with its field path."""
    from pydantic import ValidationError

    out, problems = [], []
    for i, e in enumerate(entries):
        try:
            out.append(ContributionEntry.model_validate(e))
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(x) for x in err["loc"])
                problems.append(f"analysis.contributions[{i}].{loc}: {err['msg']}")
        except ConfigError as exc:
            problems += [f"analysis.contributions[{i}]: {p}" for p in exc.problems]
    if problems:
        raise ConfigError(problems)
    return out
