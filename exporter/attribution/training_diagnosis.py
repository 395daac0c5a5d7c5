"""What the exporter adds to the hook's reports to diagnose a training incident (issue 16), as a
poller enricher running after the training PID join (so co-tenants carry their job and rank):

- **the GPU each training process uses**: the UUID the hook reported (CUDA), else the GPU on which NVML
  lists the PID with the most memory. Remembered in the store, so it is still known after the GPU fell
  off the bus or the process died;
- **who else held that GPU when it ran out of memory**: when a process's OOM count is higher than the
  one last recorded, the ``MAX_HOLDERS`` largest other processes on its GPU in this poll's snapshot
  (the poll after the push that carried the OOM), with job/rank and container/pod. Kept with the report,
  so it outlives the OOM'd process;
- **a reporting PID that vanished without a word**: after a silence of a few push intervals, /proc is
  asked; a process gone (or a zombie) without an exit report is marked ``vanished`` (SIGKILL, the
  kernel's OOM killer, ``os._exit``, a native crash).

/proc is read under ``--proc-root``; the exporter must see the training PIDs (the host's PID namespace,
as the NVML join needs too). Where it cannot see a process's namespace at all, silence decides nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from exporter.attribution.procfs import ProcFS
from exporter.ingest.store import Holder, IngestStore, OomRecord, ProcessGpu, TrackedProcess
from exporter.snapshot import GpuProcess, NodeSnapshot

MAX_HOLDERS = 3
POD_LABEL = "io.kubernetes.pod.name"
SILENT_PUSH_INTERVALS = 3.0  # a process is asked about after this many push intervals without one...
SILENT_FLOOR_SECONDS = 2.0  # ...and never sooner than this


def silence_limit(push_interval: float | None) -> float:
    return max(SILENT_PUSH_INTERVALS * (push_interval or 1.0), SILENT_FLOOR_SECONDS)


class GpuIndex:
    """One pass over a snapshot: GPU by UUID, and each PID's GPU with the most of its memory."""

    def __init__(self, snapshot: NodeSnapshot) -> None:
        self.by_uuid: dict[str, ProcessGpu] = {}
        self.by_pid: dict[int, tuple[int, ProcessGpu]] = {}
        self.processes: dict[str, tuple[GpuProcess, ...]] = {}
        for gpu in snapshot.gpus:
            ident = ProcessGpu(str(gpu.index), gpu.uuid)
            self.by_uuid[gpu.uuid] = ident
            self.processes[gpu.uuid] = gpu.processes
            for proc in gpu.processes:
                used = proc.used_memory_bytes or 0
                best = self.by_pid.get(proc.pid)
                if best is None or used > best[0]:
                    self.by_pid[proc.pid] = (used, ident)

    def gpu_of(self, uuid: str, pids: Iterable[int]) -> ProcessGpu | None:
        """The GPU with ``uuid``, else the one where any of ``pids`` (host PIDs) holds the most memory."""
        if uuid and uuid in self.by_uuid:
            return self.by_uuid[uuid]
        found = [self.by_pid[p] for p in pids if p in self.by_pid]
        return max(found, key=lambda f: f[0])[1] if found else None

    def holders(self, gpu: ProcessGpu, exclude: Iterable[int]) -> tuple[Holder, ...]:
        """The largest other holders of ``gpu``'s memory, biggest first (one per process)."""
        skip = set(exclude)
        procs = sorted(
            (p for p in self.processes.get(gpu.uuid, ()) if p.pid not in skip),
            key=lambda p: p.used_memory_bytes or 0,
            reverse=True,
        )
        out: list[Holder] = []
        for p in procs:
            if any(h.pid == p.pid for h in out):  # compute + graphics contexts of one process
                continue
            c = p.container
            pod = getattr(p, "pod", None) or (c.labels.get(POD_LABEL, "") if c is not None else "")
            out.append(Holder(p.pid, int(p.used_memory_bytes or 0), p.training_job or "", p.rank or "",
                              c.name if c is not None else "", str(pod)))  # fmt: skip
            if len(out) >= MAX_HOLDERS:
                break
        return tuple(out)


class TrainingDiagnosis:
    """Poller enricher (after the training PID join): teaches the store each process's GPU, its OOM
    co-tenants, and which silent PIDs vanished. Returns the snapshot unchanged."""

    def __init__(
        self,
        store: IngestStore,
        procfs: ProcFS,
        namespace_of: Callable[[int], tuple[int, int] | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._procfs = procfs
        self._namespace_of = namespace_of
        self._clock = clock
        self._own_ns = procfs.pid_namespace("self")

    def __call__(self, snapshot: NodeSnapshot) -> NodeSnapshot:
        tracked = self._store.processes()
        if not tracked:
            return snapshot
        index = GpuIndex(snapshot)
        other_ns: dict[tuple[int, int], int] = {}
        if any(not self._same_ns(p) for p in tracked):  # (namespace, pid inside) -> host PID
            other_ns = {ns: pid for pid in index.by_pid if (ns := self._namespace_of(pid)) is not None}
        now = self._clock()
        for p in tracked:
            r = p.report
            if self._same_ns(p):
                host_pids = [r.pid]
            else:
                found = other_ns.get((r.pid_namespace_inode, r.pid)) if r.pid_namespace_inode is not None else None
                host_pids = [found] if found is not None else []
            facts: dict[str, object] = {}
            gpu = index.gpu_of(r.gpu_uuid, host_pids) or p.gpu
            if gpu is not None and gpu != p.gpu:
                facts["gpu"] = gpu
            ooms = r.counters.get("cuda_oom", 0.0)
            if gpu is not None and ooms > (p.oom.oom_count if p.oom is not None else 0.0):
                facts["oom"] = OomRecord(ooms, gpu, index.holders(gpu, host_pids))
            if p.exit is None and now - p.last_seen > silence_limit(r.push_interval) and self._gone(p) is True:
                facts["vanished_at"] = now
            if facts:
                self._store.learn(r.process_key, **facts)
        return snapshot

    def _same_ns(self, p: TrackedProcess) -> bool:
        ns = p.report.pid_namespace_inode
        return ns is None or self._own_ns is None or ns == self._own_ns

    def _gone(self, p: TrackedProcess) -> bool | None:
        """Has the process ended? None when this exporter cannot tell (it does not see that namespace)."""
        r = p.report
        if self._same_ns(p):
            return self._ended(r.pid)
        seen_ns = False
        for pid in self._procfs.pids():
            if self._procfs.pid_namespace(pid) != r.pid_namespace_inode:
                continue
            seen_ns = True
            if self._procfs.innermost_pid(pid) == r.pid:
                return self._ended(pid)
        return True if seen_ns else None

    def _ended(self, host_pid: int) -> bool | None:
        try:
            return self._procfs.state(host_pid) in ("Z", "X", "x")
        except FileNotFoundError:
            return True
        except OSError:
            return None
