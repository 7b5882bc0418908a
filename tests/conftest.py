"""Test-wide settings: offline, no telemetry. Prefect's harness lives in tests/pipeline/conftest.py only,
so core tests do not pay for a Prefect server."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

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
