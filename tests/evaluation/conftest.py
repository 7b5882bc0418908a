"""Fixtures of the evaluation tests: tiny real checkpoints built once per session, small prompt files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The Makefile sets these for `make test`; set them here too so a bare `pytest` stays offline.
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
}.items():
    os.environ.setdefault(_name, _value)

import eval_tiny_models as tiny_models  # noqa: E402  (tests/evaluation is on sys.path in prepend mode)
from evalhelpers import PROMPTS, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-models")


@pytest.fixture(scope="session")
def chat_model(models_dir) -> Path:
    return tiny_models.build_chat_model(models_dir / "chat")


@pytest.fixture(scope="session")
def base_model(models_dir) -> Path:
    """Same architecture, no chat template (a base-style expert)."""
    return tiny_models.build_chat_model(models_dir / "base", chat_template=None, seed=1)


@pytest.fixture(scope="session")
def guard_model(models_dir) -> Path:
    return tiny_models.build_guard_model(models_dir / "guard")


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
