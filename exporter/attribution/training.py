"""The training PID join: label NVML's GPU processes with the job and rank (and, under Slurm, the
``SLURM_JOB_ID``) of the training process that reported that PID through the hook (exporter.ingest),
across PID namespaces.

A hook in a container reports the PID it sees and the inode of its PID namespace; NVML reports the
exporter's (host) view. A report from the exporter's own namespace matches by PID; any other is
matched through procfs: a host PID's namespace and its PID inside it (``NSpid``), read under
``--proc-root`` and cached for a while per PID.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from exporter.attribution.procfs import ProcFS
from exporter.snapshot import GpuProcess, GpuSample, NodeSnapshot, ProcessOwner

NAMESPACE_CACHE_SECONDS = 30.0
NAMESPACE_CACHE_ENTRIES = 4096


class PidClaim(Protocol):
    """What a training process said about itself (exporter.ingest.validate.TrainingReport has it)."""

    @property
    def pid(self) -> int: ...
    @property
    def pid_namespace_inode(self) -> int | None: ...
    @property
    def training_job(self) -> str: ...
    @property
    def rank(self) -> str: ...


class TrainingJoin:
    """Poller enricher: sets ``GpuProcess.training_job`` / ``rank`` for PIDs a training process claimed.

    ``claims`` returns the live claims (the ingest store's reports); ``procfs`` is the host's /proc.
    """

    def __init__(
        self,
        claims: Callable[[], Iterable[PidClaim]],
        procfs: ProcFS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._claims = claims
        self._procfs = procfs
        self._clock = clock
        self._own_ns = self._procfs.pid_namespace("self")
        self._ns_cache: dict[int, tuple[float, tuple[int, int] | None]] = {}

    def __call__(self, snapshot: NodeSnapshot) -> NodeSnapshot:
        if not snapshot.gpus:
            return snapshot
        same_ns: dict[int, PidClaim] = {}
        other_ns: dict[tuple[int, int], PidClaim] = {}
        for claim in self._claims():
            ns = claim.pid_namespace_inode
            if ns is None or self._own_ns is None or ns == self._own_ns:
                same_ns[claim.pid] = claim
            else:
                other_ns[(ns, claim.pid)] = claim
        if not same_ns and not other_ns:
            return snapshot
        changed = False
        gpus: list[GpuSample] = []
        for gpu in snapshot.gpus:
            procs: list[GpuProcess] = []
            gpu_changed = False
            for proc in gpu.processes:
                match = same_ns.get(proc.pid)
                if match is None and other_ns:
                    ns_pid = self._namespace_of(proc.pid)
                    match = other_ns.get(ns_pid) if ns_pid is not None else None
                if match is not None:
                    proc = dataclasses.replace(proc, training_job=match.training_job, rank=match.rank)
                    slurm_job = getattr(match, "slurm_job", "")  # TrainingReport has it; under Slurm only
                    if slurm_job and not (proc.owner and proc.owner.slurm_job):
                        # The cgroup did not say (no Slurm cgroup plugin, or unreadable): the hook does.
                        owner = dataclasses.replace(proc.owner or ProcessOwner(), slurm_job=slurm_job)
                        proc = dataclasses.replace(proc, owner=owner)
                    gpu_changed = changed = True
                procs.append(proc)
            gpus.append(dataclasses.replace(gpu, processes=tuple(procs)) if gpu_changed else gpu)
        return dataclasses.replace(snapshot, gpus=tuple(gpus)) if changed else snapshot

    def namespace_of(self, host_pid: int) -> tuple[int, int] | None:
        """(namespace inode, PID inside) of a host PID, cached (exporter.attribution.training_diagnosis
        shares this cache)."""
        return self._namespace_of(host_pid)

    def _namespace_of(self, host_pid: int) -> tuple[int, int] | None:
        now = self._clock()
        hit = self._ns_cache.get(host_pid)
        if hit is not None and now - hit[0] < NAMESPACE_CACHE_SECONDS:
            return hit[1]
        value = self._procfs.namespace_of(host_pid)
        if len(self._ns_cache) > NAMESPACE_CACHE_ENTRIES:
            self._ns_cache.clear()
        self._ns_cache[host_pid] = (now, value)
        return value
