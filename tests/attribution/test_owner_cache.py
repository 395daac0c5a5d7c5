"""exporter.attribution.owner_cache through the engine: a process's cgroup owner is read once, a real
process moved to another real cgroup is re-attributed within the recheck interval, a reused PID (real
PID reuse, in a PID namespace of its own) is read afresh, and the cache holds only the last poll's PIDs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.attribution.cgroups import CgroupOwner
from exporter.attribution.engine import AttributionEngine
from exporter.attribution.owner_cache import RECHECK_SECONDS, OwnerCache
from exporter.attribution.procfs import ProcFS
from exporter.snapshot import GpuProcess, GpuSample, NodeSnapshot
from harness.cgroups import Layout, layouts, placed, v1_roots, v2_root
from harness.process import REPO_ROOT


def snapshot_with(*pids: int) -> NodeSnapshot:
    procs = tuple(GpuProcess(pid=p, process_type="compute", used_memory_bytes=1 << 30) for p in pids)
    return NodeSnapshot(host="h", timestamp_seconds=0.0, nvml_up=True,
                        gpus=(GpuSample(index=0, uuid="GPU-0000", up=True, processes=procs),))


def container_ids(snapshot: NodeSnapshot) -> dict[int, str | None]:
    return {p.pid: p.container.id if p.container else None for g in snapshot.gpus for p in g.processes}


class CountingProcFS(ProcFS):
    """The real reader, counting cgroup file reads per PID."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self.reads: dict[int, int] = {}

    def cgroup(self, pid: int) -> str:
        self.reads[pid] = self.reads.get(pid, 0) + 1
        return super().cgroup(pid)


def two_container_layouts(version: int) -> tuple[Layout, Layout]:
    by_name = {lay.name: lay for lay in layouts(version)}
    return by_name["docker-systemd"], by_name["podman"]


def move(pid: int, layout: Layout, version: int) -> None:
    """Move a running process into ``layout``'s (existing) cgroup, as a runtime or an admin would."""
    roots = v1_roots() if version == 1 else [r for r in [v2_root()] if r is not None]
    for root in roots:
        (root / layout.path.lstrip("/") / "cgroup.procs").write_text(f"{pid}\n")


@pytest.mark.parametrize("version", [1, 2])
def test_moved_process_is_reattributed_within_the_recheck_interval(version: int) -> None:
    a, b = two_container_layouts(version)
    now = [1000.0]
    procfs = CountingProcFS("/proc")
    engine = AttributionEngine(procfs, clock=lambda: now[0])
    # b's own sleep keeps b's cgroup; entered first so it is removed after the moved process is dead.
    with placed(b, version), placed(a, version) as pid:
        assert container_ids(engine(snapshot_with(pid))) == {pid: a.expected["container_id"]}
        move(pid, b, version)
        assert b.path in Path(f"/proc/{pid}/cgroup").read_text()  # the kernel has it in b now
        now[0] += RECHECK_SECONDS / 2  # within the interval: the owner read before, no read
        assert container_ids(engine(snapshot_with(pid))) == {pid: a.expected["container_id"]}
        assert procfs.reads[pid] == 1
        now[0] += RECHECK_SECONDS / 2  # the interval since the read has passed: read again
        assert container_ids(engine(snapshot_with(pid))) == {pid: b.expected["container_id"]}
        assert procfs.reads[pid] == 2


