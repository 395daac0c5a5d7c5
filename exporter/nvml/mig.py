"""The MIG devices of one GPU in MIG mode: which GPU/compute instances exist, their memory and GPM.

The layout of instances changes only when an administrator re-partitions the GPU, so it is
enumerated once and then every ``REFRESH_SECONDS`` (or at once when a MIG handle stops answering);
a poll in between costs one memory call and, on Hopper and newer, two GPM calls per GPU instance
(its compute instances share both). Processes are attributed to their instance from the process list
itself (its ``gpuInstanceId`` / ``computeInstanceId``), not here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynvml

from exporter.nvml.gpm import GpmSampler
from exporter.snapshot import MigInstance

log = logging.getLogger(__name__)

REFRESH_SECONDS = 60.0
# Return codes of a MIG call meaning "that instance is gone / never was": re-enumerate.
_GONE = frozenset({pynvml.NVML_ERROR_NOT_FOUND, pynvml.NVML_ERROR_INVALID_ARGUMENT})
_ABSENT = frozenset({pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
                     pynvml.NVML_ERROR_NO_PERMISSION})


@dataclass(frozen=True, slots=True)
class _MigDevice:
    handle: Any
    gpu_instance: int
    compute_instance: int
    uuid: str
    profile: str | None


def profile_from_name(name: str) -> str | None:
    """``"NVIDIA H100 80GB HBM3 MIG 1g.10gb"`` -> ``"1g.10gb"`` (the name NVML gives a MIG device)."""
    _, sep, tail = name.rpartition(" MIG ")
    return tail.strip() or None if sep else None


class MigReader:
    """One GPU's MIG devices for one NVML session."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._devices: list[_MigDevice] | None = None
        self._enumerated_at = 0.0
        self._gpm: dict[int, GpmSampler] = {}  # by GPU instance id

    def read(self, parent: Any, gpm_supported: bool) -> tuple[MigInstance, ...]:
        """The MIG devices of ``parent`` with memory and (``gpm_supported``) GPM ratios. NVML errors
        that concern the whole GPU propagate (the caller marks it down)."""
        now = self._monotonic()
        if self._devices is None or now - self._enumerated_at >= REFRESH_SECONDS:
            self._devices = self._enumerate(parent)
            self._enumerated_at = now
        out = []
        gone = False
        gpm: dict[int, dict[str, float]] = {}
        if gpm_supported:
            for gi in sorted({d.gpu_instance for d in self._devices}):
                ratios = self._gpm_ratios(parent, gi)
                if ratios:
                    gpm[gi] = ratios
        memory: dict[int, tuple[int | None, int | None]] = {}  # by GPU instance: its CIs share it
        for d in self._devices:
            if d.gpu_instance in memory:
                used, total = memory[d.gpu_instance]
            else:
                used = total = None
                try:
                    mem = pynvml.nvmlDeviceGetMemoryInfo(d.handle)
                    used, total = int(mem.used), int(mem.total)
                except pynvml.NVMLError as exc:
                    if exc.value in _GONE:
                        gone = True
                        continue
                    if exc.value not in _ABSENT:
                        raise
                memory[d.gpu_instance] = (used, total)
            out.append(MigInstance(gpu_instance=d.gpu_instance, compute_instance=d.compute_instance,
                                   uuid=d.uuid, profile=d.profile, memory_used_bytes=used,
                                   memory_total_bytes=total, gpm_ratios=gpm.get(d.gpu_instance, {})))
        if gone:
            self._devices = None  # re-partitioned: enumerate again on the next poll
        return tuple(out)

    def close(self) -> None:
        for sampler in self._gpm.values():
            sampler.free()
        self._gpm.clear()
        self._devices = None

    def _gpm_ratios(self, parent: Any, gpu_instance: int) -> dict[str, float]:
        sampler = self._gpm.setdefault(gpu_instance, GpmSampler())

        def take(buffer: Any) -> Any:
            try:
                return pynvml.nvmlGpmMigSampleGet(parent, gpu_instance, buffer)
            except pynvml.NVMLError as exc:
                if exc.value in _ABSENT or exc.value in _GONE:
                    return None
                raise

        return sampler.read(take) or {}

    def _enumerate(self, parent: Any) -> list[_MigDevice]:
        devices: list[_MigDevice] = []
        try:
            count = pynvml.nvmlDeviceGetMaxMigDeviceCount(parent)
        except pynvml.NVMLError as exc:
            if exc.value in _ABSENT:
                return devices
            raise
        for index in range(count):
            try:
                handle = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(parent, index)
                devices.append(_MigDevice(
                    handle=handle,
                    gpu_instance=pynvml.nvmlDeviceGetGpuInstanceId(handle),
                    compute_instance=pynvml.nvmlDeviceGetComputeInstanceId(handle),
                    uuid=pynvml.nvmlDeviceGetUUID(handle),
                    profile=profile_from_name(pynvml.nvmlDeviceGetName(handle)),
                ))
            except pynvml.NVMLError as exc:
                if exc.value in _GONE or exc.value in _ABSENT:
                    continue  # no MIG device at this index
                raise
        live = {d.gpu_instance for d in devices}
        for gi in [gi for gi in self._gpm if gi not in live]:
            self._gpm.pop(gi).free()
        log.debug("MIG: %d devices", len(devices))
        return devices
