"""Shared pytest fixtures. Process helpers live in tests/support.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    """A folder for the logs of the processes a test starts (kept by pytest for a failed test)."""
    d = tmp_path / "logs"
    d.mkdir()
    return d
