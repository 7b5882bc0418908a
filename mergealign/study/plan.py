"""The plan of a study: every step, its inputs by id and its parameters, as plain data.

    plan = plan_study(load_config("configs/smoke.yaml"))
    for step in plan.steps: print(step.id, step.inputs)

`plan_study` reads no model and imports no Prefect: the flows execute a plan (each step kind maps to its
task, or to a deployment), `mergealign validate` prints it, tests check it directly. Steps come in
dependency order. A step's `params` are the material of its cache key (with its inputs' content hashes and
what is pinned when it runs: commit shas, file hashes); `info` is what its task needs or shows besides.

    preflight ─ models (base, aligned, experts) ─┬─ merges, contribution variants ─┬─ generate ─ judge ─ safety ─┐
    models (judges) ───────────────────────────────┼──────────────────────────────────┘                               │
                                                  └─ similarity, vectors, domain_eval ─────────────────────────── report
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mergealign.methods import get_method
from mergealign.methods.study import Coefficients
from mergealign.study import refs
from mergealign.study.config import MergeEntry, RunConfig
from mergealign.study.refs import ModelRef

STEP_KINDS = ("preflight", "models", "vectors", "merge", "similarity", "prompts", "generate", "judge", "safety",
              "domain_eval", "report", "findings")  # fmt: skip
# How the Prefect task run of a step is named: `<prefix>-<step name>`.
RUN_PREFIX = {"vectors": "vector", "domain_eval": "domain"}
Inputs = Mapping[str, "str | Mapping[str, str]"]


@dataclass(frozen=True)
class Step:
    kind: str
    name: str  # unique within its kind
    inputs: Inputs = field(default_factory=dict)  # role -> step id, or role -> {name: step id}
    params: Mapping[str, Any] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)
    after: tuple[str, ...] = ()  # steps that must finish first without being inputs
    run: str | None = None  # the Prefect task run's name, when not `<prefix>-<name>`

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def run_name(self) -> str:
        return self.run or f"{RUN_PREFIX.get(self.kind, self.kind)}-{self.name}"

    def input_ids(self) -> list[str]:
        out: list[str] = []
        for value in self.inputs.values():
            out += [value] if isinstance(value, str) else list(value.values())
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "name": self.name, "inputs": _plain(self.inputs),
                "after": list(self.after), "run": self.run_name, "params": _plain(self.params),
                "info": _plain(self.info)}  # fmt: skip


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class StudyPlan:
    study: str
    steps: tuple[Step, ...]
    models: tuple[str, ...] = ()  # every model that answers or is scored (base, aligned, experts, merges)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {s.id: s for s in self.steps})

    def __getitem__(self, step_id: str) -> Step:
        return self._by_id[step_id]  # type: ignore[attr-defined]

    def __contains__(self, step_id: object) -> bool:
        return step_id in self._by_id  # type: ignore[attr-defined]

    def of_kind(self, kind: str) -> list[Step]:
        return [s for s in self.steps if s.kind == kind]

    def closure(self, ids: Iterable[str]) -> list[Step]:
        """The steps `ids` and everything they need (inputs and `after`, transitively), in plan order."""
        wanted: set[str] = set()
        todo = list(ids)
        while todo:
            sid = todo.pop()
            if sid in wanted:
                continue
            wanted.add(sid)
            todo += self[sid].input_ids() + list(self[sid].after)
        return [s for s in self.steps if s.id in wanted]

    def evaluation(self, models: Iterable[str] | None, prompt_sets: Iterable[str] | None, stages: Iterable[str],
                   judges: Iterable[str] | None) -> list[str]:  # fmt: skip
        """The steps an evaluation of these models, prompt sets, stages (generate, judge, domain_eval) and judges
        asks for (None: all); safety metrics only when every prompt set and judge is asked for."""
        chosen = {k: None if v is None else set(v) for k, v in
                  (("model", models), ("prompt_set", prompt_sets), ("judge", judges))}  # fmt: skip
        stages = set(stages)

        def wanted(step: Step, *keys: str) -> bool:
            return all(chosen[k] is None or step.info.get(k) in chosen[k] for k in keys)  # type: ignore[operator]

        out = []
        for step in self.steps:
            if step.kind == "generate" and "generate" in stages and wanted(step, "model", "prompt_set"):
                out.append(step.id)
            elif step.kind == "judge" and "judge" in stages and wanted(step, "model", "prompt_set", "judge"):
                out.append(step.id)
            elif (step.kind == "safety" and "judge" in stages and chosen["judge"] is None
                  and chosen["prompt_set"] is None and wanted(step, "model")):  # fmt: skip
                out.append(step.id)
            elif step.kind == "domain_eval" and "domain_eval" in stages and wanted(step, "model"):
                out.append(step.id)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.study, "models": list(self.models), "steps": [s.to_dict() for s in self.steps]}


# --------------------------------------------------------------------------- merges
@dataclass(frozen=True)
class PlannedMerge:
    """One merged model of the study: a merge entry × expert × λ, or a contribution variant."""

    id: str
    expert: str
    kind: str  # "merge" | "variant"
    method: str
    coefficients: Coefficients
    parameters: Mapping[str, Any]
    options: Mapping[str, Any]
    scope: str | None = None
    report: Mapping[str, Any] = field(default_factory=dict)
    entry: int | None = None  # index in the config's `merges` (None: a contribution variant)

    @property
    def ref(self) -> ModelRef:
        return refs.merge(self.id)

    def params(self) -> dict[str, Any]:
        c = self.coefficients
        return {"method": self.method, "parameters": dict(self.parameters), "options": dict(self.options),
                "coefficients": {"lambda": c.lam, "preset": c.preset, "lambda_domain": c.lambda_domain,
                                 "lambda_alignment": c.lambda_alignment},
                "scope": self.scope}  # fmt: skip


def entry_coefficients(entry: MergeEntry, lam: float | None) -> Coefficients:
    return Coefficients(lam=lam, preset=entry.preset, lambda_domain=entry.lambda_domain,
                        lambda_alignment=entry.lambda_alignment)  # fmt: skip


def entry_label(entry: MergeEntry) -> str:
    if entry.name:
        return entry.name
    return get_method(entry.method).study.label(entry.method, entry_coefficients(entry, None))


def entry_grid(entry: MergeEntry) -> list[float | None]:
    return get_method(entry.method).study.grid(entry.lambdas, entry_coefficients(entry, None))


def planned_merges(cfg: RunConfig) -> list[PlannedMerge]:
    """Every merge of the config's `merges` (entries × their experts × their λ grid), in config order."""
    out = []
    for index, entry in enumerate(cfg.merges):
        mapping = get_method(entry.method).study
        options = {
            k: getattr(entry, k)
            for k in ("dtype", "out_dtype", "shard_size")
            if getattr(entry, k) is not None
        }
        for expert in entry.experts or [e.name for e in cfg.models.experts]:
            for lam in entry_grid(entry):
                c = entry_coefficients(entry, lam)
                lam_d, lam_a = mapping.weights(c) or (None, None)
                report = {"method": entry.method, "lambda": lam, "lambda_domain": lam_d, "lambda_alignment": lam_a,
                          "preset": entry.preset}  # fmt: skip
                suffix = "" if lam is None else f"-l{lam:g}"
                out.append(PlannedMerge(f"{expert}-{entry_label(entry)}{suffix}", expert, "merge", entry.method, c,
                                        dict(entry.parameters), options, report=report, entry=index))  # fmt: skip
    return out


