"""The results folder a report is built from: its layout, reading it (`load_results`) and writing it
(`write_results`, what the pipeline's report step calls).

Layout (every file optional when reading — what is missing is listed in the report, and everything else still
renders):

    RUN_DIR/
      run.json                 {"name": str,
                                "config": {...} (the run config as loaded),
                                "models": [name, ...] (every model the study should evaluate, in order),
                                "provenance": {"git_commit": str, "inputs": {model: commit sha or content hash},
                                               "package_versions": {package: version}},
                                "timings": {step: seconds} or [{"step", "seconds", ...}, ...]}
      models/<name>.json       one per model:
                               {"name": str,
                                "kind": "base" | "aligned" | "expert" | "merge" | "variant",
                                "method": str, "expert": str (which expert a merge / variant derives from),
                                "lambda": float, "lambda_domain": float, "lambda_alignment": float,
                                "variant": Variant.describe() of mergealign.contributions (variants only),
                                "domain": the JSON of mergealign.evaluation.domain.evaluate_domain, or a path to it
                                          (relative to this file), or null,
                                "safety": the JSON of mergealign.evaluation.safety.safety_metrics, or a path, or null}
      similarity/<expert>/similarity.json   output of mergealign.similarity (one per expert; a single
                                            similarity/similarity.json is labelled by its merged models' expert)
      cka/<anything>.json      output of mergealign.cka (optional)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergealign.errors import MergeAlignError
from mergealign.files import atomic_write_bytes, atomic_write_text

KIND_ORDER = ("base", "aligned", "expert", "merge", "variant")


@dataclass
class ModelResult:
    """One row of the main table."""

    name: str
    kind: str = "merge"
    method: str | None = None
    expert: str | None = None
    lambda_domain: float | None = None
    lambda_alignment: float | None = None
    variant: dict[str, Any] | None = None
    domain: dict[str, Any] | None = None
    safety: dict[str, Any] | None = None
    source: Path | None = None

    @property
    def domain_avg(self) -> float | None:
        acc = ((self.domain or {}).get("average") or {}).get("acc")
        return None if acc is None else 100.0 * acc

    @property
    def domain_avg_stderr(self) -> float | None:
        se = ((self.domain or {}).get("average") or {}).get("acc_stderr")
        return None if se is None else 100.0 * se

    def task_acc(self, task: str) -> tuple[float | None, float | None]:
        t = ((self.domain or {}).get("tasks") or {}).get(task) or {}
        acc, se = t.get("acc"), t.get("acc_stderr")
        return (None if acc is None else 100 * acc, None if se is None else 100 * se)

    @property
    def lam(self) -> float | None:
        """λ of an interp merge (λ_D with λ_A = 1 − λ_D), else None."""
        if self.lambda_domain is None or self.lambda_alignment is None:
            return None
        return self.lambda_domain if abs(self.lambda_domain + self.lambda_alignment - 1) < 1e-9 else None


@dataclass
class RunResults:
    run_dir: Path
    run: dict[str, Any] | None
    models: list[ModelResult]
    similarity: dict[str, dict[str, Any]]  # expert label -> similarity.json
    cka: list[dict[str, Any]]
    missing: list[str] = field(default_factory=list)


def _read_json(path: Path, missing: list[str], what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        missing.append(f"{what}: {path} not found")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        missing.append(f"{what}: {path} is not valid JSON ({exc})")
    return None


def _section(value: Any, base: Path, missing: list[str], what: str) -> dict[str, Any] | None:
    """A result section given inline, as a path to its JSON file, or null."""
    if value is None:
        missing.append(f"{what}: no results")
        return None
    if isinstance(value, str):
        p = Path(value)
        return _read_json(p if p.is_absolute() else base / p, missing, what)
    if isinstance(value, Mapping):
        return dict(value)
    missing.append(f"{what}: unreadable value {value!r}")
    return None


# The results format's default: a model doc that gives only `lambda` means MergeAlign's interp λ (λ_D = λ,
# λ_A = 1 − λ), unless it names another method.
LAMBDA_METHOD = "mergealign"


def _lambdas(doc: Mapping[str, Any]) -> tuple[float | None, float | None]:
    lam_d, lam_a = doc.get("lambda_domain"), doc.get("lambda_alignment")
    if lam_d is None and doc.get("lambda") is not None and doc.get("method") in (None, LAMBDA_METHOD):
        lam_d, lam_a = float(doc["lambda"]), 1.0 - float(doc["lambda"])
    return lam_d, lam_a


def load_results(run_dir: str | os.PathLike[str]) -> RunResults:
    """Read a results folder (layout: module docstring); unreadable or absent files go to ``missing``."""
    root = Path(run_dir)
    if not root.is_dir():
        raise MergeAlignError(f"{root}: results folder not found")
    missing: list[str] = []
    run = _read_json(root / "run.json", missing, "run.json (config, expected models, provenance)")
    models: list[ModelResult] = []
    mdir = root / "models"
    files = sorted(mdir.glob("*.json")) if mdir.is_dir() else []
    by_name: dict[str, ModelResult] = {}
    for f in files:
        doc = _read_json(f, missing, f"models/{f.name}")
        if not isinstance(doc, Mapping):
            continue
        name = str(doc.get("name") or f.stem)
        lam_d, lam_a = _lambdas(doc)
        m = ModelResult(
            name=name,
            kind=str(doc.get("kind") or "merge"),
            method=doc.get("method"),
            expert=doc.get("expert"),
            lambda_domain=lam_d,
            lambda_alignment=lam_a,
            variant=doc.get("variant"),
            domain=_section(doc.get("domain"), f.parent, missing, f"{name}: domain evaluation"),
            safety=_section(doc.get("safety"), f.parent, missing, f"{name}: safety evaluation"),
            source=f,
        )
        by_name[name] = m
    expected = [str(n) for n in (run or {}).get("models") or []]
    for name in expected:
        if name not in by_name:
            missing.append(f"{name}: models/{name}.json not found (no results for this model)")
            by_name[name] = ModelResult(name=name, kind=_guess_kind(name))
    order = {n: i for i, n in enumerate(expected)}
    models = sorted(
        by_name.values(),
        key=lambda m: (
            KIND_ORDER.index(m.kind) if m.kind in KIND_ORDER else len(KIND_ORDER),
            order.get(m.name, len(order)),
            m.expert or "",
            m.method or "",
            m.lambda_domain if m.lambda_domain is not None else -1.0,
            m.name,
        ),
    )
    if not models:
        missing.append(f"models/: no model results in {mdir}")
    similarity: dict[str, dict[str, Any]] = {}
    sdir = root / "similarity"
    for f in sorted(sdir.rglob("similarity.json")) if sdir.is_dir() else []:
        doc = _read_json(f, missing, f"similarity/{f.relative_to(sdir)}")
        if isinstance(doc, Mapping):
            label = f.parent.name if f.parent != sdir else _similarity_label(doc, models)
            similarity[label] = dict(doc)
    if not similarity:
        missing.append("similarity/: no similarity.json (per-layer plots of τ_D and τ_A skipped)")
    cka: list[dict[str, Any]] = []
    cdir = root / "cka"
    for f in sorted(cdir.glob("*.json")) if cdir.is_dir() else []:
        doc = _read_json(f, missing, f"cka/{f.name}")
        if isinstance(doc, Mapping):
            cka.append(dict(doc))
    return RunResults(root, run if isinstance(run, Mapping) else None, models, similarity, cka, missing)


def _guess_kind(name: str) -> str:
    for kind in ("base", "aligned", "expert", "variant"):
        if name == kind or name.startswith(f"{kind}:") or name.endswith(f"-{kind}"):
            return kind
    return "variant" if "@" in name else "merge"


def _similarity_label(doc: Mapping[str, Any], models: Sequence[ModelResult]) -> str:
    experts = {m.expert for m in models if m.expert}
    return next(iter(experts)) if len(experts) == 1 else "similarity"


# --------------------------------------------------------------------------- writing
@dataclass(frozen=True)
class ModelFiles:
    """One model of a study as the results folder records it: what it is, and where its result files are.

    ``info``: further fields of models/<name>.json (method, λs, variant); ``domain`` / ``safety``: the
    domain.json / safety.json of its evaluations (None: not evaluated); ``source``: the identity of its weights
    (commit sha or content hash) and ``location``: where they are, both for the provenance in run.json.
    """

    name: str
    kind: str
    expert: str | None = None
    info: Mapping[str, Any] = field(default_factory=dict)
    domain: Path | None = None
    safety: Path | None = None
    source: str | None = None
    location: str | None = None


def write_results(
    folder: str | os.PathLike[str],
    models: Sequence[ModelFiles],
    similarity: Mapping[str, str | os.PathLike[str]],
    *,
    name: str,
    config: Mapping[str, Any],
    timings: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write a results folder (layout: module docstring) from scratch; returns it.

    Each model's domain and safety results are copied into its models/<name>.json; ``similarity`` maps an
    expert to its similarity.json. A folder left by an earlier, interrupted call is replaced.
    """
    root = Path(folder)
    if root.exists():
        shutil.rmtree(root)
    (root / "models").mkdir(parents=True)
    provenance: dict[str, Any] = {"inputs": {}, "artifacts": {}}
    for m in models:
        doc: dict[str, Any] = {"name": m.name, "kind": m.kind, "expert": m.expert, **m.info,
                               "domain": _load(m.domain), "safety": _load(m.safety)}  # fmt: skip
        atomic_write_text(root / "models" / f"{m.name}.json", json.dumps(doc, indent=1))
        if m.source is not None:
            provenance["inputs"][m.name] = m.source
            provenance["artifacts"][m.name] = m.location
    for expert, path in similarity.items():
        atomic_write_bytes(root / "similarity" / expert / "similarity.json", Path(path).read_bytes())
    run = {"name": name, "config": dict(config), "models": [m.name for m in models], "provenance": provenance,
           "timings": list(timings or [])}  # fmt: skip
    atomic_write_text(root / "run.json", json.dumps(run, indent=1, default=str))
    return root


def _load(path: Path | None) -> Any:
    return None if path is None else json.loads(Path(path).read_text())
