"""Loading a run config: parse YAML, validate against the schema with the registries' vocabularies, make every
path absolute once, and run every check across sections. All problems at once, as one ConfigError (exit 2).

    cfg = load_config("configs/smoke.yaml")      # relative paths inside: from the file's folder
    cfg = parse_config({...}, base_dir=".")       # a mapping
    check_inputs(cfg)                             # the world: folders exist, the artifact root is writable
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mergealign.errors import ConfigError, MergeAlignError, did_you_mean, validation_problems
from mergealign.study.config import DEMO_ZOO_FIXED, URL_RE, DemoZoo, RunConfig


# --------------------------------------------------------------------------- vocabularies
def validation_context() -> dict[str, Any]:
    """What the schema checks names against: methods (and whether they take a λ, a preset), prompt sets,
    judges. Read from the registries, so a new method, prompt set or judge needs no edit here."""
    from mergealign.judges import KNOWN_JUDGES
    from mergealign.methods import METHODS
    from mergealign.prompt_sets import NAMED_SETS

    methods = {name: {"lambda": cls.study.takes_lambda, "preset": cls.study.takes_preset}
               for name, cls in METHODS.items()}  # fmt: skip
    return {"methods": methods, "prompt_sets": sorted(NAMED_SETS), "judges": sorted(KNOWN_JUDGES)}


# --------------------------------------------------------------------------- paths
def _absolute(value: str, base: Path) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base / p).resolve())


def _absolute_url(value: str, base: Path) -> str:
    """Like a path, but URLs with a protocol (s3://...) are kept as they are."""
    if URL_RE.match(value) and not value.startswith("file://"):
        return value
    return _absolute(value.removeprefix("file://"), base)


def _absolute_paths(cfg: RunConfig, base: Path) -> RunConfig:
    """A copy of the config with every local path absolute, taken from `base` (the config file's folder)."""
    data = cfg.model_dump(by_alias=True, exclude_none=True)
    data["config_dir"] = str(base)
    data["artifact_root"] = _absolute_url(cfg.artifact_root, base)
    for zoo in ("zoo_tiny", "zoo_demo"):
        if data.get(zoo):
            data[zoo]["dir"] = _absolute(data[zoo]["dir"], base)
    if data.get("zoo_demo", {}).get("base"):
        data["zoo_demo"]["base"] = _absolute(data["zoo_demo"]["base"], base)
    sources = [data["models"]["base"], data["models"]["aligned"], *data["models"]["experts"]]
    sources += [j["model"] for j in data.get("judges", []) if j.get("model")]
    for src in sources:
        if src.get("path"):
            src["path"] = _absolute(src["path"], base)
    for p in data.get("generation", {}).get("prompt_sets", []):
        if p.get("path"):
            p["path"] = _absolute(p["path"], base)
    de = data.get("domain_eval", {})
    de["tasks"] = [_absolute(t, base) if t.endswith((".yaml", ".yml")) else t for t in de.get("tasks", [])]
    if de.get("data_dir"):
        de["data_dir"] = _absolute(de["data_dir"], base)
    ex = data.get("execution", {})
    for key in ("results_dir", "hf_cache_dir"):
        if ex.get(key):
            ex[key] = _absolute_url(ex[key], base)
    return RunConfig.model_validate(data, context=validation_context())


# --------------------------------------------------------------------------- checks across sections
def _cross_checks(cfg: RunConfig) -> list[str]:
    from mergealign.study.plan import model_refs, planned_merges, planned_variants

    problems = []
    expert_names = [e.name for e in cfg.models.experts]
    for i, entry in enumerate(cfg.merges):
        for j, name in enumerate(entry.experts or []):
            if name not in expert_names:
                problems.append(
                    f"merges[{i}].experts[{j}]: no expert named {name!r} (experts: {', '.join(expert_names)})"
                )
    problems += _engine_checks(cfg)
    if cfg.zoo_demo is not None:
        problems += _demo_zoo_checks(cfg.zoo_demo)
    merges = planned_merges(cfg)
    try:
        merges += planned_variants(cfg, [m.id for m in merges])
    except ConfigError as exc:
        problems += exc.problems
    ids = [m.id for m in planned_merges(cfg)]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        problems.append(
            f"merges: two entries make the same merge id(s) {', '.join(dupes)}; give them distinct `name`s"
        )
    labels = [str(r) for r in model_refs(cfg, merges)]
    for section in ("generation", "domain_eval"):
        which = getattr(cfg, section).models
        if isinstance(which, list):
            for k, label in enumerate(which):
                if label not in labels:
                    problems.append(
                        f"{section}.models[{k}]: no model {label!r} (models: {', '.join(labels)})"
                    )
    from mergealign.judges import JudgeSettings

    for i, j in enumerate(cfg.judges):
        try:
            JudgeSettings.model_validate({k: v for k, v in j.options.items() if k != "runtime"})
        except ValidationError as exc:
            problems += [f"judges[{i}].options.{p}" for p in validation_problems(exc, JudgeSettings)]
    if cfg.judges and not cfg.generation.enabled:
        problems.append("judges: judges need answers; enable `generation`")
    de = cfg.domain_eval
    if de.enabled and not de.tasks and not any(e.domain for e in cfg.models.experts):
        problems.append("domain_eval.tasks: name lm-eval tasks, or give experts a `domain` preset")
    return problems


def _engine_checks(cfg: RunConfig) -> list[str]:
    """Each merge entry's parameters, checked by the engine's own validation (method parameter ranges)."""
    from mergealign.merge.config import load_merge_config
    from mergealign.study.merges import engine_config
    from mergealign.study.plan import planned_merges

    problems: list[str] = []
    first: dict[int, Any] = {}
    for m in planned_merges(cfg):
        first.setdefault(m.entry, m)
    folders = {"base": "<base>", "expert": "<expert>", "aligned": "<aligned>"}
    for i, m in sorted(first.items()):
        try:
            load_merge_config(engine_config(m.params(), folders))
        except ConfigError as exc:
            problems += [f"merges[{i}] ({m.method}): {p}" for p in exc.problems]
    return problems


def _demo_zoo_checks(zoo: DemoZoo) -> list[str]:
    """Each zoo step's options against the step's own parameters (mergealign.demo), before hours of training."""
    try:
        from mergealign import demo
        from mergealign.demo.zoo_steps import EVAL_PROMPTS_DEFAULTS
    except ImportError as exc:
        return [f"zoo_demo: the demo zoo cannot be imported ({exc}); install the [demo] extra"]
    functions = {"knowledge": demo.build_knowledge_data, "prompts": demo.build_safety_prompts,
                 "aligned_data": demo.build_aligned_data}  # fmt: skip
    train_fields = (set(demo.TrainConfig.__dataclass_fields__) - {"seed"}) | {"threads"}
    problems = []
    for step, options in zoo.steps.items():
        if step in functions:
            known = set(inspect.signature(functions[step]).parameters) - DEMO_ZOO_FIXED
        elif step == "eval_prompts":
            known = set(EVAL_PROMPTS_DEFAULTS)
        else:
            known = train_fields
        for name in options:
            if name not in known:
                problems.append(f"zoo_demo.steps.{step}.{name}: unknown option{did_you_mean(name, sorted(known))}; "
                                f"known: {', '.join(sorted(known))}")  # fmt: skip
    return problems


# --------------------------------------------------------------------------- entry points
def parse_config(
    data: Any, *, source: str | None = None, base_dir: str | os.PathLike[str] | None = None
) -> RunConfig:
    """Validate a run config (a mapping); raise ConfigError listing every problem with its field path.

    Relative paths are taken from `config_dir` when the mapping sets it, else from `base_dir` (default: the
    working directory); the result holds only absolute paths."""
    if not isinstance(data, Mapping):
        raise ConfigError([f"(top level): expected a mapping of settings, got {type(data).__name__}"], source)
    try:
        cfg = RunConfig.model_validate(dict(data), context=validation_context())
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc, RunConfig), source) from None
    if cfg.config_dir is not None:
        base = Path(cfg.config_dir).expanduser().resolve()
    else:
        base = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
    cfg = _absolute_paths(cfg, base)
    problems = _cross_checks(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read and validate a YAML run config; relative paths in it are taken from the file's folder."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such file"], str(p)) from None
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read ({exc.strerror})"], str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError([f"{where}not valid YAML ({getattr(exc, 'problem', exc)})"], str(p)) from None
    return parse_config(data, source=str(p), base_dir=p.resolve().parent)


def coerce_config(config: RunConfig | Mapping[str, Any] | str | os.PathLike[str]) -> RunConfig:
    """A RunConfig from a RunConfig, a mapping (paths relative to the working directory) or a YAML path."""
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, Mapping):
        return parse_config(config, source="config mapping")
    return load_config(config)


