"""Loading the run config: every problem at once with field paths, exit code 2, nothing run; paths absolute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mergealign.errors import ConfigError
from mergealign.study import check_inputs, load_config, parse_config, plan_study

REPO = Path(__file__).resolve().parents[2]


def _base(tmp_path: Path) -> dict:
    for role in ("base", "aligned", "expert"):
        (tmp_path / role).mkdir(exist_ok=True)
    return {
        "name": "t",
        "artifact_root": str(tmp_path / "art"),
        "models": {
            "base": {"path": str(tmp_path / "base")},
            "aligned": {"hub": "org/aligned", "revision": "v1"},
            "experts": [{"name": "med", "path": str(tmp_path / "expert"), "domain": "medicine"}],
        },
        "merges": [{"method": "mergealign", "lambda": [0.2, 0.8]}],
    }


def test_all_errors_reported_at_once_with_field_paths(tmp_path):
    cfg = _base(tmp_path)
    cfg["merges"] = [
        {"method": "mergealign", "lambda": [0.2, 0.8]},
        {"method": "ties", "parameters": {"density": 0.5}},
        {"method": "mergealign", "lambda": 1.5},
        {"method": "tiess"},
        {"method": "linear", "preset": "sum"},
        {"method": "ties", "parameters": {"density": 2.0}},
    ]
    cfg["generation"] = {"enabled": True, "prompt_sets": [{"name": "no-such-set"}], "max_tokens": 0}
    cfg["execution"] = {"devic": "cpu", "deployments": {"merge": "no-slash"}}
    with pytest.raises(ConfigError) as err:
        parse_config(cfg)
    problems = err.value.problems
    assert err.value.exit_code == 2
    expected = [
        "merges[2].lambda: must be between 0 and 1",
        "merges[3].method: unknown method 'tiess' (did you mean 'ties'?)",
        "merges[4]: preset: only for methods",
        "generation.max_tokens: must be >= 1",
        "generation.prompt_sets[0]: unknown prompt set 'no-such-set'",
        "execution.devic: unknown field (did you mean 'device'?)",
        "execution.deployments.merge: 'no-slash': name a deployment as flow-name/deployment-name",
    ]
    for text in expected:
        assert any(p.startswith(text) for p in problems), (text, problems)
    assert len(problems) == len(expected), problems


def test_engine_validates_method_parameters(tmp_path):
    cfg = _base(tmp_path)
    cfg["merges"] = [
        {"method": "ties", "parameters": {"density": 2.0}},
        {"method": "dare_ties", "parameters": {"x": 1}},
    ]
    with pytest.raises(ConfigError) as err:
        parse_config(cfg)
    assert any(
        p.startswith("merges[0] (ties): parameters.density: must be in (0, 1]") for p in err.value.problems
    )
    assert any(
        p.startswith("merges[1] (dare_ties): parameters.x: unknown parameter") for p in err.value.problems
    )


def test_cross_references_are_checked(tmp_path):
    cfg = _base(tmp_path)
    cfg["merges"] = [{"method": "mergealign", "experts": ["nobody"]}]
    cfg["judges"] = [{"name": "refusal"}]
    with pytest.raises(ConfigError) as err:
        parse_config(cfg)
    assert "merges[0].experts[0]: no expert named 'nobody' (experts: med)" in err.value.problems
    assert "judges: judges need answers; enable `generation`" in err.value.problems


def test_relative_paths_come_from_the_config_folder(tmp_path):
    (tmp_path / "cfgdir").mkdir()
    data = _base(tmp_path)
    data["models"]["base"]["path"] = "../base"
    data["artifact_root"] = "art"
    path = tmp_path / "cfgdir" / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(path)
    assert cfg.models.base.path == str((tmp_path / "base").resolve())  # every path absolute once loaded
    assert cfg.artifact_root == str((tmp_path / "cfgdir" / "art").resolve())
    portable = cfg.portable()
    assert portable["models"]["base"]["path"] == str((tmp_path / "base").resolve())
    assert parse_config(portable).artifact_root == cfg.artifact_root


def test_check_inputs_missing_dir_and_unwritable_root(tmp_path):
    data = _base(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    data["artifact_root"] = str(blocker / "art")
    data["models"]["experts"][0]["path"] = str(tmp_path / "missing")
    with pytest.raises(ConfigError) as err:
        check_inputs(parse_config(data))
    problems = err.value.problems
    assert any(
        p.startswith(f"models.experts[0].path: no such directory {tmp_path / 'missing'}") for p in problems
    )
    assert any(p.startswith("artifact_root: artifact root") and "not writable" in p for p in problems)


def test_cli_validate_exit_code_2_and_run_refuses_before_any_step(tmp_path):
    from cli.main import app

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "Bad Name", "models": {"base": {}}, "merges": [{"method": "mergealign",
                                                                                          "lambda": 3}]}))  # fmt: skip
    # the real command line: exit code 2, every problem printed
    proc = subprocess.run([sys.executable, "-m", "cli", "validate", str(bad)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "5 problem(s)" in proc.stderr
    runner = CliRunner()
    result = runner.invoke(app, ["validate", str(bad)])
    assert isinstance(result.exception, ConfigError) and result.exception.exit_code == 2
    text = str(result.exception)
    assert "name: name 'Bad Name'" in text
    assert "models.base: give exactly one of `path`" in text
    assert "models.aligned: required" in text and "merges[0].lambda: must be between 0 and 1" in text
    result = runner.invoke(app, ["run", str(bad)])
    assert isinstance(result.exception, ConfigError)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nmodels: [unclosed\n")
    result = runner.invoke(app, ["validate", str(broken)])
    assert isinstance(result.exception, ConfigError) and "line 3, column 1: not valid YAML" in str(
        result.exception
    )

    good = _base(tmp_path)
    good["models"]["aligned"] = {"path": str(tmp_path / "base")}
    blocker = tmp_path / "f"
    blocker.write_text("x")
    good["artifact_root"] = str(blocker / "sub")
    cfg = tmp_path / "unwritable.yaml"
    cfg.write_text(yaml.safe_dump(good))
    result = runner.invoke(app, ["run", str(cfg)])
    assert isinstance(result.exception, ConfigError) and "not writable" in str(result.exception)
    assert not (tmp_path / "art").exists()
    result = runner.invoke(app, ["validate", str(cfg)])
    assert result.exit_code == 0 and "med-mergealign-interp-l0.2" in result.output


@pytest.mark.parametrize("name", ["smoke", "llama3-medicine", "llama3-finance", "qwen25-code", "qwen25-math"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.name == name
    assert plan_study(cfg).of_kind("merge")
    if name != "smoke":
        assert cfg.execution.deployments.merge == "merge-flow/gpu"
        assert cfg.generation.backend == "vllm" and any(j.name == "llama-guard-3" for j in cfg.judges)


def test_cli_zoo_tiny_reuses_a_finished_trio(tiny_zoo):
    from cli.main import app

    zoo = tiny_zoo.base.parent
    before = (zoo / "base" / "model.safetensors").stat().st_mtime_ns
    result = CliRunner().invoke(app, ["zoo", "tiny", str(zoo)])
    assert result.exit_code == 0, result.output
    assert f"base={zoo / 'base'}" in result.output
    assert (zoo / "base" / "model.safetensors").stat().st_mtime_ns == before
    import json

    assert json.loads((zoo / "zoo.json").read_text())["size"] == "tiny"
