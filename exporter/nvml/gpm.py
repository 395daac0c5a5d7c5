"""GPM (GPU Performance Monitoring, Hopper and newer): ratios between two samples, per GPU or per MIG
GPU instance.

A GPM metric is a rate between two samples, so each source keeps two sample buffers and uses them in
turn: every poll takes one sample into the older buffer and compares it with the newer one. That is
two NVML calls per poll (sample, compare) instead of allocating and freeing a buffer every time.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import pynvml

from exporter.nvml.fields import GPM_METRICS

log = logging.getLogger(__name__)


class GpmSampler:
    """Two sample buffers of one source (a GPU, or one GPU instance of a MIG GPU) for one NVML session."""

    def __init__(self) -> None:
        self._buffers: list[Any] = []
        self._newest: int | None = None  # index of the buffer holding the newest good sample

    def read(self, take: Callable[[Any], Any]) -> dict[str, float] | None:
        """``take(buffer)`` fills a buffer (an nvmlGpmSampleGet-like call; it may raise NVMLError, or
        return None when the field is refused). Returns the ratios since the previous sample, {} on
        the first one, None when this sample could not be taken."""
        if not self._buffers:
            self._buffers = [pynvml.nvmlGpmSampleAlloc(), pynvml.nvmlGpmSampleAlloc()]
        target = 0 if self._newest is None else 1 - self._newest
        if take(self._buffers[target]) is None:
            self._newest = None  # a gap: the next sample starts a new pair
            return None
        previous = self._newest
        self._newest = target
        if previous is None:
            return {}
        return _metrics(self._buffers[previous], self._buffers[target])

    def free(self) -> None:
        for buffer in self._buffers:
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlGpmSampleFree(buffer)
        self._buffers = []
        self._newest = None


def _metrics(older: Any, newer: Any) -> dict[str, float]:
    request = pynvml.c_nvmlGpmMetricsGet_t()
    request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = len(GPM_METRICS)
    request.sample1 = older
    request.sample2 = newer
    for i, metric_id in enumerate(GPM_METRICS.values()):
        request.metrics[i].metricId = metric_id
    try:
        pynvml.nvmlGpmMetricsGet(request)
    except pynvml.NVMLError as exc:
        log.debug("GPM metrics unavailable: %s", exc)
        return {}
    out: dict[str, float] = {}
    for i, name in enumerate(GPM_METRICS):
        metric = request.metrics[i]
        if metric.nvmlReturn == pynvml.NVML_SUCCESS:
            out[name] = min(1.0, max(0.0, metric.value / 100.0))
    return out
