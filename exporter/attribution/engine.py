"""The one attribution engine: for every GPU process, whose is it; for every GPU, who holds it.

Per poll (a Poller enricher): each GPU process's ``/proc/<pid>/cgroup`` is read through
exporter.attribution.procfs (``--proc-root``) and parsed (exporter.attribution.cgroups) into container
id, pod UID, Slurm job/step or systemd unit, once per process and again after a recheck interval
(exporter.attribution.owner_cache: a reused PID is read afresh); the
container id goes to the Docker engine for names when there is one (exporter.containers); the kubelet's
PodResources API (exporter.attribution.kubelet) gives the pod/namespace/container each GPU is allocated
to, which becomes ``NodeSnapshot.allocations`` and, where it is unambiguous, the names of the processes
of that pod.

The kubelet never says a pod's UID or container ids, so names reach a process by a join: when a GPU
is allocated to exactly one container and the processes on it that live in kubepods cgroups belong to
exactly one (pod UID, container id), that pod UID and container id get those names — and keep them
(bounded memory) for the pod's processes on other GPUs. Anything less certain keeps pod UID and
container id alone, which join with kube-state-metrics' ``kube_pod_info{uid}`` and
``kube_pod_container_info{container_id}``.

Each source fails alone: an unreadable /proc, a dead Docker engine or kubelet only removes the
labels that source gave (see ``gpu_exporter_attribution_up{source}``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping

from exporter.attribution.cgroups import CgroupOwner, parse_cgroup_file
from exporter.attribution.kubelet import KubeletSource, SourceStats, unique
from exporter.attribution.owner_cache import OwnerCache
from exporter.attribution.procfs import ProcFS
from exporter.config import Settings
from exporter.snapshot import ContainerInfo, GpuAllocation, GpuProcess, GpuSample, NodeSnapshot, ProcessOwner

log = logging.getLogger(__name__)

# Docker-engine labels that carry Kubernetes names (dockershim / cri-dockerd nodes).
_K8S_LABELS = ("io.kubernetes.pod.namespace", "io.kubernetes.pod.name", "io.kubernetes.container.name")
_MAX_LEARNED = 4096


class AttributionEngine:
    """Poller enricher filling ``GpuProcess.container`` / ``.owner`` and ``NodeSnapshot.allocations``.

    ``docker`` is a ``ContainerAttributor`` (names for container ids) or None; ``kubelet`` a
    ``KubeletSource`` or None; ``clock`` (monotonic seconds) times the re-reads of cgroup files.
    """

    def __init__(
        self,
        proc_root: ProcFS | str | os.PathLike[str] = Settings.proc_root,
        docker: object | None = None,
        kubelet: KubeletSource | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.procfs = proc_root if isinstance(proc_root, ProcFS) else ProcFS(proc_root)
        self.docker = docker
        self.kubelet = kubelet
        self._lock = threading.Lock()
        self._cgroup_up: bool | None = None
        self._cgroup_errors: dict[str, int] = {}
        # Learned by the allocation join: pod UID -> (namespace, pod); container id -> container name.
        self._pod_names: dict[str, tuple[str, str]] = {}
        self._container_names: dict[str, str] = {}
        self._owners = OwnerCache()
        self._clock = clock

    def __call__(self, snapshot: NodeSnapshot) -> NodeSnapshot:
        check = getattr(self.docker, "check_engine", None)
        if callable(check):
            check()
        allocations = self._allocations(snapshot.gpus)
        owners: dict[int, CgroupOwner | None] = {}
        now = self._clock()
        self._owners.begin_poll()
        for gpu in snapshot.gpus:
            for proc in gpu.processes:
                if proc.pid not in owners:
                    owners[proc.pid] = self._owner(proc.pid, now)
        self._owners.end_poll()  # PIDs not in this poll leave the cache
        if not owners and not allocations:
            return snapshot
        self._learn_names(snapshot.gpus, owners, allocations)
        containers: dict[str, ContainerInfo] = {}
        gpus: list[GpuSample] = []
        for gpu in snapshot.gpus:
            procs = tuple(self._attribute(proc, owners.get(proc.pid), containers) for proc in gpu.processes)
            gpus.append(dataclasses.replace(gpu, processes=procs) if gpu.processes else gpu)
        return dataclasses.replace(snapshot, gpus=tuple(gpus), allocations=allocations)

    # -- sources ------------------------------------------------------------------------------------

    def _owner(self, pid: int, now: float) -> CgroupOwner | None:
        """The PID's owner: remembered while it is the same process (at most owner_cache's recheck
        interval), else read."""
        cached = self._owners.get(pid, now)
        if cached is not None and cached.identity is None:
            return None  # no /proc entry when last asked
        try:
            identity = self.procfs.identity(pid)
        except FileNotFoundError:  # exited between NVML's answer and now, or not in our PID namespace
            self._owners.put(pid, None, now, None)
            return None
        except OSError:
            return self._read_owner(pid)  # cannot tell which process it is: read, remember nothing
        if cached is not None and cached.identity == identity and cached.owner is not None:
            if self._cgroup_up is not True:  # as a read would have
                self._mark_readable()
            return cached.owner
        owner = self._read_owner(pid)
        self._owners.put(pid, identity, now, owner)  # None (unreadable): read again next poll
        return owner

    def _read_owner(self, pid: int) -> CgroupOwner | None:
        try:
            text = self.procfs.cgroup(pid)
        except FileNotFoundError:
            return None  # exited between NVML's answer and now
        except OSError as exc:
            kind = "permission" if isinstance(exc, PermissionError) else "io"
            with self._lock:
                self._cgroup_errors[kind] = self._cgroup_errors.get(kind, 0) + 1
                was_up, self._cgroup_up = self._cgroup_up, False
            if was_up is not False:
                log.warning(
                    "cannot read %s/%d/cgroup (%s): GPU processes get no container, pod or Slurm labels; "
                    "the exporter needs the host PID namespace (or host /proc mounted and --proc-root)",
                    self.procfs.root, pid, exc,
                )
            return None
        self._mark_readable()
        return parse_cgroup_file(text)

    def _mark_readable(self) -> None:
        with self._lock:
            if self._cgroup_up is False:
                log.info("%s/<pid>/cgroup readable again", self.procfs.root)
            self._cgroup_up = True

    def _allocations(self, gpus: tuple[GpuSample, ...]) -> tuple[GpuAllocation, ...]:
        if self.kubelet is None:
            return ()
        by_index = {g.index: g.uuid for g in gpus}
        # A MIG device's UUID -> its GPU's (NVML lists each GPU's MIG devices).
        mig_parent = {m.uuid: g.uuid for g in gpus for m in g.mig_instances}
        found = []
        for a in self.kubelet.get(by_index):
            if a.uuid.startswith("MIG-GPU-"):  # old-style MIG id "MIG-GPU-<uuid>/<gi>/<ci>": its parent
                a = dataclasses.replace(a, uuid=a.uuid[len("MIG-"):].split("/", 1)[0])
            elif a.uuid in mig_parent:  # the device plugin's MIG-<uuid>; device_id keeps the MIG UUID
                a = dataclasses.replace(a, uuid=mig_parent[a.uuid])
            found.append(a)
        return unique(found)

    def _learn_names(
        self,
        gpus: tuple[GpuSample, ...],
        owners: Mapping[int, CgroupOwner | None],
        allocations: tuple[GpuAllocation, ...],
    ) -> None:
        holders: dict[str, set[tuple[str, str, str]]] = {}
        for a in allocations:
            holders.setdefault(a.uuid, set()).add((a.k8s_namespace, a.k8s_pod, a.k8s_container))
        for gpu in gpus:
            allocated = holders.get(gpu.uuid, set())
            if len(allocated) != 1:
                continue
            in_pods = {
                (o.pod_uid, o.container_id)
                for o in (owners.get(p.pid) for p in gpu.processes)
                if o is not None and o.pod_uid is not None
            }
            if len(in_pods) != 1:
                continue
            (namespace, pod, container), (pod_uid, container_id) = next(iter(allocated)), next(iter(in_pods))
            if len(self._pod_names) >= _MAX_LEARNED or len(self._container_names) >= _MAX_LEARNED:
                self._pod_names.clear()
                self._container_names.clear()
            if pod_uid is not None:
                self._pod_names[pod_uid] = (namespace, pod)
            if container_id is not None:
                self._container_names[container_id] = container

    def _attribute(
        self, proc: GpuProcess, owner: CgroupOwner | None, containers: dict[str, ContainerInfo]
    ) -> GpuProcess:
        if owner is None or not owner.known:
            return proc
        container = proc.container
        cid = owner.container_id
        if cid is not None:
            if cid not in containers:
                lookup = getattr(self.docker, "lookup", None)
                containers[cid] = lookup(cid) if callable(lookup) else ContainerInfo(id=cid, name="", image="")
            container = containers[cid]
        labels = container.labels if container is not None else {}
        namespace, pod, name = (labels.get(key, "") for key in _K8S_LABELS)
        if owner.pod_uid is not None and not pod:
            namespace, pod = self._pod_names.get(owner.pod_uid, ("", ""))
            name = self._container_names.get(cid or "", "") if pod else ""
        new_owner = ProcessOwner(
            k8s_pod_uid=owner.pod_uid or "",
            k8s_namespace=namespace,
            k8s_pod=pod,
            k8s_container=name,
            slurm_job=owner.slurm_job or "",
            slurm_step=owner.slurm_step or "",
            systemd_unit=owner.systemd_unit or "",
        )
        if container == proc.container and new_owner == proc.owner:
            return proc
        return dataclasses.replace(proc, container=container, owner=new_owner)

    # -- self-metrics -------------------------------------------------------------------------------

    def stats(self) -> dict[str, SourceStats]:
        """Per source: up (None before it was first needed) and errors by kind."""
        with self._lock:
            out = {"cgroup": SourceStats(self._cgroup_up, dict(self._cgroup_errors))}
        if self.kubelet is not None:
            out["kubelet"] = self.kubelet.stats()
        return out

    def close(self) -> None:
        for source in (self.docker, self.kubelet):
            close = getattr(source, "close", None)
            if callable(close):
                close()
