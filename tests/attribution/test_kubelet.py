"""Kubernetes names from the kubelet's PodResources API, against a stand-in serving the kubelet's own .proto.

What is real: the gRPC client, the wire protocol, the unix socket, the generated modules, the failure
paths (missing socket, a socket the exporter may not open, gRPC errors, a restart). What is not: the
kubelet itself (see README, "Kubernetes attribution").
"""

from __future__ import annotations

import dataclasses
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from exporter.attribution.engine import AttributionEngine
from exporter.attribution.kubelet import (
    KubeletSource,
    PodResourcesClient,
    allocations_from_list,
    build_kubelet_source,
    gpu_uuid_of,
)
from exporter.attribution.kubelet_api import generate
from exporter.collectors.attribution import AttributionCollector
from exporter.snapshot import GpuAllocation, GpuProcess, GpuSample, MigInstance, NodeSnapshot
from harness.kubelet import Container, KubeletStandIn, Pod

GPU0, GPU1, GPU2, GPU3 = (f"GPU-{i}aaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee" for i in range(4))
MIG_NEW = "MIG-5f2e6b44-1111-2222-3333-444444444444"
IDX = {3: GPU3}  # GPU index -> UUID, for the DRA device named by index


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="kpr-", dir="/tmp") as d:
        yield Path(d)


def pods() -> list[Pod]:
    return [
        Pod("ml", "bert-0", [Container("train", {"nvidia.com/gpu": [GPU0, GPU1]}), Container("logger")]),
        Pod("ml", "shared-1", [Container("a", {"nvidia.com/gpu": [f"{GPU2}::0"]})]),
        Pod("ml", "shared-2", [Container("b", {"nvidia.com/gpu": [f"{GPU2}::1"]})]),
        Pod("infer", "mig-0", [Container("srv", {"nvidia.com/mig-1g.10gb": [MIG_NEW, f"MIG-{GPU3}/1/0"]})]),
        Pod("dra", "claim-0", [Container("c", dra=[("gpu", "gpu.nvidia.com", "node-a", "gpu-3", [])])]),
        Pod("kube-system", "cni", [Container("cni", {"example.com/nic": ["eth1"]})]),
    ]


