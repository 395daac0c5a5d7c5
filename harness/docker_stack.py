"""Helpers for tests against the real Docker engine: make sure it runs, build a tiny image from the
local busybox (no registry is reachable), start labelled containers, and a socket proxy that can be
taken away and brought back to play "the daemon went away" without killing the containers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.support import REPO_ROOT

TEST_IMAGE = "gpu-exporter-test/busybox:latest"
TEST_LABEL = "gpu-exporter-test"
DOCKER_SOCKET = "/var/run/docker.sock"


def docker(*args: str, timeout: float = 60, stdin: bytes | None = None) -> str:
    """Run the docker CLI; raise with its stderr on failure."""
    proc = subprocess.run(
        ["docker", *args], input=stdin, capture_output=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc.stdout.decode()


def ensure_engine() -> None:
    """The engine must answer. Try scripts/start-dockerd.sh once; otherwise fail loudly (never skip:
    a CI run without the engine would otherwise report attribution as tested when it was not)."""
    if shutil.which("docker") is None:
        raise AssertionError("docker CLI missing: scripts/setup.sh installs docker.io")
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False).returncode == 0:
        return
    start = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "start-dockerd.sh")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    if start.returncode != 0:
        raise AssertionError(
            "the Docker engine is not running and scripts/start-dockerd.sh could not start it "
            f"(these tests need a real dockerd, as root):\n{start.stdout}\n{start.stderr}"
        )


def ensure_test_image() -> str:
    """``gpu-exporter-test/busybox``: busybox-static as the whole root filesystem, via ``docker import``."""
    probe = subprocess.run(["docker", "image", "inspect", TEST_IMAGE], capture_output=True, check=False)
    if probe.returncode == 0:
        return TEST_IMAGE
    busybox = shutil.which("busybox")
    if busybox is None:
        raise AssertionError("busybox missing: scripts/setup.sh installs busybox-static")
    with tempfile.TemporaryDirectory() as root:
        bin_dir = Path(root) / "bin"
        bin_dir.mkdir()
        shutil.copy2(busybox, bin_dir / "busybox")
        for applet in ("sh", "sleep", "cat", "ls"):
            (bin_dir / applet).symlink_to("busybox")
        tar = subprocess.run(["tar", "-C", root, "-c", "."], capture_output=True, check=True)
    docker("import", "-", TEST_IMAGE, stdin=tar.stdout)
    return TEST_IMAGE


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    pid: int


def run_container(labels: dict[str, str], name_prefix: str = "gpu-exp-test") -> Container:
    """A labelled container running ``sleep`` (bounded: it ends on its own after 10 minutes)."""
    name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
    args = ["run", "-d", "--network", "host", "--name", name, "--label", f"{TEST_LABEL}=1"]
    for key, value in labels.items():
        args += ["--label", f"{key}={value}"]
    cid = docker(*args, TEST_IMAGE, "sleep", "600").strip()
    state = json.loads(docker("inspect", "-f", "{{json .State}}", cid))
    if not state.get("Running") or not state.get("Pid"):
        raise AssertionError(f"container {name} is not running: {state}")
    return Container(id=cid, name=name, pid=int(state["Pid"]))


def remove_container(container: Container) -> None:
    with contextlib.suppress(Exception):
        docker("rm", "-f", container.id, timeout=30)


@contextlib.contextmanager
def running_containers(*label_sets: dict[str, str], name_prefix: str = "gpu-exp-test") -> Iterator[list[Container]]:
    """One labelled container per label set; all of them removed afterwards, also when a start fails."""
    started: list[Container] = []
    try:
        for labels in label_sets:
            started.append(run_container(labels, name_prefix=name_prefix))
        yield started
    finally:
        for container in started:
            remove_container(container)


class SocketProxy:
    """A unix socket at ``path`` forwarding to the engine's socket, which ``stop()`` takes away (the
    exporter then sees exactly what a dead daemon looks like) and ``start()`` brings back."""

    def __init__(self, path: Path, target: str = DOCKER_SOCKET) -> None:
        self.path = path
        self.target = target
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(self.path))
        server.listen(16)
        self._server = server
        thread = threading.Thread(target=self._accept, args=(server,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = [t for t in self._threads if t.is_alive()]

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                t.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def socket_proxy(path: Path) -> Iterator[SocketProxy]:
    proxy = SocketProxy(path)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
