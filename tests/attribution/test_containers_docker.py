"""Container attribution against the real Docker engine (dockerd on this machine).

Real containers from a locally imported busybox image run ``sleep``; their host PIDs stand in for GPU
processes. The engine "going away" is a socket proxy being removed: the containers keep running, and
the attributor sees what it would see if the daemon died.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.attribution.containers import ContainerAttributor, build_attributor
from exporter.attribution.docker import DockerEngine
from exporter.collectors.docker import DockerCollector
from exporter.snapshot import ContainerInfo, GpuProcess, GpuSample, NodeSnapshot
from harness.docker_stack import (
    Container,
    docker,
    ensure_engine,
    ensure_test_image,
    running_containers,
    socket_proxy,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

COMPOSE_LABELS = {
    "com.docker.compose.project": "lab",
    "com.docker.compose.service": "trainer",
    "unrelated.label": "dropped",
}
K8S_LABELS = {
    "io.kubernetes.pod.name": "bert-0",
    "io.kubernetes.pod.namespace": "ml",
    "io.kubernetes.container.name": "train",
}


@pytest.fixture(scope="module")
def engine_ready() -> str:
    ensure_engine()
    return ensure_test_image()


@pytest.fixture
def two_containers(engine_ready: str) -> Iterator[tuple[Container, Container]]:
    with running_containers(COMPOSE_LABELS, K8S_LABELS) as (compose, k8s):
        yield compose, k8s


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """unix socket paths must stay under ~100 bytes, which pytest's tmp_path may exceed."""
    d = Path(tempfile.mkdtemp(prefix="gx-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def snapshot_of(*pids: int) -> NodeSnapshot:
    procs = tuple(GpuProcess(pid=p, process_type="compute", used_memory_bytes=2 << 30) for p in pids)
    return NodeSnapshot(
        host="h", timestamp_seconds=0.0, nvml_up=True, gpus=(GpuSample(index=0, uuid="GPU-0", processes=procs),)
    )


def by_pid(snap: NodeSnapshot) -> dict[int, ContainerInfo | None]:
    return {p.pid: p.container for g in snap.gpus for p in g.processes}


def docker_metrics(att: ContainerAttributor) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in DockerCollector(att.stats, host="h").collect():
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def test_real_containers_are_attributed(two_containers: tuple[Container, Container]) -> None:
    compose, k8s = two_containers
    att = build_attributor("auto")  # the default socket exists: auto turns attribution on
    assert att is not None
    got = by_pid(att(snapshot_of(compose.pid, k8s.pid, 1)))
    assert got[compose.pid] == ContainerInfo(
        id=compose.id,
        name=compose.name,
        image="gpu-exporter-test/busybox:latest",
        labels={"com.docker.compose.project": "lab", "com.docker.compose.service": "trainer"},
    )
    assert got[k8s.pid] == ContainerInfo(
        id=k8s.id, name=k8s.name, image="gpu-exporter-test/busybox:latest", labels=K8S_LABELS
    )
    assert got[1] is None  # PID 1 of this machine is not in a container
    assert docker_metrics(att)["gpu_exporter_docker_up"] == [({"host": "h"}, 1.0)]
    att.close()


def test_stopped_container_loses_attribution(two_containers: tuple[Container, Container]) -> None:
    compose, _ = two_containers
    att = ContainerAttributor(engine=DockerEngine())
    assert by_pid(att(snapshot_of(compose.pid)))[compose.pid] is not None
    docker("rm", "-f", compose.id)
    # The PID is gone (or, if the kernel reused it, belongs to a host process): no container labels.
    assert by_pid(att(snapshot_of(compose.pid)))[compose.pid] is None
    att.close()


def test_daemon_goes_away_and_comes_back(
    two_containers: tuple[Container, Container], short_dir: Path
) -> None:
    compose, k8s = two_containers
    with socket_proxy(short_dir / "docker.sock") as proxy:
        att = ContainerAttributor(engine=DockerEngine(proxy.url, timeout_seconds=2), retry_seconds=0.0)
        assert by_pid(att(snapshot_of(compose.pid)))[compose.pid].name == compose.name  # type: ignore[union-attr]

        proxy.stop()
        got = by_pid(att(snapshot_of(compose.pid, k8s.pid)))
        # Known container: the last answer is kept; new one: the id alone, from the cgroup.
        assert got[compose.pid] is not None and got[compose.pid].name == compose.name  # type: ignore[union-attr]
        assert got[k8s.pid] == ContainerInfo(id=k8s.id, name="", image="")
        metrics = docker_metrics(att)
        assert metrics["gpu_exporter_docker_up"] == [({"host": "h"}, 0.0)]
        errors = {labels["kind"]: value for labels, value in metrics["gpu_exporter_docker_errors_total"]}
        assert errors.get("unavailable", 0) >= 1, errors

        proxy.start()
        got = by_pid(att(snapshot_of(compose.pid, k8s.pid)))
        assert got[k8s.pid] is not None and got[k8s.pid].labels == K8S_LABELS  # type: ignore[union-attr]
        assert docker_metrics(att)["gpu_exporter_docker_up"] == [({"host": "h"}, 1.0)]
        att.close()
