"""Shared pytest fixtures. Process helpers live in the harness package (harness/support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.security import make_pki


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """A folder for the logs of the processes a test starts (kept by pytest for a failed test)."""
    d = tmp_path / "logs"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    return make_pki(tmp_path_factory.mktemp("pki"))
