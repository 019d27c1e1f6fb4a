"""Shared fixtures: example assets, one Prefect test harness per session, temporary stores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_CANDIDATES = [REPO / "shared" / "data" / "lyra_examples", REPO.parent / "shared" / "data" / "lyra_examples"]


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    for cand in EXAMPLES_CANDIDATES:
        if cand.is_dir():
            return cand
    pytest.skip("Lyra example assets (shared/data/lyra_examples) not found")


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (each harness costs ~10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
