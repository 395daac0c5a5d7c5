"""PyTorch Lightning integration: ``Trainer(callbacks=[GpuExporterCallback(job="name")])``.

Lightning is imported only when the callback is built (``lightning`` or the older
``pytorch_lightning`` package, whichever the job uses). Steps are timed from batch start to batch
end; the loss is read from ``outputs`` (sampled without a device sync, see Monitor.observe_loss);
an OOM raised in a training step is counted through ``on_exception`` (and the CUDA allocator's
observer counts ones the job catches).
"""

from __future__ import annotations

import importlib
from typing import Any

from exporter.hook import start
from exporter.hook.monitor import Monitor


def _callback_base() -> type:
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name).Callback  # type: ignore[no-any-return,unused-ignore]
        except ImportError:
            continue
    raise ImportError("GpuExporterCallback needs `lightning` or `pytorch_lightning` installed")


def GpuExporterCallback(job: str | None = None, **start_kwargs: Any) -> Any:  # reads as a class
    """A Lightning ``Callback`` instance reporting to the GPU exporter (see module docstring)."""
    base = _callback_base()

    class _Callback(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.monitor: Monitor | None = None

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if self.monitor is None:
                self.monitor = start(
                    job,
                    framework="lightning",
                    rank=getattr(trainer, "global_rank", None),
                    local_rank=getattr(trainer, "local_rank", None),
                    world_size=getattr(trainer, "world_size", None),
                    **start_kwargs,
                )

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.monitor is not None:
                self.monitor.step_begin()  # batch already fetched: the gap since the last end is data wait

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            mon = self.monitor
            if mon is None:
                return
            mon.step_end(samples=_batch_size(batch))
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if loss is not None:
                mon.observe_loss(loss)

        def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
            if self.monitor is not None:
                self.monitor._step_failed(exception)

    return _Callback()


def _batch_size(batch: Any) -> int | None:
    """Length of the first tensor-like element of a batch (what Lightning logs as batch size)."""
    try:
        first = batch
        while isinstance(first, (list, tuple)) and first:
            first = first[0]
        if isinstance(first, dict) and first:
            first = next(iter(first.values()))
        shape = getattr(first, "shape", None)
        return int(shape[0]) if shape else None
    except Exception:
        return None