# Runs as PID 1 of a new PID namespace with its own /proc: a sleep in cgroup a is attributed, exits,
# and the namespace's next PID is set to the same number (ns_last_pid) for a sleep in cgroup b, which
# the same engine, with its clock standing still, must attribute to b at the very next poll.
PID_REUSE = """
import json, sys
from exporter.attribution.engine import AttributionEngine
from exporter.snapshot import GpuProcess, GpuSample, NodeSnapshot
from harness.cgroups import layouts, placed

version = int(sys.argv[1])
by_name = {lay.name: lay for lay in layouts(version)}
a, b = by_name["docker-systemd"], by_name["podman"]
engine = AttributionEngine("/proc", clock=lambda: 0.0)

def poll(pid):
    snap = NodeSnapshot(host="h", timestamp_seconds=0.0, nvml_up=True, gpus=(
        GpuSample(index=0, uuid="GPU-0", up=True, processes=(GpuProcess(pid=pid, process_type="compute"),)),))
    proc = engine(snap).gpus[0].processes[0]
    return proc.container.id if proc.container else None

with placed(a, version) as first:
    before = poll(first)
with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
    fh.write(str(first - 1))
with placed(b, version) as second:
    after = poll(second)
print(json.dumps({"first": first, "second": second, "before": before, "after": after,
                  "a": a.expected["container_id"], "b": b.expected["container_id"]}))
"""


@pytest.mark.parametrize("version", [1, 2])
def test_a_reused_pid_is_read_afresh(version: int) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    if not (v1_roots() if version == 1 else v2_root()):
        pytest.skip(f"no writable cgroup v{version} hierarchy here (needs root and cgroupfs)")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.decode().strip()}")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", PID_REUSE, str(version)],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT,
    )
    assert run.returncode == 0, run.stderr
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["second"] == r["first"]  # the PID really was reused
    assert (r["before"], r["after"]) == (r["a"], r["b"])


def make_proc(root: Path, pid: int) -> None:
    (root / str(pid)).mkdir()
    (root / str(pid) / "cgroup").write_text(f"0::/system.slice/docker-{str(pid) * 32}.scope\n")


def test_only_the_last_polls_pids_are_kept(tmp_path: Path) -> None:
    for pid in (10, 11):
        make_proc(tmp_path, pid)
    procfs = CountingProcFS(tmp_path)
    engine = AttributionEngine(procfs, clock=lambda: 0.0)
    for pids in ((10, 11), (10, 11), (10,), (10, 11), (10, 11, 12)):
        out = engine(snapshot_with(*pids))
    assert container_ids(out) == {10: "10" * 32, 11: "11" * 32, 12: None}
    # 10 read once; 11 read again after a poll without it; 12 has no /proc entry (no cgroup read).
    assert procfs.reads == {10: 1, 11: 2}


def test_a_pid_without_proc_entry_is_asked_again_after_the_interval(tmp_path: Path) -> None:
    now = [0.0]
    asked: list[int] = []

    class Asking(CountingProcFS):
        def identity(self, pid: int) -> tuple[int, int]:
            asked.append(pid)
            return super().identity(pid)

    engine = AttributionEngine(Asking(tmp_path), clock=lambda: now[0])
    assert container_ids(engine(snapshot_with(20))) == {20: None}
    make_proc(tmp_path, 20)  # a process under that PID now (only after the one NVML listed is gone)
    now[0] += RECHECK_SECONDS / 2
    assert container_ids(engine(snapshot_with(20))) == {20: None}  # not asked within the interval
    assert asked == [20]
    now[0] += RECHECK_SECONDS / 2
    assert container_ids(engine(snapshot_with(20))) == {20: "20" * 32}
    assert asked == [20, 20]


def test_size_is_bounded() -> None:
    cache = OwnerCache(max_entries=2)
    owner = CgroupOwner(systemd_unit="x.service")
    cache.begin_poll()
    for pid in (1, 2, 3):
        assert cache.get(pid, 0.0) is None
        cache.put(pid, (pid, 0), 0.0, owner)
    cache.end_poll()
    assert len(cache) == 2
    cache.begin_poll()
    assert [e.owner if (e := cache.get(pid, 1.0)) else None for pid in (1, 2, 3)] == [owner, owner, None]
    cache.end_poll()
    assert len(cache) == 2
    cache.begin_poll()
    cache.end_poll()  # a poll without those PIDs
    assert len(cache) == 0
