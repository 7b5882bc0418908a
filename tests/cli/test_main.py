"""The `mergealign` command's wiring: the static command table, lazy loading, help listing, top-level errors."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

from typer.core import TyperGroup
from typer.testing import CliRunner

from cli.main import COMMANDS, app, load_command

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("merge", "diff", "methods"):
        assert cmd in result.output
    for entry in COMMANDS:
        assert entry.name in result.output


def test_core_commands_do_not_import_prefect_and_help_lists_every_command(tmp_path):
    # `mergealign merge` must start fast: prefect (seconds to import) is loaded only for the flow commands, and
    # `mergealign --help` is drawn from the table without importing any command module.
    probe = (
        "import json, sys; from typer.testing import CliRunner; from cli.main import app; r = CliRunner(); "
        "mods = lambda: sorted(m for m in sys.modules if m.startswith('cli.')); "
        "full = r.invoke(app, ['--help']); assert full.exit_code == 0, full.output; "
        "assert 'prefect' not in sys.modules, 'prefect imported by --help'; after_help = mods(); "
        f"core = r.invoke(app, ['merge', {str(tmp_path / 'x.yaml')!r}, {str(tmp_path / 'out')!r}]); "
        "assert 'prefect' not in sys.modules, 'prefect imported'; "
        "print(json.dumps([after_help, mods(), type(core.exception).__name__, full.output]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    after_help, after_merge, error, full = json.loads(done.stdout)
    assert after_help == ["cli.main"]
    assert after_merge == ["cli.main", "cli.merge"]  # 'run' (cli.study) not loaded
    assert error == "ConfigError"  # the merge really ran: its config is missing
    assert "run" in full and "demo" in full and "merge" in full


def test_table_matches_the_command_modules():
    """Each entry's help line is its command's own help; each module's commands are all in the table."""
    by_module: dict[str, set[str]] = {}
    for entry in COMMANDS:
        command = load_command(entry)
        assert command.name == entry.name
        assert " ".join((command.help or "").split()) == entry.help, entry.name
        assert isinstance(command, TyperGroup) == entry.group, entry.name
        if not entry.group:
            by_module.setdefault(entry.module, set()).add(entry.name)
    assert len({e.name for e in COMMANDS}) == len(COMMANDS)
    for module, names in by_module.items():
        registered = {c.name for c in importlib.import_module(module).app.registered_commands}
        assert registered == names, module
    zoo = load_command(next(e for e in COMMANDS if e.name == "zoo"))
    assert sorted(zoo.commands) == ["demo", "tiny"]


def test_unknown_command_suggests_the_nearest():
    result = runner.invoke(app, ["merg"])
    assert result.exit_code == 2
    assert "No such command 'merg'. Did you mean 'merge'?" in result.output


def test_installed_command_prints_a_mergealign_error_on_one_line_with_its_exit_code(tmp_path):
    # the console script of pyproject.toml, run outside the repository: the installed package has cli/
    script = Path(sys.executable).with_name("mergealign")
    missing = tmp_path / "nope.yaml"
    done = subprocess.run([str(script), "validate", str(missing)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: invalid config in {missing} (1 problem(s)):\n")
    assert f"{missing}: no such file" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""
