"""CLI: `mergealign merge CONFIG OUT`, `mergealign diff BASE FINETUNED OUT`, `mergealign methods`."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False)


@app.command("merge")
def merge(
    config: Path = typer.Argument(
        ..., help="merge config (YAML; mergekit's schema + mergealign's extensions)"
    ),
    out: Path = typer.Argument(..., help="output model directory"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an OUT that holds another merge"),
    device: str = typer.Option(
        None, "--device", help="auto | cpu | cuda | cuda:N (default: the config's, auto)"
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
) -> None:
    """Merge models as CONFIG says into OUT (resumable: re-run the same command after an interruption)."""
    from mergealign.merge import run_merge

    summary = run_merge(config, out, overwrite=overwrite, device=device, progress=not no_progress)
    typer.echo(summary.line())


@app.command("diff")
def diff(
    base: str = typer.Argument(..., help="base model (directory or hub id@revision in the HF cache)"),
    finetuned: str = typer.Argument(..., help="fine-tuned model of the same architecture"),
    out: Path = typer.Argument(..., help="output task-vector directory"),
    dtype: str = typer.Option(
        None, "--dtype", help="storage dtype of τ (default: the inputs'); float32 is exact"
    ),
    shard_size: str = typer.Option("2G", "--shard-size", help="bytes per shard (K/M/G suffixes)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an OUT that holds something else"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
) -> None:
    """Compute the task vector τ = FINETUNED − BASE (float32) with per-tensor statistics."""
    from mergealign.vectors import compute_vector

    summary = compute_vector(
        base,
        finetuned,
        out,
        dtype=dtype,
        shard_size=shard_size,
        overwrite=overwrite,
        progress=not no_progress,
    )
    typer.echo(summary.line())


@app.command("methods")
def methods() -> None:
    """List merge methods with their parameters (global and per model), defaults and ranges."""
    from mergealign.methods import METHODS, get_method

    for name in sorted(METHODS):
        m = get_method(name)
        base = "requires a base" if m.requires_base else ("base optional" if m.uses_base else "no base")
        typer.echo(f"{name}  ({base})\n    {m.formula}")
        for scope, specs in (("global", m.global_params), ("per model", m.model_params)):
            for pname, spec in specs.items():
                default = "" if spec.default is None else f", default {spec.default!r}"
                required = ", required" if spec.required else ""
                typer.echo(f"    {scope:9} {pname}: {spec.range_text()}{default}{required} — {spec.doc}")
        typer.echo("")
