"""A /proc folder built by a test: just the files exporter.attribution.procfs reads (``<pid>/cgroup``,
``<pid>/status`` with ``NSpid``, the ``<pid>/ns/pid`` link), so ``--proc-root`` can be pointed at it."""

from __future__ import annotations

import os
from pathlib import Path


def fake_proc_root(
    root: Path,
    *,
    own_namespace: int,
    namespaces: dict[int, tuple[int, int]] | None = None,
    cgroups: dict[int, str] | None = None,
) -> Path:
    """``namespaces``: host PID → (PID-namespace inode, PID inside it); ``cgroups``: host PID → the text of
    its cgroup file. ``self`` is in ``own_namespace``. Returns ``root``."""
    (root / "self" / "ns").mkdir(parents=True, exist_ok=True)
    os.symlink(f"pid:[{own_namespace}]", root / "self" / "ns" / "pid")
    for pid, (inode, inner) in (namespaces or {}).items():
        (root / str(pid) / "ns").mkdir(parents=True, exist_ok=True)
        os.symlink(f"pid:[{inode}]", root / str(pid) / "ns" / "pid")
        (root / str(pid) / "status").write_text(f"Name:\tpython\nPid:\t{pid}\nNSpid:\t{pid}\t{inner}\n")
    for pid, text in (cgroups or {}).items():
        (root / str(pid)).mkdir(parents=True, exist_ok=True)
        (root / str(pid) / "cgroup").write_text(text)
    return root
