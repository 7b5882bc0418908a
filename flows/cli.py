"""The `mergealign` command line: core commands from mergealign.commands plus the Prefect-backed ones."""

from __future__ import annotations

import importlib
import logging
import sys

import typer

from mergealign.errors import MergeAlignError


def _new_app() -> typer.Typer:
    return typer.Typer(
        name="mergealign",
        help="Merge domain and alignment vectors into safe domain experts, and measure the trade-off.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )


# Each module registers its own subcommands; a module that is not there yet is simply skipped. The core
# commands never import prefect, which takes seconds to import: `mergealign merge` loads only these.
_CORE_MODULES = (
    "mergealign.commands.merge",
    "mergealign.commands.evaluation",
    "mergealign.commands.analysis",
)
_FLOW_MODULES = ("flows.commands", "flows.demo")


def _register(app: typer.Typer, modules: tuple[str, ...]) -> None:
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(app)


def _command_names(app: typer.Typer) -> set[str]:
    names = {
        c.name or (c.callback.__name__.replace("_", "-") if c.callback else "")
        for c in app.registered_commands
    }
    return names | {g.name or "" for g in app.registered_groups}


def build_app(argv: list[str] | None = None) -> typer.Typer:
    """The CLI; given the arguments, only the modules their command needs (every module for --help)."""
    app = _new_app()
    _register(app, _CORE_MODULES)
    command = next((a for a in argv or [] if not a.startswith("-")), None)
    if command is None or command not in _command_names(app):
        _register(app, _FLOW_MODULES)
    return app


_full_app: typer.Typer | None = None


def __getattr__(name: str) -> typer.Typer:
    # `from flows.cli import app` (tests, typer's CliRunner): every command, built on first use
    global _full_app
    if name == "app":
        if _full_app is None:
            _full_app = build_app()
        return _full_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        build_app(sys.argv[1:])()
    except MergeAlignError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
