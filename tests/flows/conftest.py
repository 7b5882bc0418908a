"""The Prefect harness of the flow tests: one real Prefect API per session, started only by tests that ask
for it (`prefect_api`); no test outside tests/flows/ needs one.

Prefect state never goes to ~/.prefect: tests/conftest.py points PREFECT_HOME into a temporary folder for the
whole session (tests/tasks/ import prefect too), and the flows keep their cache records and locks under each
test's artifact root.
"""

from __future__ import annotations

import os
from typing import Any

import pytest


@pytest.fixture(scope="session")
def prefect_api() -> Any:
    """A real Prefect API (SQLite, temporary) for the whole session; yields its URL."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    # Prefect may have been imported (and its settings read) before tests/conftest.py set PREFECT_HOME.
    home = os.environ["PREFECT_HOME"]
    with temporary_settings({PREFECT_HOME: home}), prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
