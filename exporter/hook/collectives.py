"""Timing DDP's collectives apart from a rank's own work, so a straggler stands out.

Under synchronous DDP every rank's step lasts as long as the slowest rank's: the fast ranks wait in
the collectives. Step time alone therefore cannot name the slow rank; the waits can. Two places where
a DDP rank waits for its peers are timed, with DDP's own C++ all-reduce (and any comm hook the job
registered) left untouched:

- **the gradient all-reduce** at the end of backward. A post-accumulate-grad hook on the parameter
  whose gradient is ready first (the last registered one: DDP's own bucket order relies on the same
  assumption) queues an autograd-engine final callback; final callbacks run once every gradient is
  computed, in the order queued, so ours runs before DDP's ``finalize_backward`` (queued when the last
  bucket became ready) and marks the end of the rank's own backward work; it queues a second callback,
  which runs after DDP has waited for the all-reduce. The time between the two is the rank's wait for
  its peers (plus the last bucket's transfer);
- **the buffer broadcast** before the forward pass (``broadcast_buffers``, e.g. BatchNorm statistics): a
  forward pre-hook on the DDP module starts it, one on the wrapped module (called after DDP's sync) ends it.

Both add to ``training_collective_wait_seconds_total`` (inside a step); step time minus it is the rank's
own work. On CPU (gloo) the host blocks in these waits and host time is exact. On CUDA the host does not
block (the device does), so the all-reduce wait is measured on the device with two CUDA events recorded
in those callbacks and read by the sender thread once completed (``Event.query()``, then
``elapsed_time``): no device synchronisation. The CUDA path has not been run on a GPU in CI
(benchmarks/gpu_check exercises it when one is lent). Cost: five Python calls per step, all hooks
registered once (benchmarks/hook_overhead.py measures it).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from exporter.hook import cuda as _cuda

if TYPE_CHECKING:
    from exporter.hook.progress import Progress


def register(mon: Progress, model: Any) -> None:
    """Attach the timing hooks to ``model`` (a DistributedDataParallel)."""
    from exporter.hook.progress import COLLECTIVE, COMPUTE, _perf

    torch = _cuda.torch_module()
    if torch is None:
        raise RuntimeError("torch is not imported")
    engine = torch.autograd.Variable._execution_engine
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter that requires grad")
    first_ready = params[-1]
    on_cuda = bool(getattr(first_ready, "is_cuda", False))

    def backward_done() -> None:  # 2nd final callback: DDP has waited for its all-reduce
        t = _perf()
        mon._coll_done = t
        if on_cuda:
            timer = mon._device_timer
            if timer is not None:
                timer.end()
        if mon.phase == COLLECTIVE:
            mon.phase = COMPUTE
            mon.phase_since = t

    def gradients_done() -> None:  # 1st final callback: this rank's own backward work is done
        t = _perf()
        mon._coll_launch = t
        mon.phase = COLLECTIVE
        mon.phase_since = t
        if on_cuda:
            timer = mon._device_timer
            if timer is None:
                timer = mon._device_timer = DeviceTimer()
            timer.start()
        engine.queue_callback(backward_done)

    def grad_ready(param: Any) -> None:
        engine.queue_callback(gradients_done)

    first_ready.register_post_accumulate_grad_hook(grad_ready)
    inner = getattr(model, "module", None)
    if inner is None:
        return

    def before_sync(module: Any, args: Any) -> None:
        t = _perf()
        mon._fwd_sync_start = t
        mon.phase = COLLECTIVE
        mon.phase_since = t

    def after_sync(module: Any, args: Any) -> None:
        start = mon._fwd_sync_start
        if start is None:
            return
        t = _perf()
        mon._fwd_sync_start = None
        if mon._t_begin is not None:  # inside a step: a wait, not the rank's own work
            mon._coll_extra += t - start
        mon.phase = COMPUTE
        mon.phase_since = t

    model.register_forward_pre_hook(before_sync)
    inner.register_forward_pre_hook(after_sync)


class DeviceTimer:
    """Device-side all-reduce wait: an event when the gradients are done, one after DDP's wait.

    ``collect()`` (sender thread) sums the pairs whose end event has completed and drops them; at most
    ``MAX_PENDING`` pairs are kept, so a device that stopped never grows memory.
    """

    MAX_PENDING = 8

    def __init__(self) -> None:
        self._pending: deque[tuple[Any, Any]] = deque(maxlen=self.MAX_PENDING)
        self._start: Any = None

    def start(self) -> None:
        torch = _cuda.torch_module()
        if torch is not None:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()  # on the current stream: after the backward kernels

    def end(self) -> None:
        torch = _cuda.torch_module()
        if torch is not None and self._start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()  # the current stream waits for the all-reduce here (DDP's finalize)
            self._pending.append((self._start, end))
            self._start = None

    def collect(self) -> float:
        """Seconds of completed device-side collective waits since the last call (never blocks)."""
        total = 0.0
        while self._pending:
            start, end = self._pending[0]
            try:
                if not end.query():
                    break
                total += max(0.0, start.elapsed_time(end) / 1000.0)
            except Exception:
                pass
            self._pending.popleft()
        return total
