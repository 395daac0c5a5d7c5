"""What a process's control group says about its owner: container, Kubernetes pod, Slurm job, systemd unit.

Every runtime and workload manager names the cgroup it creates after the thing it runs, so the
contents of ``/proc/<pid>/cgroup`` identify the owner without asking anyone. This module is pure
parsing (standard library only); the caller reads the file (through the one procfs reader).

Layouts understood (cgroup v1, v2 and hybrid; systemd and cgroupfs drivers):

==================  ======================================================================================
Docker              ``/docker/<id>`` (cgroupfs) · ``/system.slice/docker-<id>.scope`` (systemd)
containerd / CRI    ``/kubepods/<qos>/pod<uid>/<id>`` (cgroupfs) ·
                    ``/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope``
                    · ``.../kubepods-...-pod<uid_>.slice:cri-containerd:<id>`` (v1 systemd, as containerd writes it)
CRI-O               ``.../crio-<id>.scope`` (``crio-conmon-<id>`` is the monitor, not the container)
Podman              ``/machine.slice/libpod-<id>.scope`` · ``/libpod_parent/libpod-<id>``
Slurm (cgroup/v1)   ``/slurm/uid_<u>/job_<j>/step_<s>/task_<t>`` (also ``/slurm_<node>/...``)
Slurm (cgroup/v2)   ``/system.slice/slurmstepd.scope/job_<j>/step_<s>/user/task_<t>``
systemd             ``/system.slice/<unit>.service`` · ``/user.slice/user-<u>.slice/session-<n>.scope``
==================  ======================================================================================

Paths seen from a private cgroup namespace (``/../docker-<id>.scope``) parse the same way. For each
fact the unified (v2) line is consulted first, because on hybrid hosts it is the one systemd keeps
accurate; then the v1 lines in file order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# One path component that names a container: a 64-hex id, optionally behind a runtime prefix
# (docker-, cri-containerd-, crio-, libpod-, "...:cri-containerd:") and before a systemd ".scope".
_CONTAINER = re.compile(r"(?:^|[-:])([0-9a-f]{64})(?:\.scope)?$")
# The runtime, from the component's prefix; a bare id under kubepods is "cri" (containerd or CRI-O
# with the cgroupfs driver write the same path), a bare id elsewhere is Docker's cgroupfs layout.
_RUNTIME_PREFIXES = (
    ("cri-containerd", "containerd"),
    ("crio", "cri-o"),
    ("libpod", "podman"),
    ("docker", "docker"),
)
# Helper processes in cgroups named after a container that are not the container itself.
_NOT_A_CONTAINER = ("conmon",)
# kubelet's pod cgroup: "pod<uid>" (cgroupfs) or "kubepods-<qos>-pod<uid with _ for ->.slice" (systemd).
_POD = re.compile(r"(?:^|-)pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})(?:\.slice)?(?=$|:)")
_SLURM_JOB = re.compile(r"^job_(\d+)$")
_SLURM_STEP = re.compile(r"^step_(\d+|batch|extern|interactive)$")
_SLURM_ROOT = re.compile(r"^(?:slurm(?:_[^/]+)?|slurmstepd\.scope)$")
_SYSTEMD_UNIT = re.compile(r"^[^/]+\.(?:service|scope)$")


@dataclass(frozen=True, slots=True)
class CgroupOwner:
    """Who owns a process, as far as its cgroup tells. Every field is None when the cgroup does not say."""

    container_id: str | None = None
    runtime: str | None = None  # docker | containerd | cri-o | podman | cri (kubepods, runtime unnamed)
    pod_uid: str | None = None  # Kubernetes pod UID, with dashes
    slurm_job: str | None = None
    slurm_step: str | None = None  # a number, or batch | extern | interactive
    systemd_unit: str | None = None  # only for processes in no container, pod or Slurm job

    @property
    def known(self) -> bool:
        return any((self.container_id, self.pod_uid, self.slurm_job, self.systemd_unit))


def parse_cgroup_file(text: str) -> CgroupOwner:
    """The owner described by the contents of a ``/proc/<pid>/cgroup`` file (v1, v2 or hybrid)."""
    unified: list[str] = []
    legacy: list[str] = []
    systemd_v1: list[str] = []
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            unified.append(path)
        elif controllers == "name=systemd":
            systemd_v1.append(path)
        else:
            legacy.append(path)
    paths = [p for p in (*unified, *systemd_v1, *legacy) if p not in ("", "/")]
    container_id = runtime = pod_uid = job = step = None
    for path in paths:
        components = path.split("/")
        if container_id is None:
            container_id, runtime = _container(components)
        if pod_uid is None:
            pod_uid = _pod_uid(components)
        if job is None:
            job, step = _slurm(components)
    if container_id is not None and runtime is None:
        runtime = "cri" if pod_uid is not None else "docker"
    unit = None
    if container_id is None and job is None and pod_uid is None:
        # The v2 line, else systemd's own v1 hierarchy (the others follow the controllers, not units).
        for path in (*unified, *systemd_v1):
            unit = _systemd_unit(path.split("/"))
            if unit is not None:
                break
    return CgroupOwner(container_id, runtime, pod_uid, job, step, unit)


def container_id_from_cgroup(text: str) -> str | None:
    """The container id in a ``/proc/<pid>/cgroup`` file, or None (a host process)."""
    return parse_cgroup_file(text).container_id


def _container(components: list[str]) -> tuple[str | None, str | None]:
    # Deepest component first: a container running systemd has ".../docker-<id>.scope/init.scope".
    for component in reversed(components):
        if any(marker in component for marker in _NOT_A_CONTAINER):
            continue
        match = _CONTAINER.search(component)
        if match is None:
            continue
        prefix = component[: match.start(1)]
        runtime = next((name for key, name in _RUNTIME_PREFIXES if key in prefix), None)
        if runtime is None and "docker" in components:
            runtime = "docker"
        return match.group(1), runtime
    return None, None


def _pod_uid(components: list[str]) -> str | None:
    if not any(c.startswith("kubepods") for c in components):
        return None
    for component in reversed(components):
        match = _POD.search(component)
        if match is not None:
            return match.group(1).replace("_", "-")
    return None


def _slurm(components: list[str]) -> tuple[str | None, str | None]:
    if not any(_SLURM_ROOT.match(c) for c in components):
        return None, None
    job = step = None
    for component in components:
        if job is None and (m := _SLURM_JOB.match(component)):
            job = m.group(1)
        elif job is not None and step is None and (m := _SLURM_STEP.match(component)):
            step = m.group(1)
    return job, step


def _systemd_unit(components: list[str]) -> str | None:
    return next((c for c in reversed(components) if _SYSTEMD_UNIT.match(c)), None)
