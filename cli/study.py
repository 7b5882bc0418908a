"""CLI: `mergealign run CONFIG`, `mergealign validate CONFIG`."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


@app.command("run")
def run(
    config: Path = typer.Argument(..., help="run config (YAML)"),
    workers: int = typer.Option(None, "--workers", help="tasks at once (default: execution.max_workers)"),
) -> None:
    """Run a study: every step of CONFIG as a Prefect flow; finished steps are reused."""
    from mergealign.study import check_inputs, load_config

    cfg = load_config(config)  # ConfigError: all problems, exit 2, nothing run
    if cfg.zoo_tiny is not None:  # the smoke trio is an input: build it first, then check the inputs
        from mergealign.zoo_tiny import build_tiny_zoo

        z = cfg.zoo_tiny
        build_tiny_zoo(z.dir, seed=z.seed, arch=z.arch, size=z.size, dtype=z.dtype)
    check_inputs(cfg)
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.study import mergealign_study

    max_workers = workers or cfg.execution.max_workers
    study = mergealign_study.with_options(task_runner=ThreadPoolTaskRunner(max_workers=max_workers))
    result = study(config=str(config.resolve()))
    steps = result.get("steps", [])
    cached = sum(1 for s in steps if s.get("state") == "Cached")
    typer.echo(f"study {result['study']}: {len(steps)} steps ({cached} reused from earlier runs)")
    typer.echo(f"artifacts: {result['artifact_root']}")
    if result.get("report"):
        typer.echo(f"report: {result['report']}")


@app.command("validate")
def validate(
    config: Path = typer.Argument(..., help="run config (YAML)"),
    as_json: bool = typer.Option(
        False, "--json", help="the plan as JSON (steps, inputs, parameters, finished)"
    ),
) -> None:
    """Check a run config (every problem at once, exit 2) and list what a run would do."""
    import json

    from mergealign.study import load_config, plan_study

    cfg = load_config(config)
    plan = plan_study(cfg)
    finished = _finished(cfg, plan)
    if as_json:
        doc = plan.to_dict()
        for step in doc["steps"]:
            step["finished"] = finished.get(step["id"])
        typer.echo(json.dumps(doc, indent=1))
        return
    merges = [s.name for s in plan.of_kind("merge")]
    typer.echo(f"{config}: valid run config {cfg.name!r}")
    typer.echo(f"  artifact root: {cfg.artifact_root}")
    if cfg.zoo_demo is not None:
        typer.echo(f"  demo zoo: {cfg.zoo_demo.dir} (built first if missing)")
    for step in plan.of_kind("models"):
        source = step.params["source"]
        where = f"{source['hub']}@{source.get('revision') or 'main'}" if source.get("hub") else source["path"]
        typer.echo(f"  model {step.name}: {where}")
    typer.echo(f"  merges ({len(merges)}): {', '.join(merges) or '(none)'}")
    deployed = {k: v for k, v in cfg.execution.deployments.model_dump().items() if v}
    if deployed:
        typer.echo("  on work pools: " + ", ".join(f"{k} -> {v}" for k, v in deployed.items()))
    done = sum(1 for v in finished.values() if v)
    state = f", {done} finished" if finished else ""
    typer.echo(f"\n{len(plan.steps)} steps{state}:")
    rows = [
        (s.id, _inputs_text(s), "" if not finished else ("yes" if finished[s.id] else "no"))
        for s in plan.steps
    ]
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    typer.echo(f"  {'step':<{width[0]}}  {'inputs':<{width[1]}}  {'finished' if finished else ''}".rstrip())
    for sid, inputs, fin in rows:
        typer.echo(f"  {sid:<{width[0]}}  {inputs:<{width[1]}}  {fin}".rstrip())


def _inputs_text(step) -> str:
    parts = [v if isinstance(v, str) else f"{role}: {len(v)} step(s)" for role, v in step.inputs.items()]
    parts += [f"after {a}" for a in step.after]
    return ", ".join(parts) or "-"


def _finished(cfg, plan) -> dict[str, bool]:
    """step id -> finished, when the artifact root exists (an empty dict otherwise: nothing ran yet)."""
    from mergealign.artifacts import ArtifactStore

    store = ArtifactStore(cfg.artifact_root)
    if not store.fs.exists(store.root if store.is_local else cfg.artifact_root):
        return {}
    from tasks.context import context_for
    from tasks.status import finished_steps

    return {sid: m is not None for sid, m in finished_steps(context_for(cfg), plan).items()}
