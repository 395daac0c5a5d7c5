"""Every read of /proc the exporter makes, under one root: ``--proc-root`` (``/host/proc`` when the
exporter runs in a container with the host's /proc mounted there).

The callers ask questions (a PID's cgroup file, its PID namespace, its PID inside that namespace), so
the paths and the parsing of namespace links and ``NSpid`` exist once. Standard library only: the
training hook imports ``namespace_inode`` from here.
"""

from __future__ import annotations

import os
from pathlib import Path


def namespace_inode(link: str) -> int | None:
    """The inode in a namespace link's target (``"pid:[4026531836]"`` → 4026531836), or None."""
    start, end = link.find("["), link.find("]")
    if start < 0 or end <= start:
        return None
    try:
        return int(link[start + 1 : end])
    except ValueError:
        return None


class ProcFS:
    """/proc as seen under ``root``. Methods raise OSError only where the caller must tell "gone"
    (FileNotFoundError) from "not allowed"; the others answer None when the kernel does not say."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._prefix = os.fspath(root)  # string paths: pathlib's joins cost more than the read itself

    def __repr__(self) -> str:
        return f"ProcFS({str(self.root)!r})"

    def cgroup(self, pid: int) -> str:
        """The text of ``<root>/<pid>/cgroup``; raises OSError (FileNotFoundError: the PID is gone)."""
        with open(f"{self._prefix}/{pid}/cgroup") as fh:
            return fh.read()

    def identity(self, pid: int) -> tuple[int, int]:
        """(inode number, change time in ns) of ``<root>/<pid>``: the kernel makes that inode anew for
        a new process with a reused PID, so an equal identity means the same process (a different one
        may still be the same process, its inode made again). One ``stat``; raises OSError
        (FileNotFoundError: the PID is gone)."""
        st = os.stat(f"{self._prefix}/{pid}")
        return st.st_ino, st.st_ctime_ns

    def pid_namespace(self, pid: int | str = "self") -> int | None:
        """Inode of the PID namespace of ``pid`` (``"self"``: the exporter's own), or None."""
        try:
            return namespace_inode(os.readlink(self.root / str(pid) / "ns" / "pid"))
        except OSError:
            return None

    def innermost_pid(self, pid: int) -> int | None:
        """The PID the process has in its own namespace: the last ``NSpid`` entry of its status file
        (the list runs from the host's namespace down to the process's own), or None."""
        try:
            with open(self.root / str(pid) / "status", encoding="utf-8") as fh:
                for line in fh:
                    if line.startswith("NSpid:"):
                        return int(line.split()[-1])
        except (OSError, ValueError, IndexError):
            return None
        return None

    def state(self, pid: int) -> str:
        """The one-letter state of ``pid`` (R, S, D, Z, ...) from its stat file; raises OSError
        (FileNotFoundError: the PID is gone)."""
        stat = (self.root / str(pid) / "stat").read_text()
        end = stat.rfind(")")  # the command name may contain spaces and parentheses
        return stat[end + 2 : end + 3]

    def pids(self) -> list[int]:
        """Every PID under the root (empty when it cannot be listed)."""
        try:
            return [int(name) for name in os.listdir(self.root) if name.isdigit()]
        except OSError:
            return []

    def namespace_of(self, host_pid: int) -> tuple[int, int] | None:
        """(PID-namespace inode, PID inside that namespace) of a host PID; None if unknown."""
        inode = self.pid_namespace(host_pid)
        if inode is None:
            return None
        inner = self.innermost_pid(host_pid)
        return None if inner is None else (inode, inner)
