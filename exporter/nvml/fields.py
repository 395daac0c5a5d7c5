"""What each NVML reading means: the enum tables (architectures, clocks, thresholds, clock-event
reasons, ECC, page retirement, GPM metrics), the readers of fields that take several calls or a
fallback (the board constants, the process lists), and the conversion of NVML's units into base
units (``scaled``). Batched field values live in exporter.nvml.field_values.

Every function takes a ``FieldReader`` (exporter.nvml.errors), so "not supported" stays absent.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import pynvml

from exporter.nvml.errors import FIELD_LEVEL_ERRORS, FieldReader

ARCHITECTURES = {
    pynvml.NVML_DEVICE_ARCH_KEPLER: "kepler",
    pynvml.NVML_DEVICE_ARCH_MAXWELL: "maxwell",
    pynvml.NVML_DEVICE_ARCH_PASCAL: "pascal",
    pynvml.NVML_DEVICE_ARCH_VOLTA: "volta",
    pynvml.NVML_DEVICE_ARCH_TURING: "turing",
    pynvml.NVML_DEVICE_ARCH_AMPERE: "ampere",
    pynvml.NVML_DEVICE_ARCH_ADA: "ada",
    pynvml.NVML_DEVICE_ARCH_HOPPER: "hopper",
    pynvml.NVML_DEVICE_ARCH_BLACKWELL: "blackwell",
}
# GPM exists from Hopper on; unknown (newer) architectures are asked.
PRE_GPM_ARCHITECTURES = frozenset(ARCHITECTURES.values()) - {"hopper", "blackwell"}
_CLOCKS = {"graphics": pynvml.NVML_CLOCK_GRAPHICS, "sm": pynvml.NVML_CLOCK_SM, "memory": pynvml.NVML_CLOCK_MEM}
_THRESHOLDS = {
    "shutdown": pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN,
    "slowdown": pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
    "memory_max": pynvml.NVML_TEMPERATURE_THRESHOLD_MEM_MAX,
    "gpu_max": pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX,
}
# Clock-event (throttle) reason bits, named as in docs/metrics.md (the simulator encodes with it too).
CLOCK_EVENT_REASONS = {
    "gpu_idle": pynvml.nvmlClocksEventReasonGpuIdle,
    "applications_clocks_setting": pynvml.nvmlClocksEventReasonApplicationsClocksSetting,
    "sw_power_cap": pynvml.nvmlClocksEventReasonSwPowerCap,
    "hw_slowdown": pynvml.nvmlClocksEventReasonHwSlowdown,
    "sync_boost": pynvml.nvmlClocksEventReasonSyncBoost,
    "sw_thermal_slowdown": pynvml.nvmlClocksEventReasonSwThermalSlowdown,
    "hw_thermal_slowdown": pynvml.nvmlClocksEventReasonHwThermalSlowdown,
    "hw_power_brake_slowdown": pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown,
    "display_clock_setting": pynvml.nvmlClocksEventReasonDisplayClockSetting,
}
_ECC_ERROR_TYPES = {"corrected": pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                    "uncorrected": pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED}
_ECC_COUNTERS = {"volatile": pynvml.NVML_VOLATILE_ECC, "aggregate": pynvml.NVML_AGGREGATE_ECC}
_RETIREMENT_CAUSES = {
    "single_bit_ecc": pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
    "double_bit_ecc": pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR,
}
GPM_METRICS = {
    "sm_active": pynvml.NVML_GPM_METRIC_SM_UTIL,
    "tensor_active": pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL,
    "dram_bandwidth": pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL,
}
PSTATE_UNKNOWN = 32


def device_address(handle: Any) -> int:
    """A device handle's pointer value: a stable key for the GPU within one NVML session."""
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


def scaled(value: float | None, *, times: float = 1.0, per: float = 1.0) -> float | None:
    """An optional NVML reading in base units: ``value * times / per`` (e.g. ``per=1000`` for mW → W,
    ``per=100`` for percent → ratio, ``times=1000`` for KB/s → B/s); None stays None."""
    return None if value is None else value * times / per


