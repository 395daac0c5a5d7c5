"""Real cgroups in the layouts of container runtimes, Kubernetes, Slurm and systemd, with a real process.

``placed(layout)`` creates the layout's cgroup directories (cgroup v1: in the ``pids`` and ``name=systemd``
hierarchies, as on a host with the v1 systemd driver; v2: in the unified hierarchy), starts a
``sleep`` and moves it in by writing its PID to ``cgroup.procs``, exactly as a runtime does. On exit
the process is killed and only the directories this helper created are removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path("/sys/fs/cgroup")
V1_HIERARCHIES = ("pids", "systemd")  # a controller hierarchy and systemd's named one
V2_CANDIDATES = (ROOT / "unified", ROOT)  # hybrid hosts mount v2 at unified/, pure v2 hosts at the root


@dataclass(frozen=True)
class Layout:
    """One cgroup path as a runtime would create it, and what the parser must find in it."""

    name: str
    path: str
    expected: dict[str, str]  # CgroupOwner field -> value


def v1_roots() -> list[Path]:
    roots = [ROOT / h for h in V1_HIERARCHIES]
    return roots if all(_writable(r) and (r / "cgroup.procs").exists() for r in roots) else []


def v2_root() -> Path | None:
    for candidate in V2_CANDIDATES:
        if (candidate / "cgroup.controllers").exists() and _writable(candidate):
            return candidate
    return None


def _writable(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK)


def layouts(version: int) -> list[Layout]:
    """Every layout in the form it takes under cgroup ``version`` (1 or 2), each with its own fresh ids."""
    builders: list[Callable[[str, str, str, str], Layout]] = [
        lambda cid, pod, job, unit: Layout(
            "docker-systemd", f"/system.slice/docker-{cid}.scope", {"container_id": cid, "runtime": "docker"}),
        lambda cid, pod, job, unit: Layout(
            "containerd-systemd",
            f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod.replace('-', '_')}.slice"
            f"/cri-containerd-{cid}.scope",
            {"container_id": cid, "runtime": "containerd", "pod_uid": pod}),
        lambda cid, pod, job, unit: Layout(
            "crio-systemd",
            f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{pod.replace('-', '_')}.slice"
            f"/crio-{cid}.scope",
            {"container_id": cid, "runtime": "cri-o", "pod_uid": pod}),
        lambda cid, pod, job, unit: Layout(
            "podman", f"/machine.slice/libpod-{cid}.scope", {"container_id": cid, "runtime": "podman"}),
        lambda cid, pod, job, unit: Layout("systemd-unit", f"/system.slice/{unit}", {"systemd_unit": unit}),
    ]
    if version == 1:
        builders += [
            lambda cid, pod, job, unit: Layout(
                "docker-cgroupfs", f"/docker/{cid}", {"container_id": cid, "runtime": "docker"}),
            lambda cid, pod, job, unit: Layout(
                "containerd-cgroupfs", f"/kubepods/burstable/pod{pod}/{cid}",
                {"container_id": cid, "runtime": "cri", "pod_uid": pod}),
            lambda cid, pod, job, unit: Layout(
                "podman-cgroupfs", f"/libpod_parent/libpod-{cid}", {"container_id": cid, "runtime": "podman"}),
            lambda cid, pod, job, unit: Layout(
                "slurm-v1", f"/slurm/uid_1000/job_{job}/step_0/task_0", {"slurm_job": job, "slurm_step": "0"}),
        ]
    else:
        builders.append(lambda cid, pod, job, unit: Layout(
            "slurm-v2", f"/system.slice/slurmstepd.scope/job_{job}/step_batch/user/task_0",
            {"slurm_job": job, "slurm_step": "batch"}))
    return [
        build(secrets.token_hex(32), str(uuid.uuid4()), str(secrets.randbelow(10**6) + 1),
              f"gpu-trainer-{secrets.token_hex(3)}.service")
        for build in builders
    ]


@contextlib.contextmanager
def placed(layout: Layout, version: int) -> Iterator[int]:
    """A running ``sleep`` whose cgroup is ``layout.path`` (v1 or v2); yields its PID."""
    roots = v1_roots() if version == 1 else [r for r in [v2_root()] if r is not None]
    if not roots:
        pytest.skip(f"no writable cgroup v{version} hierarchy here (needs root and cgroupfs)")
    created: list[Path] = []
    proc = subprocess.Popen(["sleep", "600"])
    try:
        for root in roots:
            target = root / layout.path.lstrip("/")
            missing = [p for p in [target, *target.parents] if p.is_relative_to(root) and p != root and not p.exists()]
            for directory in reversed(missing):
                directory.mkdir()
                created.append(directory)
            (target / "cgroup.procs").write_text(f"{proc.pid}\n")
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()
        for directory in reversed(created):
            with contextlib.suppress(OSError):  # another test's process may still live in a shared parent
                directory.rmdir()