def test_generated_modules_match_the_vendored_proto(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    for path in written:
        committed = generate.REPO_ROOT / path.relative_to(tmp_path)
        assert filecmp.cmp(path, committed, shallow=False), f"{committed} is stale: run the generator"


def test_device_ids() -> None:
    assert gpu_uuid_of(GPU0) == GPU0
    assert gpu_uuid_of(f"{GPU0}::3") == GPU0  # time-slicing replica
    assert gpu_uuid_of(MIG_NEW) == MIG_NEW
    assert gpu_uuid_of(f"MIG-{GPU3}/1/0") == f"MIG-{GPU3}/1/0"
    assert gpu_uuid_of(f"k8s.gpu.nvidia.com/device={GPU1}") == GPU1  # a CDI name
    assert gpu_uuid_of("eth1") is None and gpu_uuid_of("") is None


def test_list_through_the_socket(sock_dir: Path) -> None:
    with KubeletStandIn(sock_dir / "kubelet.sock", pods()) as kubelet:
        client = PodResourcesClient(kubelet.socket_path)
        try:
            found = allocations_from_list(client.list(), {3: GPU3})
        finally:
            client.close()
    holders = {(a.uuid, a.k8s_namespace, a.k8s_pod, a.k8s_container) for a in found}
    assert holders == {
        (GPU0, "ml", "bert-0", "train"),
        (GPU1, "ml", "bert-0", "train"),
        (GPU2, "ml", "shared-1", "a"),
        (GPU2, "ml", "shared-2", "b"),
        (MIG_NEW, "infer", "mig-0", "srv"),
        (f"MIG-{GPU3}/1/0", "infer", "mig-0", "srv"),
        (GPU3, "dra", "claim-0", "c"),  # DRA device "gpu-3" of gpu.nvidia.com, by index
    }
    assert {a.resource for a in found} == {"nvidia.com/gpu", "nvidia.com/mig-1g.10gb", "gpu.nvidia.com"}


def engine_snapshot(processes: dict[int, list[int]] | None = None) -> NodeSnapshot:
    procs = processes or {}
    return NodeSnapshot(
        host="node-a", timestamp_seconds=0.0, nvml_up=True,
        gpus=tuple(
            GpuSample(index=i, uuid=u, up=True, processes=tuple(
                GpuProcess(pid=p, process_type="compute", used_memory_bytes=1 << 30) for p in procs.get(i, [])
            ))
            for i, u in enumerate((GPU0, GPU1, GPU2, GPU3))
        ),
    )


def metrics(engine: AttributionEngine, snapshot: NodeSnapshot) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in AttributionCollector(lambda: snapshot, engine.stats, "node-a").collect():
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def test_allocation_info_per_gpu_including_gpus_without_processes(sock_dir: Path) -> None:
    with KubeletStandIn(sock_dir / "kubelet.sock", pods()) as kubelet:
        engine = AttributionEngine(proc_root=sock_dir, kubelet=KubeletSource(PodResourcesClient(kubelet.socket_path)))
        out = engine(engine_snapshot())
        m = metrics(engine, out)
        engine.close()
    info = {(s["gpu"], s["uuid"], s["k8s_namespace"], s["k8s_pod"], s["k8s_container"]) for s, _ in m["gpu_allocation_info"]}
    assert ("0", GPU0, "ml", "bert-0", "train") in info
    assert ("2", GPU2, "ml", "shared-1", "a") in info and ("2", GPU2, "ml", "shared-2", "b") in info
    assert ("3", GPU3, "infer", "mig-0", "srv") in info  # old-style MIG id mapped to its parent GPU
    assert ("", MIG_NEW, "infer", "mig-0", "srv") in info  # new-style MIG: parent unknown, still named
    assert ("3", GPU3, "dra", "claim-0", "c") in info
    assert m["gpu_exporter_attribution_up"] == [({"host": "node-a", "source": "kubelet"}, 1.0)]
    # Both exposition formats render it, and OpenMetrics' strict parser accepts it as an info family.
    registry = CollectorRegistry()
    registry.register(AttributionCollector(lambda: out, engine.stats, "node-a"))
    families = {f.name: f for f in text_string_to_metric_families(generate_openmetrics(registry).decode())}
    assert families["gpu_allocation"].type == "info"
    assert "gpu_allocation_info{" in generate_latest(registry).decode()


def make_proc(root: Path, pid: int, cgroup: str) -> None:
    (root / str(pid)).mkdir()
    (root / str(pid) / "cgroup").write_text(cgroup + "\n")


def test_mig_devices_map_to_their_gpu(sock_dir: Path) -> None:
    """A new-style MIG UUID from the device plugin lands on the GPU whose MIG devices NVML lists."""
    snap = engine_snapshot()
    gpus = list(snap.gpus)
    gpus[1] = dataclasses.replace(gpus[1], mig_instances=(MigInstance(gpu_instance=1, compute_instance=0, uuid=MIG_NEW),))
    with KubeletStandIn(sock_dir / "kubelet.sock", pods()) as kubelet:
        engine = AttributionEngine(proc_root=sock_dir, kubelet=KubeletSource(PodResourcesClient(kubelet.socket_path)))
        out = engine(dataclasses.replace(snap, gpus=tuple(gpus)))
        engine.close()
    info = {(s["gpu"], s["uuid"], s["device_id"], s["k8s_pod"]) for s, _ in metrics(engine, out)["gpu_allocation_info"]}
    assert ("1", GPU1, MIG_NEW, "mig-0") in info
    assert not any(uuid == MIG_NEW for _, uuid, _, _ in info)


def test_names_reach_processes_only_when_unambiguous(sock_dir: Path, tmp_path: Path) -> None:
    uid_a, uid_b = "11111111-2222-3333-4444-555555555555", "66666666-7777-8888-9999-000000000000"
    cid_a, cid_b = "a" * 64, "b" * 64

    def pod_path(uid: str, cid: str) -> str:
        return f"0::/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope"

    make_proc(tmp_path, 10, pod_path(uid_a, cid_a))  # bert-0's trainer on GPU 0 (allocated to it alone)
    make_proc(tmp_path, 11, pod_path(uid_b, cid_b))  # a pod without allocation on GPU 2 (time-sliced)
    make_proc(tmp_path, 12, pod_path(uid_a, cid_a))  # bert-0's trainer again, on GPU 3 (not its GPU)
    with KubeletStandIn(sock_dir / "kubelet.sock", pods()) as kubelet:
        engine = AttributionEngine(proc_root=tmp_path, kubelet=KubeletSource(PodResourcesClient(kubelet.socket_path)))
        out = engine(engine_snapshot({0: [10], 2: [11], 3: [12]}))
        engine.close()
    owners = {p.pid: p.owner for g in out.gpus for p in g.processes}
    assert owners[10] is not None and (owners[10].k8s_namespace, owners[10].k8s_pod, owners[10].k8s_container) == ("ml", "bert-0", "train")
    assert owners[10].k8s_pod_uid == uid_a
    # Two pods share GPU 2: no guess, only what the cgroup says.
    assert owners[11] is not None and (owners[11].k8s_pod_uid, owners[11].k8s_pod) == (uid_b, "")
    # The same pod's process on another GPU keeps the names learned for its pod UID and container id.
    assert owners[12] is not None and (owners[12].k8s_pod, owners[12].k8s_container) == ("bert-0", "train")


def test_failures_never_stop_attribution_and_recover(sock_dir: Path) -> None:
    path = sock_dir / "kubelet.sock"
    clock = [0.0]
    source = KubeletSource(PodResourcesClient(str(path), timeout_seconds=2.0), refresh_seconds=1.0,
                           retry_seconds=1.0, stale_seconds=30.0, clock=lambda: clock[0])
    # 1. No socket at all (kubelet not there yet).
    assert source.get(IDX) == []
    assert source.stats().up is False and source.stats().errors == {"missing": 1}
    kubelet = KubeletStandIn(path, pods()).start()
    try:
        clock[0] += 1.0
        assert len(source.get(IDX)) == 7 and source.stats().up is True
        # 2. An API error: names kept from the last good answer (stale beats blank) and counted.
        kubelet.fail_with = grpc.StatusCode.INTERNAL
        clock[0] += 1.0
        assert len(source.get(IDX)) == 7
        assert source.stats().up is False and source.stats().errors.get("api") == 1
        kubelet.fail_with = None
        # 3. The kubelet restarts: socket gone, then back; the client reconnects by itself.
        kubelet.stop()
        clock[0] += 1.0
        assert len(source.get(IDX)) == 7 and source.stats().up is False
        kubelet.start()
        clock[0] += 1.0
        assert len(source.get(IDX)) == 7 and source.stats().up is True
        # 4. Down for longer than stale_seconds: the old names go.
        kubelet.stop()
        clock[0] += 31.0
        assert source.get(IDX) == [] and source.stats().up is False
        assert source.stats().errors.get("missing", 0) >= 2
    finally:
        kubelet.stop()
        source.close()


def test_a_kubelet_that_hangs_costs_one_deadline(sock_dir: Path) -> None:
    path = sock_dir / "kubelet.sock"
    with KubeletStandIn(path, pods()) as kubelet:
        kubelet.hang_seconds = 30.0
        source = KubeletSource(PodResourcesClient(str(path), timeout_seconds=0.5))
        started = time.monotonic()
        assert source.get(IDX) == []
        waited = time.monotonic() - started
        source.close()
    assert source.stats().up is False and source.stats().errors == {"timeout": 1}
    assert waited < 10.0  # the deadline, not the kubelet, decides how long a poll waits


def test_a_socket_the_exporter_may_not_open(sock_dir: Path) -> None:
    """Permission denied for real: the socket belongs to another user (0600) and the client runs
    without the capabilities that let root ignore file modes (as a non-root exporter would)."""
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv to run the client without CAP_DAC_OVERRIDE")
    path = sock_dir / "kubelet.sock"
    with KubeletStandIn(path, pods()):
        os.chown(path, 65534, 65534)
        os.chmod(path, 0o600)
        code = (
            "from exporter.attribution.kubelet import KubeletSource, PodResourcesClient\n"
            f"s = KubeletSource(PodResourcesClient({str(path)!r}))\n"
            "print(len(s.get({})), s.stats().up, sorted(s.stats().errors))\n"
        )
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run([setpriv, "--inh-caps=-all", "--bounding-set=-all", "--", sys.executable, "-c", code],
                              env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "False", "['permission']"], done.stdout + done.stderr


def test_build_modes(sock_dir: Path) -> None:
    assert build_kubelet_source("off", str(sock_dir / "kubelet.sock")) is None
    assert build_kubelet_source("auto", str(sock_dir / "nope" / "kubelet.sock")) is None  # not a k8s node
    # auto on a node whose kubelet is restarting right now (directory there, socket not): still on.
    assert isinstance(build_kubelet_source("auto", str(sock_dir / "kubelet.sock")), KubeletSource)
    assert isinstance(build_kubelet_source("on", str(sock_dir / "nope" / "kubelet.sock")), KubeletSource)


def test_unique_orders_and_dedups() -> None:
    a = GpuAllocation(GPU0, GPU0, "nvidia.com/gpu", "ml", "p", "c")
    from exporter.attribution.kubelet import unique

    assert unique([a, a]) == (a,)
