"""exporter.attribution.training: GPU processes labelled with the job and rank of the training process
that reported the PID, across PID namespaces, with every /proc read under --proc-root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from exporter.attribution.procfs import ProcFS
from exporter.attribution.training import TrainingJoin
from exporter.cli import build
from exporter.config import load_settings
from exporter.hook.monitor import Monitor
from exporter.ingest.store import IngestStore
from exporter.ingest.validate import validate_report
from exporter.snapshot import GpuProcess, GpuSample, NodeSnapshot, ProcessOwner
from harness.payloads import payload
from harness.procfs import fake_proc_root
from harness.support import parse_metrics


def _snapshot(*pids: int) -> NodeSnapshot:
    procs = tuple(GpuProcess(pid=p, process_type="compute", used_memory_bytes=1 << 30) for p in pids)
    return NodeSnapshot(host="n", timestamp_seconds=0.0, nvml_up=True, gpus=(GpuSample(0, "GPU-0", processes=procs),))


def _join(store: IngestStore, procfs: ProcFS | None = None) -> TrainingJoin:
    return TrainingJoin(lambda: [p.report for p in store.processes()], procfs or ProcFS("/proc"))


def test_enrich_same_namespace_by_pid() -> None:
    store = IngestStore()
    doc = payload()
    store.submit(validate_report(doc))
    pid = doc["identity"]["pid"]
    out = _join(store)(_snapshot(pid, pid + 1))
    joined, other = out.gpus[0].processes
    assert (joined.training_job, joined.rank) == ("job-a", "1")
    assert (other.training_job, other.rank) == (None, None)


def test_enrich_other_namespace_via_nspid(tmp_path: Path) -> None:
    # A training process in a container reports PID 7 in namespace 999; the host sees it as 4242.
    proc = fake_proc_root(tmp_path / "proc", own_namespace=111, namespaces={4242: (999, 7), 4243: (999, 8)})
    store = IngestStore()
    doc = payload()
    doc["identity"].update(pid=7, pid_namespace_inode=999)
    store.submit(validate_report(doc))
    out = _join(store, ProcFS(proc))(_snapshot(4242, 4243, 7))
    names = [(p.pid, p.training_job) for p in out.gpus[0].processes]
    # host PID 7 is a different process (our own namespace): it must not match
    assert names == [(4242, "job-a"), (4243, None), (7, None)]


def test_enrich_leaves_snapshot_alone_without_reports() -> None:
    snap = _snapshot(1, 2)
    assert _join(IngestStore())(snap) is snap


def test_proc_root_reaches_the_training_pid_join(tmp_path: Path) -> None:
    """The exporter with --proc-root pointing at a /proc the test built: the hook in a container
    (namespace 999) reports PID 7, and the simulated GPU process 3100 is that process only according
    to that /proc. The exporter's own /proc knows nothing of it, so the labels prove which one was read."""
    proc = fake_proc_root(tmp_path / "proc", own_namespace=111, namespaces={3100: (999, 7), 3101: (999, 8)})
    argv = ["--listen", "127.0.0.1:1", "--simulate", "tiny", "--docker", "off", "--proc-root", str(proc)]
    runtime = build(load_settings(argv, environ={}))
    try:
        doc = payload()
        doc["identity"].update(pid=7, pid_namespace_inode=999)
        with TestClient(runtime.app, client=("127.0.0.1", 50123)) as client:
            assert client.post("/api/v1/training", content=json.dumps(doc)).status_code == 202
            runtime.poller.poll_once()
            series = parse_metrics(client.get("/metrics").text)["gpu_process_memory_used_bytes"]
    finally:
        runtime.close()
    owners = {labels["pid"]: (labels["training_job"], labels["rank"]) for labels, _ in series}
    assert owners == {"3100": ("job-a", "1"), "3101": ("", "")}


def test_real_proc_own_process() -> None:
    """Against the real /proc: the exporter's own PID is itself in its own namespace."""
    procfs = ProcFS("/proc")
    own = procfs.pid_namespace("self")
    assert own is not None and own == os.stat("/proc/self/ns/pid").st_ino
    assert procfs.namespace_of(os.getpid()) == (own, os.getpid())
    assert procfs.namespace_of(2**22 + 12345) is None  # no such PID


# ------------------------------------------------------------------------------------------ Slurm
def test_slurm_from_the_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a Slurm cgroup, the hook's SLURM_JOB_ID names the job; SLURM_PROCID is the rank under srun."""
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.delenv("RANK", raising=False)
    doc = Monitor("llm").build_payload()
    assert doc["identity"]["slurm_job"] == "4711" and doc["identity"]["rank"] == "3"
    store = IngestStore()
    store.submit(validate_report(doc))
    pid = doc["identity"]["pid"]
    in_cgroup = GpuProcess(pid=pid + 1, process_type="compute", owner=ProcessOwner(slurm_job="99"))
    snap = NodeSnapshot(host="n", timestamp_seconds=0.0, nvml_up=True, gpus=(
        GpuSample(0, "GPU-0", processes=(GpuProcess(pid=pid, process_type="compute"), in_cgroup)),))
    joined, other = _join(store)(snap).gpus[0].processes
    assert joined.owner is not None and joined.owner.slurm_job == "4711" and joined.rank == "3"
    assert other.owner == ProcessOwner(slurm_job="99")  # not reported by a hook: the cgroup's answer stays


def test_no_slurm_keys_outside_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("SLURM_JOB_ID", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    identity = Monitor("llm").build_payload()["identity"]
    assert "slurm_job" not in identity and "slurm_procid" not in identity
