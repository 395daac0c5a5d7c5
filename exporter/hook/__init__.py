"""Training hook: report a PyTorch job's progress, memory, OOMs and auth health to the GPU exporter.

Two lines in a plain training loop::

    import exporter.hook as gpu_hook
    mon = gpu_hook.start(job="resnet-finetune")
    for batch in loader:
        with mon.step(samples=len(batch)):
            loss = train_step(batch)
        mon.observe_loss(loss)

The training thread only records into memory; a daemon thread pushes cumulative snapshots to
``GPU_EXPORTER_URL`` (default http://127.0.0.1:9835) + /api/v1/training. This package imports only
the standard library (it uses the ``torch`` the job already imported, and never initialises CUDA).
Lightning: :mod:`exporter.hook.lightning`; Hugging Face Trainer: :mod:`exporter.hook.hf`.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import weakref

from exporter.hook import exits as _exits
from exporter.hook.auth import auth_status, auth_status_from_response, jwt_expiry
from exporter.hook.env import HOOK_ENV, JOB_ENV, PUSH_INTERVAL_ENV, URL_ENV
from exporter.hook.monitor import Monitor
from exporter.hook.sender import Sender

__all__ = [
    "Monitor",
    "auth_status",
    "auth_status_from_response",
    "current",
    "jwt_expiry",
    "start",
    "stop",
]

log = logging.getLogger("exporter.hook")

DEFAULT_URL = "http://127.0.0.1:9835"
_DISABLED_VALUES = frozenset({"0", "false", "off", "no"})

_lock = threading.Lock()
_current: Monitor | None = None
_senders: weakref.WeakKeyDictionary[Monitor, Sender] = weakref.WeakKeyDictionary()


def start(
    job: str | None = None,
    *,
    url: str | None = None,
    interval: float | None = None,
    rank: int | str | None = None,
    local_rank: int | str | None = None,
    world_size: int | str | None = None,
    framework: str = "plain",
    device: int | None = None,
    loss_every: int = 10,
    flops_per_step: float | None = None,
    peak_flops: float | None = None,
) -> Monitor:
    """Start (once per process) the monitor and its sender thread; later calls return the same one.

    ``job`` defaults to ``GPU_EXPORTER_JOB`` or the script name; rank / local_rank / world_size to
    the torch.distributed env (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``). ``interval`` (default
    ``GPU_EXPORTER_PUSH_INTERVAL`` or 1 s) is the push period. ``GPU_EXPORTER_HOOK=0`` records in
    memory but sends nothing. Never raises.
    """
    global _current
    with _lock:
        if _current is not None and _current.pid == os.getpid():
            return _current
        name = job or os.environ.get(JOB_ENV) or _script_name()
        mon = Monitor(
            name,
            rank=rank,
            local_rank=local_rank,
            world_size=world_size,
            framework=framework,
            device=device,
            loss_every=loss_every,
            flops_per_step=flops_per_step,
            peak_flops=peak_flops,
        )
        _current = mon
        if os.environ.get(HOOK_ENV, "1").strip().lower() in _DISABLED_VALUES:
            mon._silent = True
            return mon
        try:
            period = interval if interval is not None else float(os.environ.get(PUSH_INTERVAL_ENV, "1"))
        except ValueError:
            period = 1.0
        sender = Sender(mon, url or os.environ.get(URL_ENV) or DEFAULT_URL, interval=period)
        mon.push_interval = sender.interval
        _senders[mon] = sender
        _exits.install(current, stop)  # issue 16: how the process ends goes into the last push
        try:
            sender.start()
        except Exception as exc:  # e.g. no threads left: keep recording, never fail training
            log.warning("gpu-exporter hook: could not start the sender thread: %r", exc)
        return mon


def current() -> Monitor | None:
    """The running monitor :func:`start` created in this process, if any (None after :func:`stop`)."""
    return _current if _current is not None and _current.pid == os.getpid() else None


def stop(flush: bool = True) -> None:
    """Stop the sender; with ``flush`` push the final counters (bounded to ~1 s). Called at exit."""
    global _current
    mon = current()
    if mon is None:
        return
    with _lock:
        _current = None
    _exits.normal_end(mon)  # unless an exception or signal was noted first
    sender = _senders.pop(mon, None)
    if sender is not None:
        try:
            sender.stop(flush=flush)
        except Exception as exc:
            log.debug("gpu-exporter hook: stop failed: %r", exc)


def _script_name() -> str:
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    base = os.path.basename(argv0)
    if base in ("-c", "-m", "__main__.py"):
        return "python"
    return base[:-3] if base.endswith(".py") else base


def _after_fork_in_child() -> None:
    """A forked child (e.g. a DataLoader worker) inherits the monitor but not its sender thread:
    it stays silent, and a ``start()`` in the child gets a fresh monitor of its own."""
    global _current, _lock
    _lock = threading.Lock()
    mon = _current
    if mon is not None:
        mon._after_fork_in_child()
    _current = None
    _senders.clear()
    _exits.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(stop)