def read_memory(r: FieldReader) -> tuple[int | None, int | None, int | None, int | None]:
    """(used, free, total, reserved): v2 separates the driver's reservation from "used"; drivers
    without it only have v1, where "used" includes the reservation and it is not known apart."""
    try:
        mem = pynvml.nvmlDeviceGetMemoryInfo(r.handle, version=pynvml.nvmlMemory_v2)
        return int(mem.used), int(mem.free), int(mem.total), int(mem.reserved)
    except pynvml.NVMLError as exc:
        if exc.value not in FIELD_LEVEL_ERRORS:
            raise
    mem = r.get("memory_used_bytes", pynvml.nvmlDeviceGetMemoryInfo)
    if mem is None:
        r.unsupported |= {"memory_used_bytes", "memory_free_bytes", "memory_total_bytes",
                          "memory_reserved_bytes"}
        return None, None, None, None
    r.unsupported.add("memory_reserved_bytes")
    return int(mem.used), int(mem.free), int(mem.total), None

def read_thresholds(r: FieldReader) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, threshold in _THRESHOLDS.items():
        value = r.get("temperature_thresholds_celsius", pynvml.nvmlDeviceGetTemperatureThreshold, threshold)
        if value:
            out[name] = float(value)
    if out:
        r.unsupported.discard("temperature_thresholds_celsius")  # some thresholds are, some aren't
    return out

