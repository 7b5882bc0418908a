"""The `mergealign merge | diff | methods` commands, run as a user runs them (a subprocess) where exit codes
and output matter, else through typer's CliRunner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from mergealign.methods import METHODS
from tests.helpers.merge_configs import merge_config
from tests.helpers.models import make_trio

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("qwen"), "qwen2")


def mergealign(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_config(path: Path, trio, parameters: dict | None = None, **extra) -> Path:
    params = {"preset": "interp", "lambda": 0.5} if parameters is None else parameters
    cfg = merge_config(trio, parameters=params, **extra)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_methods_lists_every_method_with_parameters():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name, cls in METHODS.items():
        assert f"{name}  (" in result.output
        for param in list(cls.global_params) + list(cls.model_params):
            assert f" {param}: " in result.output


def test_merge_subprocess_success_and_summary(qwen, tmp_path):
    cfg = write_config(tmp_path / "m.yaml", qwen)
    out = tmp_path / "out"
    res = mergealign("merge", str(cfg), str(out), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert (
        line.startswith("merged 26/26 tensors on cpu: read") and "peak RssAnon" in line and str(out) in line
    )
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert "merge" in res.stderr  # the tqdm progress bar goes to stderr


def test_error_exit_codes(qwen, tmp_path):
    """A config error exits 2 naming the field; a preflight error exits 1; neither creates OUT.
    (Both run at once: each subprocess pays the CLI's start-up.)"""
    bad_key = write_config(tmp_path / "bad.yaml", qwen, merge_methd="ties")
    missing = write_config(tmp_path / "missing.yaml", qwen)
    missing.write_text(missing.read_text().replace(str(qwen.aligned), str(tmp_path / "missing")))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cli",
                "merge",
                str(cfg),
                str(tmp_path / f"out-{cfg.stem}"),
                "--no-progress",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cfg in (bad_key, missing)
    ]
    (_, err_key), (_, err_missing) = (p.communicate(timeout=300) for p in procs)
    assert procs[0].returncode == 2, err_key
    assert (
        "merge_methd: unknown field (did you mean 'merge_method'?); known: merge_method, base_model,"
        in err_key
    )
    assert procs[1].returncode == 1, err_missing
    assert "error: preflight found 1 problem(s)" in err_missing and "missing" in err_missing
    assert not list(tmp_path.glob("out-*"))


def test_overwrite_flag_and_unavailable_device(qwen, tmp_path):
    out = tmp_path / "out"
    first = write_config(tmp_path / "a.yaml", qwen)
    second = write_config(tmp_path / "b.yaml", qwen, parameters={"lambda": 0.9})
    assert runner.invoke(app, ["merge", str(first), str(out), "--no-progress"]).exit_code == 0
    refused = runner.invoke(app, ["merge", str(second), str(out), "--no-progress"])
    assert refused.exit_code != 0 and "--overwrite" in str(refused.exception)
    assert runner.invoke(app, ["merge", str(second), str(out), "--no-progress", "--overwrite"]).exit_code == 0
    cuda = runner.invoke(
        app, ["merge", str(first), str(tmp_path / "gpu"), "--no-progress", "--device", "cuda"]
    )
    import torch

    if not torch.cuda.is_available():
        assert cuda.exit_code != 0 and "no CUDA device" in str(cuda.exception)


def test_relative_model_paths_resolve_against_the_config_directory(qwen, tmp_path):
    cfg = {
        "merge_method": "mergealign",
        "base_model": os.path.relpath(qwen.base, tmp_path),
        "models": [
            {"model": os.path.relpath(qwen.expert, tmp_path), "role": "domain"},
            {"model": os.path.relpath(qwen.aligned, tmp_path), "role": "alignment"},
        ],
    }
    (tmp_path / "rel.yaml").write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["merge", str(tmp_path / "rel.yaml"), str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
