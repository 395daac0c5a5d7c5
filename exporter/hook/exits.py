"""How the training process ends, told to the exporter in the hook's last push.

Three ways out are seen from inside the process, and each is chained to whatever the job installed,
never changing how the process exits:

- an uncaught exception: a ``sys.excepthook`` wrapper notes its type, then calls the previous hook
  (``KeyboardInterrupt`` counts as the signal SIGINT). A job that catches everything and exits via
  ``sys.exit`` (e.g. torch.multiprocessing.spawn's worker wrapper) still reports "exception" when the
  last step raised and none completed after it;
- a terminating signal (SIGTERM, SIGHUP) whose action is the default: our handler notes it, pushes
  the final report (bounded, ~1 s), restores the default action and re-sends the signal, so the process
  still dies *by that signal* (same exit status). A handler the job installs (before or after us) is left
  to decide what the signal means; the end it leads to is reported by the other two paths. So that a
  main thread blocked in C (a hung all-reduce) cannot delay its own termination, a small thread reads
  the signal from ``signal.set_wakeup_fd`` and acts for it; where the job already uses the wakeup fd
  (asyncio), no signal handler is installed at all and a SIGTERM'd process reports nothing (the
  exporter then sees its PID vanish);
- a normal end: the atexit ``stop()`` pushes "normal" (an explicit ``exporter.hook.stop()`` too).

SIGKILL, ``os._exit`` and crashes in native code say nothing; the exporter notices the PID vanished.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from exporter.hook.monitor import Monitor

log = logging.getLogger("exporter.hook")

SIGNALS = ("SIGTERM", "SIGHUP")
_installed: dict[int, Any] = {}  # signal number -> our handler (to recognise it later)
_wakeup: tuple[int, int] | None = None  # (read fd, write fd)
_die_lock = threading.Lock()


def install(mon_getter: Callable[[], Monitor | None], finish: Callable[[], None]) -> None:
    """Chain the excepthook and (from the main thread) the signal handlers. ``finish`` pushes the last
    report (exporter.hook.stop(flush=True)). Never raises."""
    try:
        _install_excepthook(mon_getter)
    except Exception as exc:
        log.debug("gpu-exporter hook: excepthook not chained: %r", exc)
    try:
        _install_signals(mon_getter, finish)
    except Exception as exc:
        log.debug("gpu-exporter hook: signal handlers not installed: %r", exc)


def normal_end(mon: Monitor) -> None:
    """At stop(): unless an exit was already noted, a step that raised last means an exception."""
    if mon.exit is None:
        if mon._step_exc is not None:
            mon.set_exit("exception", mon._step_exc)
        else:
            mon.set_exit("normal")


def _install_excepthook(mon_getter: Callable[[], Monitor | None]) -> None:
    previous = sys.excepthook
    if getattr(previous, "_gpu_exporter_hook", False):
        return

    def excepthook(tp: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        try:
            mon = mon_getter()
            if mon is not None:
                if issubclass(tp, KeyboardInterrupt):
                    mon.set_exit("signal", "SIGINT")
                elif not issubclass(tp, SystemExit):
                    mon.set_exit("exception", tp.__name__)
        except Exception:
            pass
        previous(tp, value, tb)

    excepthook._gpu_exporter_hook = True  # type: ignore[attr-defined]
    sys.excepthook = excepthook


def _install_signals(mon_getter: Callable[[], Monitor | None], finish: Callable[[], None]) -> None:
    global _wakeup
    if threading.current_thread() is not threading.main_thread() or _installed:
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):
        os.close(r)
        os.close(w)
        return
    if old != -1:  # the job (asyncio) owns the wakeup fd: leave signals alone
        signal.set_wakeup_fd(old)
        os.close(r)
        os.close(w)
        return
    _wakeup = (r, w)
    for name in SIGNALS:
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        previous = signal.getsignal(signum)
        if previous is signal.SIG_DFL:
            handler = _default_handler(mon_getter, finish)
        else:  # the job's own handler decides what the signal means; SIG_IGN / C-level: not ours either
            continue
        signal.signal(signum, handler)
        _installed[signum] = handler
    threading.Thread(
        target=_watch_wakeup, args=(r, mon_getter, finish), name="gpu-exporter-hook-signals", daemon=True
    ).start()


def _default_handler(mon_getter: Callable[[], Monitor | None], finish: Callable[[], None]) -> Any:
    def handler(signum: int, frame: FrameType | None) -> None:
        _die_by(signum, mon_getter, finish)

    handler._gpu_exporter_default = True  # type: ignore[attr-defined]
    return handler


def _die_by(signum: int, mon_getter: Callable[[], Monitor | None], finish: Callable[[], None]) -> None:
    """Note the signal, push, then let the default action end the process as it would have."""
    if not _die_lock.acquire(blocking=False):
        return  # the other path (handler or wakeup thread) is doing it
    try:
        mon = mon_getter()
        if mon is not None:
            mon.set_exit("signal", signal.Signals(signum).name)
        finish()
    except Exception:
        pass
    finally:
        _restore_default(signum)
        os.kill(os.getpid(), signum)


def _restore_default(signum: int) -> None:
    """SIG_DFL for ``signum``; from the wakeup thread too, where Python's signal.signal() refuses
    (main thread only): then through libc's signal() directly (the process is about to die by it)."""
    try:
        signal.signal(signum, signal.SIG_DFL)
        return
    except ValueError:
        pass
    except Exception:
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.signal.restype = ctypes.c_void_p
        libc.signal(ctypes.c_int(signum), ctypes.c_void_p(0))  # SIG_DFL


def _watch_wakeup(r: int, mon_getter: Callable[[], Monitor | None], finish: Callable[[], None]) -> None:
    """Acts for our default-action handlers when the main thread cannot run them (blocked in C)."""
    pid = os.getpid()
    while True:
        try:
            data = os.read(r, 64)
        except OSError:
            return
        if not data:
            return
        if os.getpid() != pid:
            return
        for signum in data:
            handler = _installed.get(signum)
            if handler is not None and signal.getsignal(signum) is handler and getattr(
                handler, "_gpu_exporter_default", False
            ):
                _die_by(signum, mon_getter, finish)


def after_fork_in_child() -> None:
    """A forked child must not write its signals into the parent's wakeup pipe (the parent's thread
    would act on them): detach the wakeup fd. The inherited default-action handlers stay harmless."""
    global _wakeup
    if _wakeup is not None:
        with contextlib.suppress(Exception):
            signal.set_wakeup_fd(-1)
        for fd in _wakeup:
            with contextlib.suppress(OSError):
                os.close(fd)
        _wakeup = None
