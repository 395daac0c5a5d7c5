"""The README's two commands on a fresh Debian 12 machine, as a new user runs them.

A Debian 12 root filesystem (debootstrap minbase + python3, ca-certificates, git: nothing of ours),
imported into the local Docker engine, runs a clean clone of this repository's HEAD (uncommitted
changes are not part of it) through tests/stack/fresh_debian_steps.sh: `bash scripts/demo.sh` (the page must
arrive, and nothing may be left running or in /tmp), then `bash scripts/test.sh` on the tests marked
neither slow nor docker. Each step's time is printed.

What the container cannot do, and why that is fine: it shares the host's network (loopback ports,
the Debian and PyPI mirrors) but is not privileged, so a dockerd of its own would run crippled (no
bridge, no iptables, vfs) and unreliably. It gets the host's engine instead (the socket mounted), so
setup.sh finds an engine running, as on a machine whose Docker is up. The tests marked docker are left
out there (they need the containers' processes in their PID namespace): they run on the host in the
same CI run. The machine's pip configuration (index and find-links folders with the CPU torch
wheel, certificate, constraints) belongs to the machine, not the project: it is passed in as PIP_*
variables with its local paths mounted read-only under /run/host-pip.

The root filesystem is cached as a tarball under .cache/fresh-debian/ (ignored by git) and as a
Docker image; delete both to build afresh. FRESH_DEBIAN_MIRROR overrides the Debian mirror (default:
the one this machine's apt uses).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from harness.docker_stack import DOCKER_SOCKET, docker, ensure_engine
from harness.support import REPO_ROOT, free_port

# Measured on 2 busy cores: root filesystem ~1.5 min (once; cached after), demo ~3.5 min, checks ~4 min.
# Bounded: debootstrap 10 min, the container 15 min.
pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(1700)]

SUITE = "bookworm"
PACKAGES = "python3,ca-certificates,git"
CACHE = REPO_ROOT / ".cache" / "fresh-debian"
HOST_PIP = "/run/host-pip"
STEPS = Path(__file__).with_name("fresh_debian_steps.sh")
RUN_TIMEOUT_S = 900
# Inside the container: docker needs an engine it cannot start; slow ones are the host run's.
MARKERS = "not slow and not docker"


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses for the main archive (deb822 or one-line format)."""
    if os.environ.get("FRESH_DEBIAN_MIRROR"):
        return os.environ["FRESH_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file() or path.suffix not in (".list", ".sources"):
            continue
        text = path.read_text()
        for stanza in re.split(r"\n\s*\n", text):  # deb822: URIs + Suites in one stanza
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split():
                return uris.group(1)
        for line in text.splitlines():  # deb [options] URI SUITE COMPONENTS
            m = re.match(r"\s*deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m and m.group(2) == SUITE:
                return m.group(1)
    return "http://deb.debian.org/debian"


def rootfs_image(mirror: str) -> str:
    """A Docker image of a fresh Debian 12 minbase (+ PACKAGES); built once, cached on disk and in Docker."""
    key = hashlib.sha256(f"{SUITE} {PACKAGES} {mirror}".encode()).hexdigest()[:12]
    image = f"gpu-exporter-test/fresh-debian:{SUITE}-{key}"
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True, check=False).returncode == 0:
        return image
    tarball = CACHE / f"{SUITE}-{key}.tar"
    if not tarball.exists():
        assert shutil.which("debootstrap"), "debootstrap missing: scripts/setup.sh installs it"
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            root = Path(tmp) / "root"
            proc = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(root), mirror],
                capture_output=True, text=True, timeout=600, check=False,
            )
            assert proc.returncode == 0, f"debootstrap failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            # As a Debian 12 install lists them: the release, its updates and the security archive.
            security = mirror.rstrip("/") + "-security" if mirror.rstrip("/").endswith("/debian") else mirror
            (root / "etc/apt/sources.list").write_text(
                f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n"
                f"deb {security} {SUITE}-security main\n"
            )
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for f in (root / junk).glob("*"):
                    if f.is_file():
                        f.unlink()
            partial = tarball.with_suffix(".partial")
            subprocess.run(["tar", "-C", str(root), "-cf", str(partial), "."], check=True, timeout=600)
            partial.rename(tarball)
    docker("import", "-c", 'CMD ["/bin/bash"]', str(tarball), image, timeout=600)
    return image


