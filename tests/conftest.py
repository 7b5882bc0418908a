"""Test-wide settings (offline, no telemetry, a temporary PREFECT_HOME) and the fixtures several folders
share: tiny model zoos, tiny chat / guard models and a prompt file, each built once per session and only when a
test asks for it. Prefect's harness lives in tests/flows/conftest.py only, so core tests do not pay for a
Prefect server."""

import atexit
import os
import shutil
import tempfile

# The Makefile sets these for `make test`; set them here too so a bare `pytest` stays offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Prefect state never goes to ~/.prefect, whichever folder runs (importing prefect creates its home).
_PREFECT_HOME = tempfile.mkdtemp(prefix="mergealign-prefect-home-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory: pytest.TempPathFactory):
    from mergealign.zoo_tiny import build_tiny_zoo

    return build_tiny_zoo(tmp_path_factory.mktemp("zoo") / "tiny")


@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory: pytest.TempPathFactory):
    """~17M parameters: a merge of it lasts a few seconds, long enough to kill it mid-way."""
    from mergealign.zoo_tiny import build_tiny_zoo

    return build_tiny_zoo(tmp_path_factory.mktemp("zoo") / "small", size="small")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eval-models")


@pytest.fixture(scope="session")
def chat_model(models_dir: Path) -> Path:
    from tests.helpers.models import build_chat_model

    return build_chat_model(models_dir / "chat")


@pytest.fixture(scope="session")
def base_model(models_dir: Path) -> Path:
    """Same architecture, no chat template (a base-style expert)."""
    from tests.helpers.models import build_chat_model

    return build_chat_model(models_dir / "base", chat_template=None, seed=1)


@pytest.fixture(scope="session")
def guard_model(models_dir: Path) -> Path:
    from tests.helpers.models import build_guard_model

    return build_guard_model(models_dir / "guard")


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    from tests.helpers.evaluation import PROMPTS, write_jsonl

    return write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
