"""Container attribution end to end: real containers, the real exporter process, a scrape of /metrics.

test_containers_docker.py covers the attributor against the engine (cgroup → id → engine lookup, the
daemon going away and coming back). This test covers the rest of the path: ``python -m exporter
--simulate ... --docker on`` is told (simulator event) that processes inside real labelled busybox
containers hold GPU memory, and the scraped series must carry the container's id, name, image,
compose / Kubernetes labels plus the per-container total; a stopped container's series must go.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.attribution.containers import container_id_from_cgroup
from harness.docker_stack import (
    TEST_IMAGE,
    Container,
    docker,
    ensure_engine,
    ensure_test_image,
    running_containers,
)
from harness.support import http_get, http_post_json, scrape, start_exporter, wait_until

pytestmark = [pytest.mark.docker, pytest.mark.slow]

GIB = 1 << 30
HOST = "e2e-node"
COMPOSE_LABELS = {"com.docker.compose.project": "lab", "com.docker.compose.service": "trainer"}
K8S_LABELS = {
    "io.kubernetes.pod.name": "bert-0",
    "io.kubernetes.pod.namespace": "ml",
    "io.kubernetes.container.name": "train",
}
Samples = list[tuple[dict[str, str], float]]


@pytest.fixture
def containers() -> Iterator[tuple[Container, Container]]:
    ensure_engine()
    ensure_test_image()
    with running_containers(COMPOSE_LABELS, K8S_LABELS, name_prefix="gpu-exp-e2e") as (compose, k8s):
        yield compose, k8s


def second_process(container: Container) -> int:
    """Start another process in ``container`` and return its host PID (found through its cgroup)."""
    docker("exec", "-d", container.id, "sleep", "600")

    def find() -> int | None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == container.pid:
                continue
            try:
                cgroup = Path(f"/proc/{entry}/cgroup").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if container_id_from_cgroup(cgroup) == container.id and cmdline.startswith(b"sleep\0"):
                return int(entry)
        return None

    return wait_until(find, timeout=10, interval=0.1, message=f"second process in {container.name}")


def by_pid(metrics: dict[str, Samples], gpu: str = "0") -> dict[int, dict[str, str]]:
    return {
        int(labels["pid"]): labels
        for labels, _ in metrics.get("gpu_process_memory_used_bytes", [])
        if labels.get("gpu") == gpu
    }


def container_totals(metrics: dict[str, Samples], gpu: str = "0") -> dict[str, float]:
    return {
        labels["container_id"]: value
        for labels, value in metrics.get("gpu_container_memory_used_bytes", [])
        if labels.get("gpu") == gpu
    }


def event(base: str, body: dict[str, object]) -> None:
    status, text = http_post_json(f"{base}/-/simulate/events", body)
    assert status == 200, f"simulator refused {body}: {status} {text}"


def test_container_labels_through_the_exporter(
    containers: tuple[Container, Container], log_dir: Path
) -> None:
    compose, k8s = containers
    extra_pid = second_process(compose)
    exporter, base = start_exporter(
        log_dir, "--simulate", "healthy-8gpu", "--interval", "0.2", "--host-label", HOST, "--docker", "on"
    )
    try:
        for pid, size in ((compose.pid, "4GiB"), (extra_pid, "2GiB"), (k8s.pid, "3GiB")):
            event(base, {"gpu": 0, "add_process": {"pid": pid, "type": "compute", "used_memory_bytes": size}})

        def attributed() -> dict[str, Samples] | None:
            m = scrape(base)
            procs = by_pid(m)
            ready = all(procs.get(p, {}).get("container_id") for p in (compose.pid, extra_pid, k8s.pid))
            return m if ready else None

        metrics = wait_until(attributed, timeout=20, interval=0.2, message="container labels on /metrics")
        procs = by_pid(metrics)
        for pid in (compose.pid, extra_pid):
            labels = procs[pid]
            assert labels["container_id"] == compose.id, labels
            assert labels["container_name"] == compose.name, labels
            assert labels["container_image"] == TEST_IMAGE, labels
            assert labels["compose_service"] == "trainer", labels
            assert labels["k8s_pod"] == "" and labels["k8s_namespace"] == "", labels
            assert labels["host"] == HOST, labels
        k8s_labels = procs[k8s.pid]
        assert (k8s_labels["container_id"], k8s_labels["container_name"]) == (k8s.id, k8s.name), k8s_labels
        assert (k8s_labels["k8s_namespace"], k8s_labels["k8s_pod"]) == ("ml", "bert-0"), k8s_labels
        assert k8s_labels["compose_service"] == "", k8s_labels
        # The scenario's own process (PID 4242 on every GPU) is not in one of our containers.
        assert procs[4242]["container_id"] not in (compose.id, k8s.id)
        # Per-container total: the sum over the container's processes on that GPU.
        totals = container_totals(metrics)
        assert totals[compose.id] == 6 * GIB, totals
        assert totals[k8s.id] == 3 * GIB, totals
        assert compose.id not in container_totals(metrics, gpu="1")
        assert metrics["gpu_exporter_docker_up"] == [({"host": HOST}, 1.0)]

        # The container stops while NVML (here: the simulator) still lists its PIDs: they lose their
        # container labels, and the container's total goes, at once (no stale cache entry).
        docker("rm", "-f", compose.id, timeout=30)

        def detached() -> dict[str, Samples] | None:
            m = scrape(base)
            return m if compose.id not in container_totals(m) else None

        metrics = wait_until(detached, timeout=20, interval=0.2, message="stopped container's total dropped")
        assert all(labels["container_id"] != compose.id for labels in by_pid(metrics).values())

        # NVML stops listing them: their series drop; the other container is untouched.
        for pid in (compose.pid, extra_pid):
            event(base, {"gpu": 0, "remove_process": pid})

        def dropped() -> dict[str, Samples] | None:
            m = scrape(base)
            return m if not {compose.pid, extra_pid} & set(by_pid(m)) else None

        metrics = wait_until(dropped, timeout=20, interval=0.2, message="stopped container's series dropped")
        assert by_pid(metrics)[k8s.pid]["container_id"] == k8s.id
        assert container_totals(metrics) == {k8s.id: 3 * GIB}
        assert http_get(f"{base}/healthz")[0] == 200
        assert exporter.alive(), exporter.log()[-3000:]
        errors = [line for line in exporter.log().splitlines() if "Traceback" in line]
        assert not errors, exporter.log()[-3000:]
    finally:
        exporter.stop()