def planned_variants(cfg: RunConfig, taken: Iterable[str]) -> list[PlannedMerge]:
    """The contribution variants of `analysis.contributions`, per expert; ids already taken are skipped."""
    from mergealign.contributions import METHOD, parse_contributions

    if not cfg.analysis.contributions:
        return []
    seen, out = set(taken), []
    for entry in parse_contributions(cfg.analysis.contributions):
        for variant in entry.planned():
            for expert in cfg.models.experts:
                vid = f"{expert.name}-{variant.name}"
                if vid in seen:
                    continue
                seen.add(vid)
                lam_d, lam_a = variant.coefficients.vector_weights()
                report = {"method": METHOD, "lambda_domain": lam_d, "lambda_alignment": lam_a,
                          "variant": variant.describe()}  # fmt: skip
                out.append(PlannedMerge(vid, expert.name, "variant", METHOD, variant.coefficients, {}, {},
                                        variant.scope.text if variant.scope else None, report))  # fmt: skip
    return out


# --------------------------------------------------------------------------- the plan
def model_refs(cfg: RunConfig, merges: Iterable[PlannedMerge]) -> list[ModelRef]:
    """Every model that can answer or be scored: base, aligned, experts, then the merges."""
    return [
        refs.BASE,
        refs.ALIGNED,
        *(refs.expert(e.name) for e in cfg.models.experts),
        *(m.ref for m in merges),
    ]


