"""The training thread's phase and the push fields of issue 16 (phase, collective waits, exit).

The phase is an int code (index into schema.PHASES) and a perf_counter time, set by the hot path in
exporter.hook.monitor with two attribute writes; the sender thread turns them into the push.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from exporter.hook import cuda as _cuda
from exporter.hook.schema import MAX_LABEL_LENGTH, PHASES

if TYPE_CHECKING:
    from exporter.hook.monitor import Monitor

BETWEEN_STEPS, DATA, COMPUTE, COLLECTIVE, CHECKPOINT = range(len(PHASES))
_perf = time.perf_counter


class Progress:
    """Monitor's issue-16 state and methods (a mixin, so monitor.py stays one screenful of hot path).

    The training thread writes these attributes without the lock (single writes); the sender thread
    reads them, and a torn read costs one push a stale phase.
    """

    _lock: threading.Lock
    _t_begin: float | None

    def _warn_once(self, key: str, message: str) -> None: ...

    def _init_progress(self) -> None:
        self._wall_offset = time.time() - _perf()  # perf_counter -> Unix time for the phase start
        self.step_index = 0  # steps begun, failed ones included
        self.phase = BETWEEN_STEPS
        self.phase_since = _perf()
        self._uses_data_ready = False  # then the time between steps is not data wait
        self.collective_wait_seconds = 0.0
        self._coll_launch: float | None = None  # watch_ddp: this step's own gradients were done
        self._coll_done = 0.0  # watch_ddp: DDP's wait for the all-reduce was over
        self._coll_extra = 0.0  # this step's other timed collective waits (DDP's pre-forward sync)
        self._fwd_sync_start: float | None = None
        self._coll_device_wait = 0.0  # CUDA-event-timed collective waits not yet pushed (sender side)
        self._step_exc: str | None = None  # type of the exception the last step raised, until one completes
        self.exit: tuple[str, str, float] | None = None  # (reason, detail, Unix time), set once
        self.push_interval: float | None = None
        self._device_timer: Any = None  # collectives.DeviceTimer on CUDA

    def checkpoint(self) -> PhaseContext:
        """``with mon.checkpoint(): save(...)``: the rank is checkpointing (a stall alert waits longer)."""
        return PhaseContext(self, CHECKPOINT)

    def collective(self) -> PhaseContext:
        """``with mon.collective(): dist.barrier()``: waiting for the other ranks (inside a step: a wait,
        not the rank's own work). DDP's own collectives are timed by :meth:`watch_ddp`."""
        return PhaseContext(self, COLLECTIVE)

    def watch_ddp(self, model: Any) -> bool:
        """Time a DistributedDataParallel ``model``'s waits for the other ranks apart from this rank's own
        work (exporter.hook.collectives; DDP's all-reduce and comm hooks stay as they are). False (logged
        once) where it could not attach."""
        from exporter.hook import collectives

        try:
            collectives.register(self, model)
            return True
        except Exception as exc:
            self._warn_once("watch_ddp", f"could not time DDP's collectives ({exc!r})")
            return False

    def set_exit(self, reason: str, detail: str = "") -> None:
        """Record how this process ends (first call wins; exporter.hook.exits calls it)."""
        if self.exit is None:
            self.exit = (reason, str(detail)[:MAX_LABEL_LENGTH], time.time())


class PhaseContext:
    """``with mon.checkpoint():`` / ``with mon.collective():``: marks a phase, then restores the one before.

    A collective marked inside a step counts as waiting for the other ranks (not the rank's own work).
    """

    __slots__ = ("_code", "_mon", "_saved")

    def __init__(self, mon: Progress, code: int) -> None:
        self._mon = mon
        self._code = code
        self._saved: list[tuple[int, float]] = []  # a stack: phases may nest

    def __enter__(self) -> Progress:
        mon = self._mon
        self._saved.append((mon.phase, _perf()))
        mon.phase = self._code
        mon.phase_since = self._saved[-1][1]
        return mon

    def __exit__(self, *exc: object) -> None:
        mon = self._mon
        previous, t0 = self._saved.pop() if self._saved else (BETWEEN_STEPS, _perf())
        now = _perf()
        mon.phase = previous
        mon.phase_since = now
        if self._code == COLLECTIVE and mon._t_begin is not None:
            with mon._lock:
                mon.collective_wait_seconds += now - t0



def payload_fields(mon: Monitor, counters: dict[str, float], gauges: dict[str, float | None]) -> dict[str, Any]:
    """Issue 16's part of a push (sender thread): waits, phase start, phase, push interval, exit."""
    timer = mon._device_timer
    if timer is not None:
        mon._coll_device_wait += timer.collect()  # CUDA-event-timed waits that have completed
    with mon._lock:
        counters["collective_wait_seconds"] = mon.collective_wait_seconds + mon._coll_device_wait
    gauges["phase_start_timestamp_seconds"] = mon.phase_since + mon._wall_offset
    out: dict[str, Any] = {"phase": PHASES[mon.phase]}
    uuid = _cuda.device_uuid(mon._device)  # ties an OOM to its GPU; sent only on CUDA (older exporters)
    if uuid:
        out["gpu_uuid"] = uuid
    if mon.push_interval is not None:
        out["push_interval_seconds"] = mon.push_interval
    if mon.exit is not None:
        reason, detail, when = mon.exit
        out["exit"] = {"reason": reason, "detail": detail, "timestamp": when}
    return out
