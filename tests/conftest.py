"""Shared pytest fixtures. Process helpers live in the harness package (harness/support.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """A folder for the logs of the processes a test starts (kept by pytest for a failed test)."""
    d = tmp_path / "logs"
    d.mkdir()
    return d