def check_inputs(cfg: RunConfig) -> None:
    """Checks of the world before anything runs: local model folders exist (or a zoo will make them), prompt
    files exist, and the artifact root is writable. All problems at once, as a ConfigError."""
    from mergealign.artifacts import ArtifactStore

    problems: list[str] = []
    # Folders a zoo builds before the study: what lies inside them need not exist yet.
    zoos = [Path(z.dir) for z in (cfg.zoo_tiny, cfg.zoo_demo) if z is not None]

    def in_zoo(p: Path) -> bool:
        return any(p == zoo or zoo in p.parents for zoo in zoos)

    sources = [("models.base", cfg.models.base), ("models.aligned", cfg.models.aligned)]
    sources += [(f"models.experts[{i}]", e) for i, e in enumerate(cfg.models.experts)]
    sources += [(f"judges[{i}].model", j.model) for i, j in enumerate(cfg.judges) if j.model is not None]
    for where, src in sources:
        if src.path is not None and not in_zoo(Path(src.path)) and not Path(src.path).is_dir():
            problems.append(f"{where}.path: no such directory {src.path}")
    if cfg.zoo_demo is not None and cfg.zoo_demo.base is not None:
        if not (Path(cfg.zoo_demo.base) / "config.json").is_file():
            problems.append(f"zoo_demo.base: {cfg.zoo_demo.base} is not a model folder (no config.json)")
    for i, ps in enumerate(cfg.generation.prompt_sets if cfg.generation.enabled else []):
        if ps.path is not None and not in_zoo(Path(ps.path)) and not Path(ps.path).is_file():
            problems.append(f"generation.prompt_sets[{i}].path: no such file {ps.path}")
    try:
        ArtifactStore(cfg.artifact_root).check_writable()
    except MergeAlignError as exc:
        problems.append(f"artifact_root: {exc}")
    if problems:
        raise ConfigError(problems, f"run config {cfg.name!r}")
