"""Each GPU process's cgroup owner, remembered between polls instead of read and parsed every poll.

A process's cgroup practically never changes, yet reading and parsing ``/proc/<pid>/cgroup`` for every
GPU process each poll was a third of the exporter's idle CPU at 8 GPUs x 32 processes. An entry is used
only while the PID is still the same process and for at most ``RECHECK_SECONDS`` after its read:

- **the same process**: the identity of the PID's /proc directory (``ProcFS.identity``: inode number and
  change time). The kernel makes that inode when the directory is first looked up and drops it when the
  task exits, so a new process that reuses the PID gets a new one; a live process whose inode was
  evicted and made again only costs a re-read. One ``stat`` per PID instead of an open/read/close and
  a parse;
- **a process moved to another cgroup** (pam_slurm_adopt, a runtime's exec, an admin's echo into
  ``cgroup.procs``) is seen at the first poll ``RECHECK_SECONDS`` after the last read;
- **a PID with no /proc entry** (the process exited and NVML still lists it, or it lives in a PID
  namespace the exporter does not see, as do the simulator's made-up PIDs) is asked again after
  ``RECHECK_SECONDS``, not every poll: a process can only reuse that PID after the old one is gone, and
  it then gets no owner for at most that long, never the old one's;
- **bounded**: the table holds only the PIDs of the last poll (a PID NVML stopped listing is dropped
  with that poll) and at most ``MAX_ENTRIES`` of them.

An unreadable cgroup file is not remembered: it is read again next poll, and counted, as before.
"""

from __future__ import annotations

from typing import NamedTuple

from exporter.attribution.cgroups import CgroupOwner

RECHECK_SECONDS = 30.0
MAX_ENTRIES = 4096


class CachedOwner(NamedTuple):
    identity: tuple[int, int] | None  # ProcFS.identity(pid) when read; None: the PID had no /proc entry
    read_at: float  # the engine's clock (monotonic seconds)
    owner: CgroupOwner | None


class OwnerCache:
    """PID → ``CachedOwner`` for the PIDs of the current poll; ``begin_poll`` … ``get``/``put`` …
    ``end_poll`` around each poll, which drops every PID that poll did not ask about. The caller
    compares identities: an entry is only as good as its ``identity`` matching the PID's now."""

    def __init__(self, recheck_seconds: float = RECHECK_SECONDS, max_entries: int = MAX_ENTRIES) -> None:
        self.recheck_seconds = recheck_seconds
        self.max_entries = max_entries
        self._entries: dict[int, CachedOwner] = {}
        self._next: dict[int, CachedOwner] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def begin_poll(self) -> None:
        self._next = {}

    def get(self, pid: int, now: float) -> CachedOwner | None:
        """The PID's entry if not older than ``recheck_seconds`` (kept for the next poll unless ``put``
        replaces it); None: ask /proc."""
        hit = self._entries.get(pid)
        if hit is None or now - hit.read_at >= self.recheck_seconds:
            return None
        self._next[pid] = hit
        return hit

    def put(self, pid: int, identity: tuple[int, int] | None, now: float, owner: CgroupOwner | None) -> None:
        if len(self._next) < self.max_entries:
            self._next[pid] = CachedOwner(identity, now, owner)

    def end_poll(self) -> None:
        self._entries, self._next = self._next, {}
