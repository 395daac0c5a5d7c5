"""exporter.attribution.procfs, the one reader of /proc: against a /proc folder the test builds and
against the real /proc, including a process in a PID namespace of its own (``unshare``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.attribution.procfs import ProcFS, namespace_inode
from exporter.attribution.training import TrainingJoin
from exporter.snapshot import GpuProcess, GpuSample, NodeSnapshot
from harness.procfs import fake_proc_root
from harness.support import wait_until


def test_namespace_link_parsing() -> None:
    assert namespace_inode("pid:[4026531836]") == 4026531836
    assert namespace_inode("pid:[]") is None
    assert namespace_inode("garbage") is None
    assert namespace_inode("pid:[x1]") is None


def test_built_proc_root(tmp_path: Path) -> None:
    root = fake_proc_root(
        tmp_path / "proc", own_namespace=111, namespaces={4242: (999, 7)}, cgroups={4242: "0::/docker/abc\n"}
    )
    procfs = ProcFS(root)
    assert procfs.pid_namespace() == 111
    assert procfs.namespace_of(4242) == (999, 7)
    assert procfs.innermost_pid(4242) == 7
    assert procfs.cgroup(4242) == "0::/docker/abc\n"
    assert procfs.namespace_of(4243) is None
    with pytest.raises(FileNotFoundError):
        procfs.cgroup(4243)
    (root / "4242" / "status").write_text("Name:\tpython\n")  # a kernel without NSpid
    assert procfs.namespace_of(4242) is None


def test_real_proc() -> None:
    procfs = ProcFS("/proc")
    own = procfs.pid_namespace("self")
    assert own == os.stat("/proc/self/ns/pid").st_ino
    assert procfs.namespace_of(os.getpid()) == (own, os.getpid())
    assert procfs.cgroup(os.getpid()) == Path(f"/proc/{os.getpid()}/cgroup").read_text()


@pytest.fixture
def namespaced_sleeper() -> Iterator[int]:
    """The host PID of a ``sleep`` that is PID 1 of a new PID namespace."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.decode().strip()}")
    parent = subprocess.Popen(["unshare", "--pid", "--fork", "sleep", "300"])
    try:
        children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
        yield wait_until(lambda: int(children.read_text().split()[0]), timeout=30, message="the namespaced sleep")
    finally:
        parent.kill()
        parent.wait(30)


def test_real_proc_across_pid_namespaces(namespaced_sleeper: int) -> None:
    procfs = ProcFS("/proc")
    inode, inner = wait_until(lambda: procfs.namespace_of(namespaced_sleeper), timeout=30, message="NSpid")
    assert inner == 1 and inode != procfs.pid_namespace("self")

    class Claim:  # what the hook inside that namespace would report
        pid, pid_namespace_inode, training_job, rank = 1, inode, "ns-job", "3"

    snap = NodeSnapshot(host="n", timestamp_seconds=0.0, nvml_up=True, gpus=(GpuSample(0, "GPU-0", processes=(
        GpuProcess(pid=namespaced_sleeper, process_type="compute"), GpuProcess(pid=1, process_type="compute"),
    )),))
    out = TrainingJoin(lambda: [Claim()], procfs)(snap)
    assert [(p.pid, p.training_job, p.rank) for p in out.gpus[0].processes] == [
        (namespaced_sleeper, "ns-job", "3"), (1, None, None)
    ]
