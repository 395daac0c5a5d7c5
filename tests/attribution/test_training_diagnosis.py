"""exporter.attribution.training_diagnosis (issue 16): each training process's GPU, the co-tenants
captured at its OOM (kept after it died), and silent PIDs found gone in /proc (a test-built /proc)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exporter.attribution.procfs import ProcFS
from exporter.attribution.training_diagnosis import TrainingDiagnosis
from exporter.ingest.store import IngestStore, TrackedProcess
from exporter.ingest.validate import validate_report
from exporter.snapshot import ContainerInfo, GpuProcess, GpuSample, NodeSnapshot
from harness.clock import FakeClock
from harness.payloads import payload
from harness.procfs import fake_proc_root

GiB = 1 << 30
OWN_NS = 4026531836


def push(store: IngestStore, pid: int, job: str = "job-a", rank: int = 0, seq: int = 1, **over: Any) -> None:
    counters = over.pop("counters", {})
    doc = payload(**over)
    doc["seq"] = seq
    doc["identity"].update(pid=pid, training_job=job, rank=str(rank), pid_namespace_inode=OWN_NS)
    doc["counters"].update(counters)
    store.submit(validate_report(json.loads(json.dumps(doc))))


def snapshot(*gpus: tuple[int, list[GpuProcess]]) -> NodeSnapshot:
    return NodeSnapshot(
        host="n", timestamp_seconds=0.0, nvml_up=True,
        gpus=tuple(GpuSample(i, f"GPU-{i}", processes=tuple(p)) for i, p in gpus),
    )  # fmt: skip


def by_pid(store: IngestStore) -> dict[int, TrackedProcess]:
    return {p.report.pid: p for p in store.processes()}


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    return fake_proc_root(tmp_path / "proc", own_namespace=OWN_NS)


def running(root: Path, pid: int, state: str = "S") -> None:
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    (root / str(pid) / "stat").write_text(f"{pid} (python (train)) {state} 1 1 1")


def test_gpu_and_oom_co_tenants_are_kept_after_the_process_left_nvml(proc_root: Path) -> None:
    store = IngestStore(clock=FakeClock())
    diagnose = TrainingDiagnosis(store, ProcFS(proc_root), lambda pid: None, clock=store._clock)
    push(store, 100, "victim")
    push(store, 200, "grower", rank=3)
    notebook = ContainerInfo("abc", "notebook", "img", {"io.kubernetes.pod.name": "nb-0"})
    full = snapshot(
        (0, [GpuProcess(100, "compute", 4 * GiB), GpuProcess(200, "compute", 60 * GiB, training_job="grower", rank="3"),
             GpuProcess(300, "compute", 10 * GiB, container=notebook), GpuProcess(400, "compute", 1 * GiB),
             GpuProcess(500, "graphics", 2 * GiB), GpuProcess(500, "compute", 1 * GiB)]),
        (1, [GpuProcess(600, "compute", 70 * GiB)]),
    )  # fmt: skip
    assert diagnose(full) is full
    procs = by_pid(store)
    assert procs[100].gpu is not None and procs[100].gpu.index == "0" and procs[100].oom is None

    push(store, 100, "victim", seq=2, counters={"cuda_oom": 1})
    diagnose(full)
    record = by_pid(store)[100].oom
    assert record is not None and record.gpu.uuid == "GPU-0"
    assert [(h.pid, h.training_job, h.rank, h.container, h.pod, h.used_memory_bytes) for h in record.holders] == [
        (200, "grower", "3", "", "", 60 * GiB),
        (300, "", "", "notebook", "nb-0", 10 * GiB),
        (500, "", "", "", "", 2 * GiB),  # its larger context; one holder per process
    ]
    # The victim died: NVML no longer lists it; its GPU and the record stay (no new OOM: not retaken).
    diagnose(snapshot((0, [GpuProcess(200, "compute", 75 * GiB)]), (1, [])))
    after = by_pid(store)[100]
    assert after.gpu == procs[100].gpu and after.oom == record


def test_the_hooks_device_uuid_wins_over_the_pid_join(proc_root: Path) -> None:
    store = IngestStore(clock=FakeClock())
    doc = payload()
    doc["identity"].update(pid=100, pid_namespace_inode=OWN_NS)
    doc["gpu_uuid"] = "GPU-1"
    store.submit(validate_report(doc))
    TrainingDiagnosis(store, ProcFS(proc_root), lambda pid: None)(snapshot((0, [GpuProcess(100, "compute", GiB)]), (1, [])))
    gpu = by_pid(store)[100].gpu
    assert gpu is not None and (gpu.index, gpu.uuid) == ("1", "GPU-1")


@pytest.mark.parametrize(("state", "vanished"), [(None, True), ("Z", True), ("S", False)])
def test_a_silent_process_whose_pid_is_gone_is_marked_vanished(
    proc_root: Path, state: str | None, vanished: bool
) -> None:
    clock = FakeClock()
    store = IngestStore(clock=clock)
    diagnose = TrainingDiagnosis(store, ProcFS(proc_root), lambda pid: None, clock=clock)
    if state is not None:
        running(proc_root, 4321, state)
    push(store, 4321, push_interval_seconds=0.25)
    clock.advance(1.5)  # under the silence limit, max(3 x 0.25 s, 2 s): not asked yet
    diagnose(snapshot())
    assert by_pid(store)[4321].exit is None
    clock.advance(1.0)
    diagnose(snapshot())
    ended = by_pid(store)[4321].exit
    assert (ended is not None and ended[0] == "vanished") is vanished


def test_a_reported_exit_is_never_overridden_by_vanished(proc_root: Path) -> None:
    clock = FakeClock()
    store = IngestStore(clock=clock)
    push(store, 4321, exit={"reason": "normal", "detail": "", "timestamp": clock.now})
    clock.advance(60)
    TrainingDiagnosis(store, ProcFS(proc_root), lambda pid: None, clock=clock)(snapshot())
    assert by_pid(store)[4321].exit == ("normal", "", clock.now - 60)


def test_another_namespace_is_looked_up_and_an_unseen_one_decides_nothing(tmp_path: Path) -> None:
    root = fake_proc_root(tmp_path / "proc", own_namespace=OWN_NS, namespaces={5001: (777, 12)})
    running(root, 5001)
    clock = FakeClock()
    store = IngestStore(clock=clock)
    diagnose = TrainingDiagnosis(store, ProcFS(root), lambda pid: None, clock=clock)
    for pid, ns in ((12, 777), (13, 777), (14, 999)):  # alive in ns 777; gone from ns 777; ns 999 unseen
        doc = payload()
        doc["identity"].update(pid=pid, pid_namespace_inode=ns)
        store.submit(validate_report(doc))
    clock.advance(10)
    diagnose(snapshot())
    ended = {pid: (p.exit[0] if p.exit else None) for pid, p in by_pid(store).items()}
    assert ended == {12: None, 13: "vanished", 14: None}


def test_a_process_in_another_namespace_gets_the_gpu_of_its_host_pid(proc_root: Path) -> None:
    store = IngestStore(clock=FakeClock())
    inside = {5001: (777, 12), 5002: (777, 13), 5003: (888, 12)}  # host PID -> (namespace, PID inside)
    diagnose = TrainingDiagnosis(store, ProcFS(proc_root), inside.get, clock=store._clock)
    for pid in (12, 13):
        doc = payload()
        doc["identity"].update(pid=pid, rank=str(pid), pid_namespace_inode=777)
        store.submit(validate_report(doc))
    diagnose(snapshot(
        (0, [GpuProcess(5002, "compute", GiB), GpuProcess(5003, "compute", 9 * GiB)]),
        (1, [GpuProcess(5001, "compute", GiB)]),
    ))
    gpus = {pid: p.gpu.index if p.gpu is not None else None for pid, p in by_pid(store).items()}
    assert gpus == {12: "1", 13: "0"}  # PID 12 of namespace 888 (on GPU 0) is someone else
