"""Builds a study's DAG inside a flow: which tasks, with which inputs, submitted in dependency order.

The study, merge and evaluate flows share it, so a step has the same key whichever flow runs it. Every step
is submitted (`.submit`) to the flow's thread-pool task runner; Prefect starts a task as soon as the futures
it takes are done, so independent branches (similarity beside generation, one model's answers beside another's
merge) run at once. Steps named in `execution.deployments` run on a work pool through `run_deployment`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.futures import PrefectFuture, wait

from mergealign.config import MergeSpec, RunConfig, check_inputs, coerce_config
from mergealign.errors import MergeAlignError
from tasks.common import StepContext, bind, context_for, hf_token, publish_table, run_logger

log = logging.getLogger(__name__)


def _ok(fut: PrefectFuture[Any] | None) -> Any:
    """The result of a finished future, or None if it failed (the report says what is missing)."""
    if fut is None:
        return None
    state = fut.state
    return fut.result() if state.is_completed() else None


@dataclass
class Tracked:
    step: str
    label: str
    future: PrefectFuture[Any]


@dataclass
class StudyRun:
    """One flow run's view of a study: config, step context, bound tasks, and every submitted future."""

    cfg: RunConfig
    ctx: StepContext
    tracked: list[Tracked] = field(default_factory=list)
    specs: dict[str, MergeSpec] = field(default_factory=dict)
    _bound: dict[str, Task[..., Any]] = field(default_factory=dict)

    @classmethod
    def start(cls, config: RunConfig | dict[str, Any] | str) -> StudyRun:
        """Validate the config and the world (paths, writable root) before any step; build the tiny zoo."""
        cfg = coerce_config(config)
        if cfg.zoo_tiny is not None:
            from mergealign.zoo_tiny import build_tiny_zoo

            z = cfg.zoo_tiny
            build_tiny_zoo(cfg.resolve_path(z.dir), seed=z.seed, arch=z.arch, size=z.size, dtype=z.dtype)
        check_inputs(cfg)
        ctx = context_for(cfg)
        run_logger().info("study %s: artifacts under %s", cfg.name, ctx.artifact_root)
        return cls(cfg=cfg, ctx=ctx)

    # ------------------------------------------------------------------ helpers
    def task(self, t: Task[..., Any]) -> Task[..., Any]:
        key = f"{t.name}:{id(t)}"
        if key not in self._bound:
            ex = self.cfg.execution
            self._bound[key] = bind(
                t, self.ctx, retries=ex.retries, retry_delay_seconds=ex.retry_delay_seconds
            )
        return self._bound[key]

    def submit(self, _step: str, _label: str, _task: Task[..., Any], **kwargs: Any) -> PrefectFuture[Any]:
        fut = self.task(_task).submit(**kwargs)
        self.tracked.append(Tracked(_step, _label, fut))
        return fut

    def deployment(self, step: str) -> str | None:
        return getattr(self.cfg.execution.deployments, step, None)

    # ------------------------------------------------------------------ models
    def models(self) -> dict[str, PrefectFuture[Any]]:
        """Pin every input (hub sha / local fingerprint), preflight them from headers, then fetch them."""
        from tasks.models import fetch_model, resolve_source
        from tasks.preflight import preflight_models

        token = hf_token(self.ctx) if any(s.hub for s in self.cfg.model_sources().values()) else None
        sources = {
            label: resolve_source(self.cfg, src, token=token)
            for label, src in self.cfg.model_sources().items()
        }
        pre = self.submit("preflight", "models", preflight_models, ctx=self.ctx, sources=sources)
        futures = {}
        for label, source in sources.items():
            futures[label] = self.task(fetch_model).submit(
                ctx=self.ctx, source=source, label=label, wait_for=[pre]
            )
            self.tracked.append(Tracked("models", label, futures[label]))
        return futures

    def judge_models(self) -> dict[str, PrefectFuture[Any]]:
        """Checkpoints of the model judges (pinned and fetched like any model; no preflight with the trio)."""
        from mergealign.config import ModelSource
        from mergealign.judges.run import MODEL_JUDGES
        from tasks.models import fetch_model, resolve_source

        if not self.cfg.generation.enabled:
            return {}
        out = {}
        for entry in self.cfg.judges:
            if entry.name not in MODEL_JUDGES:
                continue
            src = entry.model or ModelSource(hub=MODEL_JUDGES[entry.name].default_model)
            token = hf_token(self.ctx) if src.hub else None
            source = resolve_source(self.cfg, src, token=token)
            out[entry.name] = self.submit("models", f"judge:{entry.name}", fetch_model, ctx=self.ctx, source=source,
                                          label=f"judge:{entry.name}")  # fmt: skip
        return out

    def vectors(self, models: dict[str, PrefectFuture[Any]]) -> dict[str, PrefectFuture[Any]]:
        if not self.cfg.vectors.persist:
            return {}
        from tasks.vectors import vector_task

        out = {}
        for label in [lab for lab in models if lab != "base"]:
            out[label] = self.submit("vectors", label, vector_task, ctx=self.ctx, label=label, base=models["base"],
                                     model=models[label], dtype=self.cfg.vectors.dtype)  # fmt: skip
        return out

    # ------------------------------------------------------------------ merges
    def merge_specs(self, models: dict[str, PrefectFuture[Any]]) -> list[MergeSpec]:
        """The study's merges (entries × experts × λ) and, if configured, the contribution variants (these need
        the base model's tensor names, so the base is fetched first)."""
        specs = [j.spec() for j in self.cfg.merge_jobs()]
        if not self.cfg.analysis.contributions:
            return specs
        from mergealign.checkpoint import Checkpoint
        from mergealign.config import PLACEHOLDERS
        from mergealign.contributions import parse_contributions

        base_dir = self.ctx.store().local_dir(models["base"].result())
        ck = Checkpoint(base_dir)
        names = list(ck.tensors)
        n_layers = int((ck.config.get("text_config") or ck.config).get("num_hidden_layers") or 0)
        template = {
            "merge_method": "mergealign",
            "base_model": PLACEHOLDERS["base"],
            "models": [
                {"model": PLACEHOLDERS["expert"], "role": "domain"},
                {"model": PLACEHOLDERS["aligned"], "role": "alignment"},
            ],
            "parameters": {"preset": "interp", "lambda": 0.5},
            "copy_files_from": PLACEHOLDERS["aligned"],
        }
        seen = {s.id for s in specs}
        for entry in parse_contributions(self.cfg.analysis.contributions):
            for variant in entry.variants(template, tensor_names=names, n_layers=n_layers):
                for expert in self.cfg.models.experts:
                    sid = f"{expert.name}-{variant.name}"
                    if sid in seen:
                        continue
                    seen.add(sid)
                    info = {
                        "method": "mergealign",
                        "lambda_domain": variant.lambda_domain,
                        "lambda_alignment": variant.lambda_alignment,
                        "variant": variant.describe(),
                    }
                    specs.append(MergeSpec(id=sid, expert=expert.name, kind="variant", method="mergealign",
                                           template=variant.config, info=info))  # fmt: skip
        return specs

    def merges(self, models: dict[str, PrefectFuture[Any]], only: Iterable[str] | None = None, *,
               allow_remote: bool = True) -> dict[str, PrefectFuture[Any]]:  # fmt: skip
        from tasks.merge import merge_remote_task, merge_task

        wanted = set(only) if only is not None else None
        deployment = self.deployment("merge") if allow_remote else None
        out = {}
        for spec in self.merge_specs(models):
            if wanted is not None and spec.id not in wanted:
                continue
            self.specs[spec.id] = spec
            args = dict(ctx=self.ctx, spec=spec, base=models["base"], expert=models[f"expert:{spec.expert}"],
                        aligned=models["aligned"])  # fmt: skip
            if deployment:
                out[spec.id] = self.submit("merge", spec.id, merge_remote_task, deployment=deployment,
                                           config=self.cfg.portable(), **args)  # fmt: skip
            else:
                out[spec.id] = self.submit("merge", spec.id, merge_task, **args)
        return out

    def similarity(self, models: dict[str, PrefectFuture[Any]], merges: dict[str, PrefectFuture[Any]]
                   ) -> dict[str, PrefectFuture[Any]]:  # fmt: skip
        if not self.cfg.analysis.similarity:
            return {}
        from tasks.similarity import similarity_task

        out = {}
        for expert in self.cfg.models.experts:
            mine = {
                i: f
                for i, f in merges.items()
                if self.specs[i].expert == expert.name and self.specs[i].kind == "merge"
            }
            out[expert.name] = self.submit(
                "similarity", expert.name, similarity_task, ctx=self.ctx, expert_name=expert.name,
                base=models["base"], expert=models[f"expert:{expert.name}"], aligned=models["aligned"], merged=mine,
            )  # fmt: skip
        return out

    # ------------------------------------------------------------------ evaluation
    def all_models(self, models: dict[str, PrefectFuture[Any]], merges: dict[str, PrefectFuture[Any]]
                   ) -> dict[str, PrefectFuture[Any]]:  # fmt: skip
        out = dict(models)
        out.update({f"merge:{k}": v for k, v in merges.items()})
        return out

    def prompts(self) -> dict[str, PrefectFuture[Any]]:
        from tasks.prompts import prompts_task

        out = {}
        for entry in self.cfg.generation.prompt_sets:
            local = str(self.cfg.resolve_path(entry.path)) if entry.path else None
            out[entry.label] = self.submit("prompts", entry.label, prompts_task, ctx=self.ctx, entry=entry,
                                           local_path=local)  # fmt: skip
        return out

    def generations(self, everything: dict[str, PrefectFuture[Any]], prompts: dict[str, PrefectFuture[Any]],
                    labels: Iterable[str] | None = None, *, allow_remote: bool = True
                    ) -> dict[tuple[str, str], PrefectFuture[Any]]:  # fmt: skip
        from tasks.generate import generate_remote_task, generate_task

        gen = self.cfg.generation
        chosen = list(labels) if labels is not None else self.selected(gen.models, everything)
        deployment = self.deployment("generate") if allow_remote else None
        out = {}
        for label in chosen:
            if label not in everything:
                continue
            for set_label, pfut in prompts.items():
                args = dict(ctx=self.ctx, label=label, prompt_set=set_label, gen=gen, model=everything[label],
                            prompts=pfut, template_model=everything["aligned"])  # fmt: skip
                if deployment:
                    fut = self.submit("generate", f"{label}/{set_label}", generate_remote_task,
                                      deployment=deployment, config=self.cfg.portable(), **args)  # fmt: skip
                else:
                    fut = self.submit("generate", f"{label}/{set_label}", generate_task, **args)
                out[(label, set_label)] = fut
        return out

    def selected(self, which: Any, everything: dict[str, PrefectFuture[Any]]) -> list[str]:
        if which == "all":
            return [k for k in everything if not k.startswith("judge:")]
        if which == "merges":
            return [k for k in everything if k.startswith("merge:")]
        return [k for k in everything if k in which]

    def expert_of(self, label: str) -> str | None:
        if label.startswith("expert:"):
            return label.split(":", 1)[1]
        if label.startswith("merge:"):
            return self.specs[label[6:]].expert
        return None

    def judgments(self, gens: dict[tuple[str, str], PrefectFuture[Any]], judge_models: dict[str, PrefectFuture[Any]],
                  only: Iterable[str] | None = None, *, allow_remote: bool = True
                  ) -> dict[tuple[str, str, str], PrefectFuture[Any]]:  # fmt: skip
        from tasks.judge import judge_remote_task, judge_task

        deployment = self.deployment("judge") if allow_remote else None
        out = {}
        for entry in self.cfg.judges:
            if only is not None and entry.name not in only:
                continue
            for (label, set_label), gfut in gens.items():
                args = dict(ctx=self.ctx, label=f"{label}/{set_label}", entry=entry, generations=gfut,
                            judge_model=judge_models.get(entry.name))  # fmt: skip
                if deployment:
                    fut = self.submit("judge", f"{entry.name} {label}/{set_label}", judge_remote_task,
                                      deployment=deployment, config=self.cfg.portable(), model=label,
                                      prompt_set=set_label, **args)  # fmt: skip
                else:
                    fut = self.submit("judge", f"{entry.name} {label}/{set_label}", judge_task, **args)
                out[(entry.name, label, set_label)] = fut
        return out

    def safety(self, judged: dict[tuple[str, str, str], PrefectFuture[Any]]) -> dict[str, PrefectFuture[Any]]:
        from tasks.safety import safety_task

        by_model: dict[str, dict[str, PrefectFuture[Any]]] = {}
        for (judge, label, set_label), fut in judged.items():
            by_model.setdefault(label, {})[f"{judge}/{set_label}"] = fut
        return {label: self.submit("safety", label, safety_task, ctx=self.ctx, label=label, judged=files)
                for label, files in by_model.items()}  # fmt: skip

    def domain(self, everything: dict[str, PrefectFuture[Any]], labels: Iterable[str] | None = None, *,
               allow_remote: bool = True) -> dict[str, PrefectFuture[Any]]:  # fmt: skip
        from tasks.domain_eval import domain_eval_remote_task, domain_eval_task

        de = self.cfg.domain_eval
        if de.data_dir:
            de = de.model_copy(update={"data_dir": str(self.cfg.resolve_path(de.data_dir))})
        deployment = self.deployment("domain_eval") if allow_remote else None
        if not de.enabled:
            return {}
        chosen = list(labels) if labels is not None else self.selected(de.models, everything)
        out = {}
        for label in chosen:
            if label not in everything:
                continue
            tasks = de.tasks_for(self.cfg, self.expert_of(label))
            if not tasks:
                run_logger().info(
                    "domain eval: no tasks for %s (no `tasks`, no expert `domain`): skipped", label
                )
                continue
            args = dict(ctx=self.ctx, label=label, cfg=de, tasks=tasks, model=everything[label],
                        config_dir=str(self.cfg.base_dir))  # fmt: skip
            if deployment:
                out[label] = self.submit("domain_eval", label, domain_eval_remote_task, deployment=deployment,
                                         config=self.cfg.portable(), **args)  # fmt: skip
            else:
                out[label] = self.submit("domain_eval", label, domain_eval_task, **args)
        return out

    def report(self, everything: dict[str, PrefectFuture[Any]], safety: dict[str, PrefectFuture[Any]],
               domain: dict[str, PrefectFuture[Any]], similarity: dict[str, PrefectFuture[Any]]
               ) -> PrefectFuture[Any] | None:  # fmt: skip
        if not self.cfg.analysis.report:
            return None
        from tasks.report import ReportModel, report_task

        rows = []
        for label, fut in everything.items():
            if label.startswith("judge:"):
                continue
            if label.startswith("merge:"):
                spec = self.specs[label[6:]]
                name, kind, expert, info = spec.id, spec.kind, spec.expert, dict(spec.info)
            elif label.startswith("expert:"):
                name, kind, expert, info = f"expert-{label[7:]}", "expert", label[7:], {}
            else:
                name, kind, expert, info = label, label, None, {}
            rows.append((ReportModel(name=name, kind=kind, expert=expert, info=info), fut, safety.get(label),
                         domain.get(label)))  # fmt: skip
        wait([f for _, *fs in rows for f in fs if f is not None] + list(similarity.values()))
        models = []
        for row, mf, sf, df in rows:
            models.append(row.model_copy(update={"model": _ok(mf), "safety": _ok(sf), "domain": _ok(df)}))
        sims = {k: m for k, f in similarity.items() if (m := _ok(f)) is not None}
        timings = [{"step": t.step, "label": t.label, "seconds": m.duration_s}
                   for t in self.tracked if (m := _ok(t.future)) is not None]  # fmt: skip
        return self.submit("report", self.cfg.name, report_task, ctx=self.ctx, title=self.cfg.name, models=models,
                           similarity=sims, config=self.cfg.portable(), timings=timings)  # fmt: skip

    # ------------------------------------------------------------------ the end
    def finish(self, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Wait for every step; publish a table of them; raise (failing the flow) if any step failed."""
        wait([t.future for t in self.tracked])
        rows, failed = [], []
        for t in self.tracked:
            state = t.future.state
            row: dict[str, Any] = {"step": t.step, "label": t.label, "state": state.name}
            if state.is_completed():
                manifest = t.future.result()
                row.update(location=manifest.location, seconds=manifest.duration_s, key=manifest.key[:16])
            else:
                failed.append(f"{t.step} {t.label}: {state.name} ({(state.message or '').strip()[:300]})")
            rows.append(row)
        publish_table(rows, key=f"study-{self.cfg.name}", description=f"steps of study {self.cfg.name}")
        cached = sum(1 for r in rows if r["state"] == "Cached")
        run_logger().info("study %s: %d steps, %d cached, %d failed; artifacts under %s", self.cfg.name, len(rows),
                          cached, len(failed), self.ctx.artifact_root)  # fmt: skip
        if failed:
            raise MergeAlignError(f"study {self.cfg.name}: {len(failed)} step(s) did not finish:\n  - "
                                  + "\n  - ".join(failed))  # fmt: skip
        out: dict[str, Any] = {"study": self.cfg.name, "artifact_root": self.ctx.artifact_root, "steps": rows}
        report = (extra or {}).get("report_future")
        if report is not None:
            out["report"] = str(Path(report.result().location) / "report" / "report.html")
        return out