def host_pip_config() -> tuple[dict[str, str], list[str]]:
    """This machine's pip settings as PIP_* variables for the container, and the read-only mounts of the
    local paths they name (moved under /run/host-pip; an index's `simple/` folder brings its parent,
    where PEP 503 trees keep the files its pages link to)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    env: dict[str, str] = {}
    mounts: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"^[^.]*\.([a-z0-9-]+)='(.*)'$", line)
        if not m:
            continue
        values = []
        for value in m.group(2).split():
            local = value.removeprefix("file://")
            if local.startswith("/") and Path(local).exists():
                path = Path(local)
                top = path.parent if path.name == "simple" else path
                mounts[str(top)] = HOST_PIP + str(top)
                value = value.replace(local, HOST_PIP + local)
            values.append(value)
        env["PIP_" + m.group(1).upper().replace("-", "_")] = " ".join(values)
    volumes = [f"{src}:{dst}:ro" for src, dst in sorted(mounts.items())]
    return env, volumes


def test_readme_commands_on_a_fresh_debian_12(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ensure_engine()
    timings: list[str] = []
    started = time.monotonic()
    mirror = debian_mirror()
    image = rootfs_image(mirror)
    timings.append(f"root filesystem image {image} ready: {time.monotonic() - started:.1f} s (mirror {mirror})")

    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                            capture_output=True, text=True, check=True).stdout.strip()
    bundle = tmp_path / "repo.bundle"
    subprocess.run(["git", "-C", str(REPO_ROOT), "bundle", "create", "-q", str(bundle), "HEAD"],
                   check=True, timeout=120)
    pip_env, volumes = host_pip_config()
    ports = {f"DEMO_{name}_PORT": str(free_port()) for name in ("EXPORTER", "PROMETHEUS", "ALERTMANAGER", "WEBHOOK")}
    name = f"gpu-exporter-fresh-{uuid.uuid4().hex[:8]}"
    argv = ["docker", "run", "--rm", "--name", name, "--network", "host",
            "-v", f"{bundle}:/src/repo.bundle:ro", "-v", f"{STEPS}:/src/steps.sh:ro",
            "-v", f"{DOCKER_SOCKET}:/var/run/docker.sock"]
    for volume in volumes:
        argv += ["-v", volume]
    for key, value in {**pip_env, **ports}.items():
        argv += ["-e", f"{key}={value}"]
    argv += [image, "bash", "/src/steps.sh", "/src/repo.bundle", commit, MARKERS]
    log = tmp_path / "fresh-debian.log"
    try:
        with log.open("w") as out:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S, check=False)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60, check=False)
    text = log.read_text(errors="replace")
    for line in text.splitlines():  # each step, and inside them setup.sh's and pytest's own totals
        if line.startswith("### step ") and not line.endswith(": start"):
            timings.append(line.removeprefix("### step "))
        elif line.startswith("setup: done in") or re.match(r"=+ \d+ (passed|failed).* in [\d.]+s", line):
            timings.append("  " + line.strip("= "))
    with capsys.disabled():
        print("\nfresh Debian 12 container, step times:\n  " + "\n  ".join(timings), flush=True)

    # The machine's pip configuration makes pip warn about every project an index lacks: not ours.
    tail = "\n".join(line for line in text.splitlines() if not line.startswith("WARNING: Location"))[-12000:]
    assert proc.returncode == 0 and "### all steps passed" in text, tail
    # The README's first command delivered the page and cleaned up (tests/test_demo.py also waits
    # for the resolved notification).
    assert "/page FIRING GpuLost severity=critical" in text, tail
    assert "demo: stopped everything and removed" in text, tail
    assert "leftover processes: none" in text and "leftover in /tmp: none" in text, tail
    # The second command ran the tests, and they passed (pytest's summary line).
    assert re.search(r"=+ \d+ passed", text), tail
