"""CLI commands of the pipeline: `mergealign run CONFIG`, `mergealign validate CONFIG`, `mergealign zoo tiny DIR`.

flows/cli.py imports this module and calls `register(app)`.
"""

from __future__ import annotations

from pathlib import Path

import typer

zoo_app = typer.Typer(help="Build model zoos for smoke runs and demos.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("validate")(validate)
    app.add_typer(zoo_app, name="zoo")


def run(
    config: Path = typer.Argument(..., help="run config (YAML)"),
    workers: int = typer.Option(None, "--workers", help="tasks at once (default: execution.max_workers)"),
) -> None:
    """Run a study: every step of CONFIG as a Prefect flow; finished steps are reused."""
    from mergealign.config import check_inputs, load_config

    cfg = load_config(config)  # ConfigError: all problems, exit 2, nothing run
    if cfg.zoo_tiny is not None:  # the smoke trio is an input: build it first, then check the inputs
        from mergealign.zoo_tiny import build_tiny_zoo

        z = cfg.zoo_tiny
        build_tiny_zoo(cfg.resolve_path(z.dir), seed=z.seed, arch=z.arch, size=z.size, dtype=z.dtype)
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


def validate(config: Path = typer.Argument(..., help="run config (YAML)")) -> None:
    """Check a run config (every problem at once, exit 2) and list what a run would do."""
    from mergealign.config import load_config

    cfg = load_config(config)
    jobs = cfg.merge_jobs()
    typer.echo(f"{config}: valid run config {cfg.name!r}")
    typer.echo(f"  artifact root: {cfg.artifact_url}")
    if cfg.zoo_demo is not None:
        typer.echo(f"  demo zoo: {cfg.resolve_path(cfg.zoo_demo.dir)} (built first if missing)")
    for label, src in cfg.model_sources().items():
        typer.echo(f"  model {label}: {src.describe()}")
    typer.echo(f"  merges ({len(jobs)}): {', '.join(j.id for j in jobs) or '(none)'}")
    if cfg.generation.enabled:
        sets = ", ".join(p.label for p in cfg.generation.prompt_sets)
        typer.echo(
            f"  generation ({cfg.generation.backend}): {len(cfg.selected(cfg.generation.models))} models × {sets}"
        )
    if cfg.judges:
        typer.echo(f"  judges: {', '.join(j.name for j in cfg.judges)}")
    if cfg.domain_eval.enabled:
        typer.echo(
            f"  domain eval ({cfg.domain_eval.backend}): {', '.join(cfg.domain_eval.tasks) or 'expert presets'}"
        )
    deployed = {k: v for k, v in cfg.execution.deployments.model_dump().items() if v}
    if deployed:
        typer.echo("  on work pools: " + ", ".join(f"{k} -> {v}" for k, v in deployed.items()))


@zoo_app.command("tiny")
def zoo_tiny(
    directory: Path = typer.Argument(..., help="where base/, aligned/ and expert/ go"),
    seed: int = typer.Option(0, help="random seed"),
    arch: str = typer.Option("llama", help="llama (untied) or qwen2 (tied embeddings)"),
    size: str = typer.Option("tiny", help="tiny (~60k parameters) or small (~17M)"),
    overwrite: bool = typer.Option(False, help="rebuild even if a finished trio is there"),
) -> None:
    """Build a random tiny trio (base, aligned, expert; head_dim 32) for smoke runs; no downloads."""
    from mergealign.zoo_tiny import build_tiny_zoo

    trio = build_tiny_zoo(directory, seed=seed, arch=arch, size=size, overwrite=overwrite)
    typer.echo(f"tiny trio: base={trio.base} aligned={trio.aligned} expert={trio.expert}")
