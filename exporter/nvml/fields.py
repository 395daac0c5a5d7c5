"""What each NVML reading means: the enum tables (architectures, clocks, thresholds, clock-event
reasons, ECC, page retirement, GPM metrics), the readers of fields that take several calls or a
fallback, and the conversion of NVML's units into base units (``scaled``).

Every function takes a ``FieldReader`` (exporter.nvml.errors), so "not supported" stays absent.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import pynvml

from exporter.nvml.errors import FIELD_LEVEL_ERRORS, UNSUPPORTED_ERRORS, FieldReader

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

def read_memory_temperature(r: FieldReader) -> float | None:
    values = r.get("temperature_memory_celsius", pynvml.nvmlDeviceGetFieldValues,
                   [pynvml.NVML_FI_DEV_MEMORY_TEMP])
    if not values:
        return None
    fv = values[0]
    if fv.nvmlReturn != pynvml.NVML_SUCCESS:
        if fv.nvmlReturn in UNSUPPORTED_ERRORS:
            r.unsupported.add("temperature_memory_celsius")
        return None
    value = field_value(fv)
    return float(value) if value else None  # 0 means "no sensor" on boards without HBM readings

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

def read_clock_event_reasons(r: FieldReader) -> dict[str, bool]:
    active = r.get("clock_event_reasons", pynvml.nvmlDeviceGetCurrentClocksEventReasons)
    if active is None:
        return {}
    supported = r.get("clock_event_reasons", pynvml.nvmlDeviceGetSupportedClocksEventReasons)
    if supported is None:
        supported = sum(CLOCK_EVENT_REASONS.values())
        r.unsupported.discard("clock_event_reasons")
    return {name: bool(active & bit) for name, bit in CLOCK_EVENT_REASONS.items() if supported & bit}

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


def compute_processes(handle: Any) -> list[Any]:
    """v3 of the call (driver 510+), else v2: pynvml's unversioned wrapper raises a non-NVML error."""
    try:
        return pynvml.nvmlDeviceGetComputeRunningProcesses_v3(handle)
    except pynvml.NVMLError_FunctionNotFound:
        return pynvml.nvmlDeviceGetComputeRunningProcesses_v2(handle)


def graphics_processes(handle: Any) -> list[Any]:
    try:
        return pynvml.nvmlDeviceGetGraphicsRunningProcesses_v3(handle)
    except pynvml.NVMLError_FunctionNotFound:
        return pynvml.nvmlDeviceGetGraphicsRunningProcesses_v2(handle)


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
    return int(fv.value.uiVal)
