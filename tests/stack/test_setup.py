"""scripts/setup.sh on the machines it cannot set up: it stops with one line naming what is missing and
how to install it by hand, and a failing step names itself. The whole install on a fresh Debian 12 is
tests/stack/test_fresh_debian.py.

These put a stand-in `dpkg-query` (every package missing) and `apt-get` (failing) first on PATH: the
refusals happen before anything is installed, so nothing on this machine changes."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.support import REPO_ROOT

SETUP = REPO_ROOT / "scripts" / "setup.sh"
SYSTEM_PYTHON = "/usr/bin/python3"  # the distribution's, runnable by any user (pyenv's may live in /root)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A copy of scripts/setup.sh in a folder every user can read (for the unprivileged run)."""
    path = Path(tempfile.mkdtemp(prefix="gpu-exporter-setup-test-"))
    try:
        path.chmod(0o755)
        (path / "scripts").mkdir(mode=0o755)
        shutil.copy2(SETUP, path / "scripts" / "setup.sh")
        yield path
    finally:
        shutil.rmtree(path)


def _bin(folder: Path, name: str, body: str) -> None:
    tool = folder / name
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_unsupported_system_stops_with_one_line(tmp_path: Path) -> None:
    os_release = tmp_path / "os-release"
    os_release.write_text('NAME="Fedora Linux"\nID=fedora\nVERSION_ID="40"\n')
    result = subprocess.run(["bash", str(SETUP)], env={**os.environ, "SETUP_OS_RELEASE": str(os_release)},
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    line = _one_line(result.stderr)
    assert "unsupported system 'fedora 40'" in line and "Debian 12, Ubuntu 22.04, Ubuntu 24.04" in line, line
    assert "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e .[" in line, line


def test_without_root_or_sudo_names_the_packages_to_install_by_hand(shared_dir: Path) -> None:
    assert Path(SYSTEM_PYTHON).exists(), "the distribution's python3 is part of every supported system"
    tools = shared_dir / "bin"
    tools.mkdir(mode=0o755)
    for name in ("dirname", "grep", "id"):  # what setup.sh runs before it needs root; no sudo among them
        (tools / name).symlink_to(shutil.which(name) or name)
    _bin(tools, "dpkg-query", "exit 1")
    result = subprocess.run(
        ["/bin/bash", str(shared_dir / "scripts" / "setup.sh")],
        env={"PATH": str(tools), "PYTHON": SYSTEM_PYTHON, "HOME": "/"}, user=65534, group=65534,
        extra_groups=[], capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    line = _one_line(result.stderr)
    assert line.startswith("setup: needs root or sudo to install prometheus prometheus-alertmanager "), line
    assert "(as root: apt-get install --no-install-recommends prometheus " in line and "docker.io" in line, line


def test_a_failing_step_names_itself(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "runs as root (as CI does): the apt step is reached only with root or sudo"
    _bin(tmp_path, "dpkg-query", "exit 1")
    _bin(tmp_path, "apt-get", 'echo "E: the mirror is unreachable" >&2; exit 100')
    policy_before = Path("/usr/sbin/policy-rc.d").exists()
    result = subprocess.run(
        ["bash", str(SETUP)], env={**os.environ, "PATH": f"{tmp_path}:/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 100, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == "setup: FAILED at step 'install Debian packages' (exit status 100)"
    assert "E: the mirror is unreachable" in result.stderr
    # Its own policy-rc.d (written only where none was) is gone again; one that was there stays.
    assert Path("/usr/sbin/policy-rc.d").exists() == policy_before
