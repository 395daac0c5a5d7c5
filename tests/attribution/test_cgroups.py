"""The attribution engine's cgroup side: every layout, with real cgroups and real processes moved in.

harness/cgroups.py creates each runtime's / workload manager's cgroup on this machine (v1 and,
where the kernel offers it, v2) and moves a real ``sleep`` into it; the engine then reads that PID's
``/proc/<pid>/cgroup`` like any GPU process's. String cases cover what cannot be created here (other
hosts' cgroup namespaces, the v1 systemd form containerd writes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from exporter.attribution.cgroups import CgroupOwner, parse_cgroup_file
from exporter.attribution.engine import AttributionEngine
from exporter.snapshot import GpuProcess, GpuSample, NodeSnapshot, ProcessOwner
from harness.cgroups import Layout, layouts, placed

CASES = [(1, layout) for layout in layouts(1)] + [(2, layout) for layout in layouts(2)]


def snapshot_with(*pids: int) -> NodeSnapshot:
    procs = tuple(GpuProcess(pid=p, process_type="compute", used_memory_bytes=1 << 30) for p in pids)
    return NodeSnapshot(host="h", timestamp_seconds=0.0, nvml_up=True,
                        gpus=(GpuSample(index=0, uuid="GPU-0000", up=True, processes=procs),))


def owner_fields(owner: CgroupOwner) -> dict[str, str]:
    return {k: v for k, v in dataclasses.asdict(owner).items() if v is not None}


@pytest.mark.parametrize(("version", "layout"), CASES, ids=[f"v{v}-{lay.name}" for v, lay in CASES])
def test_real_cgroup_layouts(version: int, layout: Layout) -> None:
    with placed(layout, version) as pid:
        text = Path(f"/proc/{pid}/cgroup").read_text()
        assert layout.path in text, text  # the kernel really has the process there
        assert owner_fields(parse_cgroup_file(text)) == layout.expected
        # The same through the engine (its procfs read, then the snapshot's labels).
        out = AttributionEngine(proc_root="/proc")(snapshot_with(pid))
        proc = out.gpus[0].processes[0]
        owner = proc.owner or ProcessOwner()
        expected = layout.expected
        assert (proc.container.id if proc.container else None) == expected.get("container_id")
        assert owner.k8s_pod_uid == expected.get("pod_uid", "")
        assert (owner.slurm_job, owner.slurm_step) == (expected.get("slurm_job", ""), expected.get("slurm_step", ""))
        assert owner.systemd_unit == expected.get("systemd_unit", "")
    # The process is gone: the same PID now attributes to nothing (no stale answer).
    out = AttributionEngine(proc_root="/proc")(snapshot_with(pid))
    assert out.gpus[0].processes[0].owner is None


CID = "c" * 64
POD = "0a1b2c3d-1111-2222-3333-444455556666"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # v1 systemd form as containerd spells the cgroupsPath; and a private cgroup namespace.
        (f"1:name=systemd:/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice:cri-containerd:{CID}",
         {"container_id": CID, "runtime": "containerd", "pod_uid": POD}),
        (f"0::/../docker-{CID}.scope", {"container_id": CID, "runtime": "docker"}),
        # A container running systemd: the deepest component is init.scope, the container is above it.
        (f"0::/system.slice/docker-{CID}.scope/init.scope", {"container_id": CID, "runtime": "docker"}),
        # CRI-O's monitor lives next to the container but is not it.
        (f"0::/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/crio-conmon-{CID}.scope", {"pod_uid": POD}),
        # Hybrid host, Slurm's cgroup/v1 plugin: slurmd's unit on the v2 line must not hide the job.
        ("4:freezer:/slurm/uid_0/job_77/step_extern\n0::/system.slice/slurmd.service",
         {"slurm_job": "77", "slurm_step": "extern"}),
        ("0::/slurm_node7/uid_5/job_9/step_2/task_0", {"slurm_job": "9", "slurm_step": "2"}),
        ("0::/user.slice/user-1000.slice/session-3.scope", {"systemd_unit": "session-3.scope"}),
        # Not a Slurm tree: a directory called job_1 elsewhere means nothing.
        ("0::/batch/job_1/step_0", {}),
        ("0::/\n", {}),
        ("garbage\n\n::\n", {}),
    ],
)
def test_layout_strings(text: str, expected: dict[str, str]) -> None:
    assert owner_fields(parse_cgroup_file(text)) == expected


def test_unreadable_proc_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "123").mkdir()
    (tmp_path / "123" / "cgroup").mkdir()  # reading a directory: an OSError other than "not found"
    engine = AttributionEngine(proc_root=tmp_path)
    out = engine(snapshot_with(123))
    assert out.gpus[0].processes[0].owner is None
    stats = engine.stats()["cgroup"]
    assert stats.up is False and sum(stats.errors.values()) == 1