def selected(which: str | list[str], models: list[ModelRef]) -> list[ModelRef]:
    """`all`, `merges` or a list of labels, as `generation.models` and `domain_eval.models` say."""
    if which == "all":
        return list(models)
    if which == "merges":
        return [m for m in models if m.kind == "merge"]
    wanted = set(which)
    return [m for m in models if str(m) in wanted]


def _model_step(ref: ModelRef) -> str:
    return f"{'merge' if ref.kind == 'merge' else 'models'}:{ref.name if ref.kind == 'merge' else ref}"


def domain_tasks(cfg: RunConfig, expert: str | None) -> list[str]:
    """lm-eval tasks (names, presets or absolute YAML paths) for a model of `expert` (None: base and aligned):
    `domain_eval.tasks` if given, else that expert's `domain` preset (base and aligned: every expert's)."""
    if cfg.domain_eval.tasks:
        return list(cfg.domain_eval.tasks)
    domains = [e.domain for e in cfg.models.experts if e.domain and (expert is None or e.name == expert)]
    return list(dict.fromkeys(d for d in domains if d))


def _is_yaml(task: str) -> bool:
    return task.endswith((".yaml", ".yml"))


def plan_study(cfg: RunConfig) -> StudyPlan:
    """Every step of the study `cfg` (a loaded config: paths absolute), in dependency order."""
    from mergealign.judges.run import MODEL_JUDGES

    steps: list[Step] = []
    inputs = {"base": cfg.models.base, "aligned": cfg.models.aligned}
    inputs.update({str(refs.expert(e.name)): e for e in cfg.models.experts})
    sources = {label: src.model_dump(include={"path", "hub", "revision"}, exclude_none=True)
               for label, src in inputs.items()}  # fmt: skip
    experts = [str(refs.expert(e.name)) for e in sorted(cfg.models.experts, key=lambda e: e.name)]
    steps.append(Step("preflight", "models", params={"trios": experts}, info={"sources": sources}))
    for label, source in sources.items():
        steps.append(Step("models", label, params={"source": source}, after=("preflight:models",)))
    gen = cfg.generation
    if gen.enabled:
        for j in cfg.judges:
            if j.name in MODEL_JUDGES:
                src = j.model.model_dump(include={"path", "hub", "revision"}, exclude_none=True) if j.model else {
                    "hub": MODEL_JUDGES[j.name].default_model}  # fmt: skip
                steps.append(Step("models", str(refs.judge(j.name)), params={"source": src}))
    if cfg.vectors.persist:
        for label in [label for label in sources if label != "base"]:
            steps.append(Step("vectors", label, inputs={"base": "models:base", "model": f"models:{label}"},
                              params={"dtype": cfg.vectors.dtype}))  # fmt: skip

    merges = planned_merges(cfg)
    merges += planned_variants(cfg, [m.id for m in merges])
    by_id = {m.id: m for m in merges}
    for m in merges:
        trio = {
            "base": "models:base",
            "expert": f"models:{refs.expert(m.expert)}",
            "aligned": "models:aligned",
        }
        steps.append(Step("merge", m.id, inputs=trio, params=m.params(),
                          info={"expert": m.expert, "kind": m.kind, "report": dict(m.report)}))  # fmt: skip
    if cfg.analysis.similarity:
        for e in cfg.models.experts:
            mine = {m.id: f"merge:{m.id}" for m in merges if m.expert == e.name and m.kind == "merge"}
            trio = {
                "base": "models:base",
                "expert": f"models:{refs.expert(e.name)}",
                "aligned": "models:aligned",
            }
            steps.append(Step("similarity", e.name, inputs={**trio, "merged": mine}))

    models = model_refs(cfg, merges)
    judged: dict[ModelRef, dict[str, str]] = {}
    if gen.enabled:
        for p in gen.prompt_sets:
            params = p.model_dump(exclude={"path"}, exclude_none=True)
            steps.append(
                Step("prompts", p.label, params=params, info={"entry": p.model_dump(exclude_none=True)})
            )
        generation = gen.model_dump(exclude={"enabled", "prompt_sets", "models"})
        gens = []
        for ref in selected(gen.models, models):
            for p in gen.prompt_sets:
                step = Step("generate", f"{ref}/{p.label}", params={"generation": generation},
                            inputs={"model": _model_step(ref), "prompts": f"prompts:{p.label}",
                                    "template_model": "models:aligned"},
                            info={"model": str(ref), "prompt_set": p.label},
                            run=f"generate-{ref}-{p.label}")  # fmt: skip
                steps.append(step)
                gens.append((ref, p.label, step))
        for j in cfg.judges:
            for ref, set_label, gstep in gens:
                ins: dict[str, str] = {"generations": gstep.id}
                if j.name in MODEL_JUDGES:
                    ins["judge_model"] = f"models:{refs.judge(j.name)}"
                step = Step("judge", f"{j.name} {ref}/{set_label}", inputs=ins,
                            params={"judge": j.model_dump(exclude={"model"}, exclude_none=True)},
                            info={"model": str(ref), "prompt_set": set_label, "judge": j.name},
                            run=f"judge-{j.name}-{ref}/{set_label}")  # fmt: skip
                steps.append(step)
                judged.setdefault(ref, {})[f"{j.name}/{set_label}"] = step.id
        for ref, files in judged.items():
            steps.append(Step("safety", str(ref), inputs={"judged": files}, params={"n_bootstrap": 1000, "seed": 0},
                              info={"model": str(ref)}))  # fmt: skip

    de = cfg.domain_eval
    domain: dict[ModelRef, str] = {}
    if de.enabled:
        settings = de.model_dump(exclude={"enabled", "tasks", "models", "device"})
        for ref in selected(de.models, models):
            expert = (
                ref.name
                if ref.kind == "expert"
                else (by_id[ref.name].expert if ref.kind == "merge" else None)
            )
            tasks = domain_tasks(cfg, expert)
            if not tasks:
                continue
            plain = [t.replace("\\", "/").rsplit("/", 1)[-1] if _is_yaml(t) else t for t in tasks]
            step = Step("domain_eval", str(ref), inputs={"model": _model_step(ref)},
                        params={"tasks": plain, "settings": settings},
                        info={"model": str(ref), "tasks": tasks, "config_dir": cfg.config_dir, "device": de.device})  # fmt: skip
            steps.append(step)
            domain[ref] = step.id

    if cfg.analysis.report:
        steps.append(_report_step(cfg, steps, models, by_id, judged, domain))
        if cfg.zoo_demo is not None and gen.enabled:  # the demo says in words what its report shows
            sets = gen.prompt_sets
            harmful = next((p.label for p in sets if p.kind == "harmful"), sets[0].label)
            benign = next((p.label for p in sets if p.kind == "benign"), sets[-1].label)
            params = {"expert": cfg.models.experts[0].name, "harmful_set": harmful, "benign_set": benign}
            steps.append(Step("findings", cfg.name, inputs={"report": steps[-1].id}, params=params))
    return StudyPlan(cfg.name, tuple(steps), tuple(str(m) for m in models))


