"""Helpers of the study and flow tests: run-config writers, the environment of subprocesses (`python -m cli`,
prefect workers), the state table of a study run."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def study_config(root: Path, zoo: Any, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": "test-study",
        "artifact_root": str(root / "artifacts"),
        "models": {
            "base": {"path": str(zoo.base)},
            "aligned": {"path": str(zoo.aligned)},
            "experts": [{"name": "tiny", "path": str(zoo.expert)}],
        },
        "merges": [{"method": "mergealign", "preset": "interp", "lambda": [0.3, 0.7]}],
        "analysis": {"similarity": True, "report": False},
        "execution": {"device": "cpu", "max_workers": 2, "retries": 0},
    }
    cfg.update(overrides)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def subprocess_env(api_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=os.environ["PREFECT_HOME"],
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def states(summary: dict[str, Any]) -> dict[tuple[str, str], str]:
    """{(step, label): state name} from a study flow's return value."""
    return {(s["step"], s["label"]): s["state"] for s in summary["steps"]}
