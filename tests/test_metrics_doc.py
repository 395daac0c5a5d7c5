"""docs/metrics.md lists every metric family the exporter emits, and every family it lists is emitted.

The real exporter (``python -m exporter --simulate``) runs the scenarios that between them reach every
NVML family (MIG, NVLink faults, an old card with retired pages, a card with a fan), with a kubelet
stand-in allocating a GPU, a /proc whose GPU process sits in a Docker cgroup, an unreachable Docker
engine, an XID, and a training push that carries every section (phase, exit, per-service entries) from
a process on a simulated GPU. Family names of the union of their /metrics are compared with the doc's
tables both ways.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter.hook.schema import INGEST_PATH
from harness.kubelet import Container, KubeletStandIn, Pod
from harness.payloads import largest_push
from harness.process import post_event, request
from harness.procfs import fake_proc_root
from harness.support import ManagedProcess, documented_metric_names, start_exporter, wait_until

# mig-h100: MIG instances and their GPM; nvlink-fault: link errors; legacy-card: retired pages;
# mixed-fleet: a card with a fan.
SCENARIOS = ("mig-h100", "nvlink-fault", "legacy-card", "mixed-fleet")

pytestmark = pytest.mark.slow  # four exporters and a kubelet stand-in, ≈10 s


@pytest.fixture(scope="module")
def exporters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    tmp = tmp_path_factory.mktemp("metrics-doc")
    pid = os.getpid()  # the "GPU process" and the training process: this test itself
    own_ns = os.stat("/proc/self/ns/pid").st_ino
    proc_root = fake_proc_root(
        tmp / "proc", own_namespace=own_ns, namespaces={pid: (own_ns, pid)},
        cgroups={pid: "0::/system.slice/docker-" + "a" * 64 + ".scope\n"},
    )
    socket = tmp / "kubelet" / "kubelet.sock"
    pods = [Pod("team-a", "trainer-0", [Container("main", dra=[("gpu", "gpu.nvidia.com", "pool", "gpu-0", [])])])]
    started: list[ManagedProcess] = []
    with KubeletStandIn(socket, pods):
        try:
            bases = []
            for scenario in SCENARIOS:
                proc, base = start_exporter(
                    tmp, "--simulate", scenario, "--interval", "0.2", "--proc-root", str(proc_root),
                    "--kubelet", "on", "--kubelet-socket", str(socket),
                    "--docker", "on", "--docker-host", f"unix://{tmp / 'no-docker.sock'}",
                    name=f"exporter-{scenario}",
                )
                started.append(proc)
                bases.append(base)
            for base in bases:
                assert post_event(base, {"gpu": 0, "add_process": {
                    "pid": pid, "type": "compute", "used_memory_bytes": "2GiB"}}) == 200
                assert post_event(base, {"gpu": 0, "xid": 13}) == 200
                push = json.dumps(largest_push(pid, services=2)).encode()
                status, body = request(base, "POST", INGEST_PATH, push, headers={"Content-Type": "application/json"})
                assert status == 202, body
            yield bases
        finally:
            for proc in started:
                proc.stop()


def emitted_families(bases: list[str]) -> set[str]:
    names: set[str] = set()
    for base in bases:
        status, body = request(base, "GET", "/metrics")
        assert status == 200
        # The text parser names a counter family without its _total; the doc names the sample.
        names |= {f.name + ("_total" if f.type == "counter" else "") for f in text_string_to_metric_families(body.decode())}
    return names


def test_every_documented_family_is_emitted_and_every_emitted_one_documented(exporters: list[str]) -> None:
    documented = documented_metric_names()
    emitted: set[str] = set()

    def all_documented_seen() -> bool:
        nonlocal emitted
        emitted = emitted_families(exporters)
        return emitted >= documented

    # Families appear over a few polls (GPM needs two samples, the training join a poll after the push).
    with contextlib.suppress(AssertionError):
        wait_until(all_documented_seen, timeout=60, message="every family of docs/metrics.md emitted")
    assert documented - emitted == set(), f"in docs/metrics.md but never on /metrics of {SCENARIOS}"
    assert emitted - documented == set(), "on /metrics but missing from docs/metrics.md"
