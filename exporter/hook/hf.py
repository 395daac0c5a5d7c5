"""Hugging Face Trainer integration: ``Trainer(..., callbacks=[GpuExporterCallback(job="name")])``.

transformers is imported only when the callback is built. Steps are timed from ``on_step_begin``
to ``on_step_end`` (one optimizer step, gradient accumulation included); samples per step come
from the training arguments (per-device batch size x accumulation). The loss is taken from the
Trainer's own log step (``on_log``), where it has already synchronised: no extra device sync.
"""

from __future__ import annotations

import math
from typing import Any

from exporter.hook import start
from exporter.hook.monitor import Monitor


def GpuExporterCallback(job: str | None = None, **start_kwargs: Any) -> Any:  # reads as a class
    """A ``transformers.TrainerCallback`` instance reporting to the GPU exporter."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):  # type: ignore[misc,unused-ignore]
        def __init__(self) -> None:
            self.monitor: Monitor | None = None
            self.samples_per_step: float | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.monitor is None:
                self.monitor = start(
                    job,
                    framework="hf",
                    rank=getattr(args, "process_index", None),
                    local_rank=max(0, int(getattr(args, "local_rank", 0) or 0)),
                    world_size=getattr(args, "world_size", None),
                    **start_kwargs,
                )
            try:
                self.samples_per_step = float(args.per_device_train_batch_size * args.gradient_accumulation_steps)
            except (AttributeError, TypeError):
                self.samples_per_step = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.monitor is not None:
                self.monitor.step_begin()  # batch already fetched: the gap since the last end is data wait

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.monitor is not None:
                self.monitor.step_end(samples=self.samples_per_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            loss = (logs or {}).get("loss")
            if self.monitor is not None and isinstance(loss, (int, float)) and not isinstance(loss, bool):
                self.monitor.observe_loss(float(loss) if math.isfinite(loss) else loss)

    return _Callback()
