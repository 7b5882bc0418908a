"""The `mergealign` command: a static table of every command, each loaded only when it runs.

`mergealign --help` is drawn from the table alone, so it imports no command module; `mergealign merge ...`
imports cli.merge and nothing of the Prefect-backed commands (prefect takes seconds to import).
"""

from __future__ import annotations

import importlib
import logging
import sys
from dataclasses import dataclass
from typing import Any

import typer
import typer.main
from typer.core import TyperCommand, TyperGroup

from mergealign.errors import MergeAlignError


@dataclass(frozen=True)
class Entry:
    """One command (or command group) of `mergealign`: where it lives and its line in `mergealign --help`."""

    name: str
    module: str  # defines `app`, a typer.Typer holding the command `name` (or, for a group, being it)
    help: str
    group: bool = False


COMMANDS: tuple[Entry, ...] = (
    Entry("merge", "cli.merge",
          "Merge models as CONFIG says into OUT (resumable: re-run the same command after an interruption)."),
    Entry("diff", "cli.merge", "Compute the task vector τ = FINETUNED − BASE (float32) with per-tensor statistics."),
    Entry("methods", "cli.merge",
          "List merge methods with their parameters (global and per model), defaults and ranges."),
    Entry("prompts", "cli.evaluation",
          "Resolve a prompt set (named, bundled or local), sample it with a seed, write canonical JSONL."),
    Entry("generate", "cli.evaluation",
          "Generate one answer per prompt, in a child process; re-running resumes a killed run."),
    Entry("judge", "cli.evaluation",
          "Judge every answer: safe/unsafe + categories (safety judges) and refused (all judges)."),
    Entry("safety-metrics", "cli.evaluation",
          "% safe, % refusal, over-refusal, unparseable per judge, prompt set and category, with 95% CIs."),
    Entry("eval-domain", "cli.evaluation",
          "Domain benchmarks through lm-eval: per-task accuracy ± stderr and the average, as JSON."),
    Entry("similarity", "cli.analysis",
          "Norms, cosines, sign conflicts and TIES overlap of τ_D and τ_A (per tensor, layer, module), and how "
          "each merged model's delta decomposes onto them; one streaming pass."),
    Entry("report", "cli.analysis",
          "Build report.md, report.html and PNG plots from a results folder; lists the inputs that are missing."),
    Entry("contributions", "cli.analysis",
          "Write the merge configs of contribution variants (a vector only in some modules / layers) and λ sweeps."),
    Entry("cka", "cli.analysis",
          "Linear CKA of hidden states per layer between models, on a prompt set (transformers, CPU)."),
    Entry("run", "cli.study", "Run a study: every step of CONFIG as a Prefect flow; finished steps are reused."),
    Entry("validate", "cli.study",
          "Check a run config (every problem at once, exit 2) and list what a run would do."),
    Entry("demo", "cli.demo",
          "Build the demo trio (first time, ~10 min on 2 cores), run the study on it, print the report's path."),
    Entry("zoo", "cli.zoo", "Build model zoos for smoke runs and demos.", group=True),
)  # fmt: skip


def load_command(entry: Entry) -> TyperCommand | TyperGroup:
    """The real command (or group) of `entry`, importing its module."""
    command = typer.main.get_command(importlib.import_module(entry.module).app)
    if not entry.group and isinstance(command, TyperGroup):
        command = command.commands[entry.name]
    command.name = entry.name
    return command


class LazyCommand(TyperCommand):
    """A table entry standing in for its command: it has the help line, and loads the command to parse."""

    def __init__(self, entry: Entry) -> None:
        super().__init__(entry.name, help=entry.help)
        self.entry = entry

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        # the context belongs to the real command, so parsing, help and invocation are all its own
        return load_command(self.entry).make_context(info_name, args, parent=parent, **extra)


class TableGroup(TyperGroup):
    """The top-level group: its commands are the table's entries, in table order."""

    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        for entry in COMMANDS:
            self.add_command(LazyCommand(entry))


app = typer.Typer(
    name="mergealign",
    cls=TableGroup,
    help="Merge domain and alignment vectors into safe domain experts, and measure the trade-off.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    # typer builds a group only for an app with a callback or registered commands; the table adds the rest
    pass


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except MergeAlignError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