def read_clocks(r: FieldReader, field: str, fn: Callable[..., int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, clock in _CLOCKS.items():
        mhz = r.get(field, fn, clock)
        if mhz is not None:
            out[name] = mhz * 1e6
    if out:
        r.unsupported.discard(field)
    return out

def read_clock_event_reasons(r: FieldReader, supported: int | None) -> dict[str, bool]:
    """Active reasons among those the board supports (``Board.supported_reasons``; None: all)."""
    active = r.get("clock_event_reasons", pynvml.nvmlDeviceGetCurrentClocksEventReasons)
    if active is None:
        return {}
    if supported is None:
        supported = sum(CLOCK_EVENT_REASONS.values())
    return {name: bool(active & bit) for name, bit in CLOCK_EVENT_REASONS.items() if supported & bit}


@dataclass(frozen=True, slots=True)
class Board:
    """What does not change while the driver is loaded, read once per GPU and NVML session: temperature
    thresholds, maximum clocks, supported clock-event reasons, PCIe link maxima; ``unsupported`` names
    those NVML refused (absent every poll)."""

    thresholds: dict[str, float]
    clocks_max: dict[str, float]
    supported_reasons: int | None
    pcie_generation_max: int | None
    pcie_generation_device_max: int | None
    pcie_width_max: int | None
    unsupported: frozenset[str]


def read_board(r: FieldReader) -> Board:
    before = set(r.unsupported)
    thresholds = read_thresholds(r)
    clocks_max = read_clocks(r, "clocks_max_hertz", pynvml.nvmlDeviceGetMaxClockInfo)
    supported = r.get("clock_event_reasons", pynvml.nvmlDeviceGetSupportedClocksEventReasons)
    r.unsupported.discard("clock_event_reasons")  # decided by the current-reasons call each poll
    return Board(
        thresholds=thresholds,
        clocks_max=clocks_max,
        supported_reasons=supported,
        pcie_generation_max=r.get("pcie_link_generation_max", pynvml.nvmlDeviceGetMaxPcieLinkGeneration),
        pcie_generation_device_max=r.get("pcie_link_generation_device_max",
                                         pynvml.nvmlDeviceGetGpuMaxPcieLinkGeneration),
        pcie_width_max=r.get("pcie_link_width_max_lanes", pynvml.nvmlDeviceGetMaxPcieLinkWidth),
        unsupported=frozenset(r.unsupported - before),
    )

def read_ecc(r: FieldReader) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for error_type, et in _ECC_ERROR_TYPES.items():
        for counter, ct in _ECC_COUNTERS.items():
            value = r.get("ecc_errors", pynvml.nvmlDeviceGetTotalEccErrors, et, ct)
            if value is None:
                return {}  # ECC off or not supported: all four are absent together
            out[(error_type, counter)] = int(value)
    return out

def read_retired_pages(r: FieldReader) -> dict[str, int]:
    out: dict[str, int] = {}
    for cause, c in _RETIREMENT_CAUSES.items():
        pages = r.get("retired_pages", pynvml.nvmlDeviceGetRetiredPages, c)
        if pages is None:
            return {}
        out[cause] = len(pages)
    return out


class _ProcessInfo(ctypes.Structure):
    """nvmlProcessInfo_t (v2/v3) with pynvml's own layout, as a plain ctypes structure (pynvml's wrapper
    converts every entry into a Python object, which costs more than the call for long lists)."""

    _fields_ = pynvml.c_nvmlProcessInfo_v3_t._fields_


class Process(NamedTuple):
    pid: int
    used_memory_bytes: int | None
    gpu_instance: int  # NO_INSTANCE outside MIG (or when NVML would not say)
    compute_instance: int


NO_INSTANCE = 0xFFFFFFFF
_NOT_AVAILABLE = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value


class ProcessList:
    """One of NVML's running-process lists for one GPU, with a buffer kept across polls: one C call
    while it is big enough (pynvml's wrapper asks for the size first, every time). The v3 call
    (driver 510+) is used, or v2 where the driver has no v3."""

    def __init__(self, *names: str) -> None:
        self._names = list(names)
        self._buffer = (_ProcessInfo * 16)()

    def read(self, handle: Any) -> list[Process]:
        for _ in range(3):  # the list may grow between a too-small call and the next
            try:
                fn = pynvml._nvmlGetFunctionPointer(self._names[0])
            except pynvml.NVMLError_FunctionNotFound:
                if len(self._names) == 1:
                    raise
                self._names.pop(0)
                continue
            count = ctypes.c_uint(len(self._buffer))
            ret = fn(handle, ctypes.byref(count), self._buffer)
            if ret == pynvml.NVML_SUCCESS:
                return [Process(p.pid, None if p.usedGpuMemory == _NOT_AVAILABLE else int(p.usedGpuMemory),
                                p.gpuInstanceId, p.computeInstanceId) for p in self._buffer[:count.value]]
            if ret != pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
                raise pynvml.NVMLError(ret)
            self._buffer = (_ProcessInfo * (count.value * 2 + 5))()
        raise pynvml.NVMLError(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)


class _UtilizationSample(ctypes.Structure):
    _fields_ = pynvml.c_nvmlProcessUtilizationSample_t._fields_


class ProcessSamples:
    """nvmlDeviceGetProcessUtilization through a buffer kept across polls (one C call while it is big
    enough; pynvml's wrapper asks for the size first, every time). Returns (pid, timestamp, SM %)."""

    def __init__(self) -> None:
        self._buffer = (_UtilizationSample * 16)()

    def read(self, handle: Any, since: int) -> list[tuple[int, int, int]]:
        fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetProcessUtilization")
        for _ in range(3):
            count = ctypes.c_uint(len(self._buffer))
            ret = fn(handle, self._buffer, ctypes.byref(count), ctypes.c_ulonglong(since))
            if ret == pynvml.NVML_SUCCESS:
                return [(s.pid, s.timeStamp, s.smUtil) for s in self._buffer[:count.value]]
            if ret != pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
                raise pynvml.NVMLError(ret)  # NOT_FOUND: no sample since `since`
            self._buffer = (_UtilizationSample * (count.value * 2 + 5))()
        raise pynvml.NVMLError(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)


def compute_processes() -> ProcessList:
    return ProcessList("nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetComputeRunningProcesses_v2")


def graphics_processes() -> ProcessList:
    return ProcessList("nvmlDeviceGetGraphicsRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses_v2")


def field_value(fv: Any) -> float | int:
    """The number in an nvmlFieldValue_t, whatever its declared type."""
    vt = fv.valueType
    if vt == pynvml.NVML_VALUE_TYPE_DOUBLE:
        return float(fv.value.dVal)
    if vt == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG:
        return int(fv.value.ulVal)
    if vt == pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG:
        return int(fv.value.ullVal)
    if vt == pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG:
        return int(fv.value.sllVal)
    if vt == pynvml.NVML_VALUE_TYPE_SIGNED_INT:
        return int(fv.value.siVal)
    if vt == pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT:
        return int(fv.value.usVal)
    return int(fv.value.uiVal)