def _report_step(cfg: RunConfig, steps: list[Step], models: list[ModelRef], merges: Mapping[str, PlannedMerge],
                 judged: Mapping[ModelRef, Any], domain: Mapping[ModelRef, str]) -> Step:  # fmt: skip
    rows, model_in, safety_in, domain_in = [], {}, {}, {}
    for ref in models:
        if ref.kind == "merge":
            m = merges[ref.name]
            row = {"name": m.id, "kind": m.kind, "expert": m.expert, "info": dict(m.report)}
        elif ref.kind == "expert":
            row = {"name": ref.report_name, "kind": "expert", "expert": ref.name, "info": {}}
        else:
            row = {"name": ref.report_name, "kind": ref.kind, "expert": None, "info": {}}
        rows.append({**row, "model": str(ref)})
        model_in[str(ref)] = _model_step(ref)
        if ref in judged:
            safety_in[str(ref)] = f"safety:{ref}"
        if ref in domain:
            domain_in[str(ref)] = domain[ref]
    similarity = {s.name: s.id for s in steps if s.kind == "similarity"}
    used = (
        set(model_in.values()) | set(safety_in.values()) | set(domain_in.values()) | set(similarity.values())
    )
    other = {s.id: s.id for s in steps if s.id not in used}  # their timings go into the report
    return Step("report", cfg.name, run="report", inputs={"models": model_in, "safety": safety_in, "domain": domain_in,
                                            "similarity": similarity, "other": other},
                params={"title": cfg.name, "rows": rows, "config": cfg.portable()})  # fmt: skip
