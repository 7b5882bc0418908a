"""The `mergealign` command line: core commands from mergealign.commands plus the Prefect-backed ones."""

from __future__ import annotations

import importlib
import logging
import sys

import typer

from mergealign.errors import MergeAlignError

app = typer.Typer(
    name="mergealign",
    help="Merge domain and alignment vectors into safe domain experts, and measure the trade-off.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module registers its own subcommands; a module that is not there yet is simply skipped.
_COMMAND_MODULES = (
    "mergealign.commands.merge",
    "mergealign.commands.evaluation",
    "mergealign.commands.analysis",
    "flows.commands",
    "flows.demo",
)


def _register_all() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(app)


_register_all()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except MergeAlignError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
