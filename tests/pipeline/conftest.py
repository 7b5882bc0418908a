"""Fixtures of the pipeline tests: one Prefect test harness per session (started only by tests that ask for
it), tiny model zoos built once, run-config writers, and the environment for subprocesses.

Prefect state never goes to ~/.prefect: PREFECT_HOME points into a temporary folder, and the flows keep their
cache records and locks under each test's artifact root.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

import pytest

_HOME = tempfile.mkdtemp(prefix="mergealign-prefect-home-")
atexit.register(shutil.rmtree, _HOME, True)
os.environ["PREFECT_HOME"] = _HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def prefect_api() -> Any:
    """A real Prefect API (SQLite, temporary) for the whole session; yields its URL."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # Prefect may have been imported (and its settings read) before this file set PREFECT_HOME.
    with temporary_settings({PREFECT_HOME: _HOME}), prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
