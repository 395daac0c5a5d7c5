"""The only module that talks to NVML (through nvidia-ml-py): one poll of the node → ``NodeSnapshot``.

Modelled on nvitop's wrapper: every NVML call goes through one helper that knows NVML's error codes,
so the code above it deals in plain values with units in their names. Three outcomes per call:

- a field-level refusal (``NOT_SUPPORTED``, ``FUNCTION_NOT_FOUND``, ...) makes that field *absent*
  (and recorded in ``GpuSample.unsupported``), never a zero and never a failed poll;
- anything else (``GPU_IS_LOST``, timeouts, unknown errors) marks that GPU down with an error kind, the
  other GPUs keep reporting, and the GPU is read again from scratch on the next poll;
- NVML itself failing (init, device count) gives ``NodeSnapshot(nvml_up=False)``; init is retried on
  the next read.

XID errors are not polled: ``_XidListener`` blocks in NVML's event API on its own thread and counts
them per GPU UUID, which the reader copies into each ``GpuSample``.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import pynvml

from exporter.snapshot import GpuInfo, GpuProcess, GpuSample, NodeSnapshot, XidCount

log = logging.getLogger(__name__)

T = TypeVar("T")

# NVML return codes that mean "this GPU cannot give this one field", not "this GPU is broken".
_FIELD_LEVEL_ERRORS = frozenset({
    pynvml.NVML_ERROR_NOT_SUPPORTED,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_NO_PERMISSION,
    pynvml.NVML_ERROR_INVALID_ARGUMENT,
    pynvml.NVML_ERROR_NOT_FOUND,
    pynvml.NVML_ERROR_NO_DATA,
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
})
_UNSUPPORTED_ERRORS = frozenset({
    pynvml.NVML_ERROR_NOT_SUPPORTED,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,  # an older driver without this call
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,  # an older driver without this struct version
})
# Error kinds (the ``error`` of a down GPU and the ``kind`` label of gpu_exporter_poll_errors_total).
_ERROR_KINDS = {
    pynvml.NVML_ERROR_GPU_IS_LOST: "gpu_lost",
    pynvml.NVML_ERROR_TIMEOUT: "timeout",
    pynvml.NVML_ERROR_NOT_FOUND: "not_found",
    pynvml.NVML_ERROR_NO_PERMISSION: "no_permission",
    pynvml.NVML_ERROR_RESET_REQUIRED: "reset_required",
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "driver_not_loaded",
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: "library_not_found",
    pynvml.NVML_ERROR_UNINITIALIZED: "uninitialized",
    pynvml.NVML_ERROR_INSUFFICIENT_POWER: "insufficient_power",
    pynvml.NVML_ERROR_IRQ_ISSUE: "irq_issue",
}
_ARCHITECTURES = {
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
_PRE_GPM_ARCHITECTURES = frozenset(_ARCHITECTURES.values()) - {"hopper", "blackwell"}
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
_GPM_METRICS = {
    "sm_active": pynvml.NVML_GPM_METRIC_SM_UTIL,
    "tensor_active": pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL,
    "dram_bandwidth": pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL,
}
_PSTATE_UNKNOWN = 32


def error_kind(exc: BaseException) -> str:
    """Short snake_case name for an NVML error (``gpu_lost``, ``timeout``, ...; ``unknown`` otherwise)."""
    if isinstance(exc, pynvml.NVMLError):
        return _ERROR_KINDS.get(exc.value, "unknown")
    return "unknown"


def _address(handle: Any) -> int:
    """A device handle's pointer value: a stable key for the GPU within one NVML session."""
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


class _GpuReader:
    """Reads one GPU for one poll; collects "not supported" fields instead of failing on them."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.unsupported: set[str] = set()

    def get(self, field: str, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(handle, *args)``; None when NVML refuses this field, raises when the GPU is in trouble."""
        try:
            return fn(self.handle, *args)
        except pynvml.NVMLError as exc:
            if exc.value in _UNSUPPORTED_ERRORS:
                self.unsupported.add(field)
                return None
            if exc.value in _FIELD_LEVEL_ERRORS:
                log.debug("NVML %s: %s for %s", fn.__name__, exc, field)
                return None
            raise


class _XidListener:
    """Counts XID errors from NVML's event API on a background thread, per GPU UUID and XID code.

    It holds its own NVML reference (nvmlInit is reference-counted) so it lives through the reader's
    re-inits. When the reader reports a different set of answering GPUs (one vanished, returned or
    recovered) every GPU is registered again on the same event set; when NVML fails, the thread starts
    a new NVML session with backoff. The UUID of each registered handle is remembered at registration:
    after XID 79 the GPU cannot tell it anymore.
    """

    MAX_RETRY_SECONDS = 30.0

    WAIT_MS = 250  # bounds how long close() waits for the thread

    def __init__(self, retry_seconds: float = 1.0, wall_clock: Callable[[], float] = time.time) -> None:
        self._retry_seconds = retry_seconds
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._counts: dict[str, dict[int, XidCount]] = {}
        self._wanted: frozenset[str] = frozenset()
        self.registered: frozenset[str] = frozenset()  # GPUs whose XIDs are being received now
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0  # NVML sessions failed in a row (backoff)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nvml-xid-listener", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def want(self, uuids: frozenset[str]) -> None:
        """The GPUs that answered the last poll; a change makes the thread re-register."""
        self._wanted = uuids

    def counts(self, uuid: str) -> dict[int, XidCount]:
        with self._lock:
            return dict(self._counts.get(uuid, {}))

    def record(self, uuid: str, xid: int) -> None:
        with self._lock:
            per_gpu = self._counts.setdefault(uuid, {})
            previous = per_gpu.get(xid)
            per_gpu[xid] = XidCount((previous.count if previous else 0) + 1, self._wall_clock())
        log.warning("XID %d on GPU %s", xid, uuid)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pynvml.nvmlInit()
            except pynvml.NVMLError as exc:
                self._backoff(f"nvmlInit failed ({exc})")
                continue
            try:
                self._listen()
            except pynvml.NVMLError as exc:
                self._backoff(f"NVML error ({exc})")
            except Exception:
                log.exception("XID listener failed; restarting it")
                self._backoff("unexpected error")
            finally:
                with contextlib.suppress(pynvml.NVMLError):
                    pynvml.nvmlShutdown()

    def _backoff(self, why: str) -> None:
        """Wait before the next NVML session, longer each time it keeps failing (no log flood when
        there is no driver, or the platform has no event API); logged once per outage."""
        self._failures += 1
        delay = min(self.MAX_RETRY_SECONDS, self._retry_seconds * 2 ** (self._failures - 1))
        log.log(logging.INFO if self._failures == 1 else logging.DEBUG,
                "XID listener: %s; retrying in %.2gs", why, delay)
        self._stop.wait(delay)

    def _listen(self) -> None:
        """One event set per NVML session: register every reachable GPU, wait for events, and register
        again (on the same set, so no event is missed meanwhile) whenever the set of GPUs changes."""
        event_set = pynvml.nvmlEventSetCreate()
        try:
            uuids: dict[int, str] = {}
            while not self._stop.is_set():
                wanted = self._wanted
                self.registered = self._register(event_set, uuids)
                self._failures = 0
                while not self._stop.is_set() and self._wanted == wanted:
                    try:
                        data = pynvml.nvmlEventSetWait_v2(event_set, self.WAIT_MS)
                    except pynvml.NVMLError_Timeout:
                        continue
                    if data.eventType & pynvml.nvmlEventTypeXidCriticalError:
                        self.record(uuids.get(_address(data.device), "unknown"), int(data.eventData))
        finally:
            self.registered = frozenset()
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlEventSetFree(event_set)

    @staticmethod
    def _register(event_set: Any, uuids: dict[int, str]) -> frozenset[str]:
        """Register XID events of every GPU that answers; remember each handle's UUID. Returns the
        UUIDs registered now."""
        registered = set()
        for i in range(pynvml.nvmlDeviceGetCount()):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = pynvml.nvmlDeviceGetUUID(handle)
                pynvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
            except pynvml.NVMLError as exc:
                log.debug("XID listener: GPU %d not registered (%s)", i, exc)
                continue
            uuids[_address(handle)] = uuid
            registered.add(uuid)
        return frozenset(registered)


class NvmlReader:
    """Polls every GPU NVML enumerates; ``read()`` never raises.

    Per NVML session it caches what cannot change (identity, GPM support, the UUID of each handle so a
    GPU that stops answering keeps its identity) and the previous GPM sample of each GPU (GPM metrics
    are rates between two samples, so they appear from the second poll on).
    """

    def __init__(self, host: str, *, xid_retry_seconds: float = 1.0,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self._wall_clock = wall_clock
        self._initialized = False
        self._lock = threading.Lock()  # read() and close() from different threads
        self._xid = _XidListener(xid_retry_seconds, wall_clock)
        self._closed = False
        self._system: dict[str, str | None] = {}
        self._info: dict[int, GpuInfo] = {}
        self._uuid_by_handle: dict[int, str] = {}
        self._uuid_by_index: dict[int, str] = {}
        self._gpm_support: dict[int, bool] = {}
        self._gpm_samples: dict[int, Any] = {}
        self._proc_util_since: dict[int, int] = {}
        self._down: set[str] = set()  # UUIDs of GPUs currently down (for logging transitions)
        self._last_info: dict[str, GpuInfo] = {}  # by UUID, outlives NVML sessions
        self._nvml_failing = False

    # --- public -----------------------------------------------------------------------------------

    def read(self) -> NodeSnapshot:
        """One poll of the node. NVML failing → ``nvml_up=False``; a failing GPU → its ``up=False``."""
        with self._lock:
            if self._closed:
                return NodeSnapshot(host=self.host, timestamp_seconds=self._wall_clock(), nvml_up=False)
            self._xid.start()
            try:
                snapshot = self._read()
                self._nvml_failing = False
                return snapshot
            except pynvml.NVMLError as exc:
                # Once per outage: without a driver this would otherwise repeat every poll.
                log.log(logging.DEBUG if self._nvml_failing else logging.WARNING, "NVML unavailable: %s", exc)
            except Exception:
                log.exception("unexpected error reading NVML")
            self._nvml_failing = True
            self._shutdown()
            return NodeSnapshot(host=self.host, timestamp_seconds=self._wall_clock(), nvml_up=False)

    @property
    def xid_listening(self) -> frozenset[str]:
        """UUIDs of the GPUs whose XID events are being received right now (status page, tests)."""
        return self._xid.registered

    def close(self) -> None:
        """Stop the XID listener and release NVML (idempotent)."""
        self._xid.stop()
        # A read stuck in a hung driver call holds the lock: then leave NVML alone rather than hang.
        if not self._lock.acquire(timeout=5.0):
            log.warning("NVML reader busy in a driver call; not shutting NVML down")
            self._closed = True
            return
        try:
            self._closed = True
            self._shutdown()
        finally:
            self._lock.release()

    # --- node -------------------------------------------------------------------------------------

    def _read(self) -> NodeSnapshot:
        if not self._initialized:
            pynvml.nvmlInit()
            self._initialized = True
            self._system = self._read_system()
            log.info("NVML initialised: driver %s, CUDA %s", self._system["driver_version"],
                     self._system["cuda_driver_version"])
        count = pynvml.nvmlDeviceGetCount()
        gpus = tuple(self._read_gpu(index) for index in range(count))
        self._xid.want(frozenset(g.uuid for g in gpus if g.up))
        return NodeSnapshot(
            host=self.host,
            timestamp_seconds=self._wall_clock(),
            nvml_up=True,
            driver_version=self._system.get("driver_version"),
            cuda_driver_version=self._system.get("cuda_driver_version"),
            nvml_version=self._system.get("nvml_version"),
            gpus=gpus,
        )

    @staticmethod
    def _read_system() -> dict[str, str | None]:
        def optional(fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except pynvml.NVMLError:
                return None

        cuda = optional(pynvml.nvmlSystemGetCudaDriverVersion)
        return {
            "driver_version": optional(pynvml.nvmlSystemGetDriverVersion),
            "cuda_driver_version": f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
            "nvml_version": optional(pynvml.nvmlSystemGetNVMLVersion),
        }

    def _shutdown(self) -> None:
        """Forget the NVML session (handles die with it) so the next read starts afresh."""
        for sample in self._gpm_samples.values():
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlGpmSampleFree(sample)
        self._gpm_samples.clear()
        self._gpm_support.clear()
        self._info.clear()
        self._uuid_by_handle.clear()
        self._proc_util_since.clear()
        if self._initialized:
            self._initialized = False
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()

    # --- one GPU ----------------------------------------------------------------------------------

    def _read_gpu(self, index: int) -> GpuSample:
        handle = None
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return self._read_device(index, handle)
        except Exception as exc:  # NVML errors, and anything unexpected: only this GPU is marked down
            kind = error_kind(exc)
            if not isinstance(exc, pynvml.NVMLError):
                log.exception("unexpected error reading GPU %d", index)
            key = _address(handle) if handle is not None else None
            uuid = self._uuid_by_handle.get(key, "") if key is not None else ""
            uuid = uuid or self._uuid_by_index.get(index, "unknown")
            if uuid not in self._down:  # once per outage, not once per poll
                log.warning("GPU %d (%s) down: %s", index, uuid, exc)
                self._down.add(uuid)
            if key is not None:
                self._forget_device(key)
            # Last known identity stays, so gpu_info still names the GPU whose gpu_up is 0.
            return GpuSample(index=index, uuid=uuid, up=False, error=kind, info=self._last_info.get(uuid),
                             xid_errors=self._xid.counts(uuid))

    def _forget_device(self, key: int) -> None:
        """Drop per-session state of a GPU that failed, so a recovered GPU is read from scratch."""
        self._info.pop(key, None)
        self._gpm_support.pop(key, None)
        self._proc_util_since.pop(key, None)
        sample = self._gpm_samples.pop(key, None)
        if sample is not None:
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlGpmSampleFree(sample)

    def _read_device(self, index: int, handle: Any) -> GpuSample:
        key = _address(handle)
        r = _GpuReader(handle)
        uuid = pynvml.nvmlDeviceGetUUID(handle)  # also the liveness probe: raises for a lost GPU
        self._uuid_by_handle[key] = uuid
        self._uuid_by_index[index] = uuid
        if uuid in self._down:
            log.warning("GPU %d (%s) answers again", index, uuid)
            self._down.discard(uuid)
        info = self._info.get(key)
        if info is None:
            info = self._info[key] = self._read_info(r)
        mig = r.get("mig_mode", pynvml.nvmlDeviceGetMigMode)
        mig_mode = None if mig is None else "enabled" if mig[0] == pynvml.NVML_DEVICE_MIG_ENABLE else "disabled"
        if info.mig_mode != mig_mode:  # the only identity fact that changes (after a GPU reset)
            info = self._info[key] = replace(info, mig_mode=mig_mode)
        self._last_info[uuid] = info

        util = r.get("utilization_gpu_ratio", pynvml.nvmlDeviceGetUtilizationRates)
        if util is None and "utilization_gpu_ratio" in r.unsupported:
            r.unsupported.add("utilization_memory_ratio")  # one NVML call answers both
        mem = self._memory(r)
        fan = r.get("fan_speed_ratio", pynvml.nvmlDeviceGetFanSpeed)
        pstate = r.get("performance_state", pynvml.nvmlDeviceGetPerformanceState)
        power = r.get("power_usage_watts", pynvml.nvmlDeviceGetPowerUsage)
        limit = r.get("power_limit_watts", pynvml.nvmlDeviceGetEnforcedPowerLimit)
        energy = r.get("energy_consumed_joules", pynvml.nvmlDeviceGetTotalEnergyConsumption)
        temp = r.get("temperature_gpu_celsius", pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)
        tx = r.get("pcie_tx_bytes_per_second", pynvml.nvmlDeviceGetPcieThroughput, pynvml.NVML_PCIE_UTIL_TX_BYTES)
        rx = r.get("pcie_rx_bytes_per_second", pynvml.nvmlDeviceGetPcieThroughput, pynvml.NVML_PCIE_UTIL_RX_BYTES)
        pending_pages = r.get("retired_pages_pending", pynvml.nvmlDeviceGetRetiredPagesPendingStatus)
        remapped = r.get("remapped_rows", pynvml.nvmlDeviceGetRemappedRows)
        if remapped is None and "remapped_rows" in r.unsupported:
            r.unsupported |= {"remapped_rows_pending", "remapped_rows_failure"}

        sample = GpuSample(
            index=index,
            uuid=uuid,
            info=info,
            utilization_gpu_ratio=util.gpu / 100.0 if util is not None else None,
            utilization_memory_ratio=util.memory / 100.0 if util is not None else None,
            memory_used_bytes=mem[0],
            memory_free_bytes=mem[1],
            memory_total_bytes=mem[2],
            memory_reserved_bytes=mem[3],
            temperature_gpu_celsius=float(temp) if temp is not None else None,
            temperature_memory_celsius=self._memory_temperature(r),
            temperature_thresholds_celsius=self._thresholds(r),
            power_usage_watts=power / 1000.0 if power is not None else None,
            power_limit_watts=limit / 1000.0 if limit is not None else None,
            energy_consumed_joules=energy / 1000.0 if energy is not None else None,
            clocks_hertz=self._clocks(r, "clocks_hertz", pynvml.nvmlDeviceGetClockInfo),
            clocks_max_hertz=self._clocks(r, "clocks_max_hertz", pynvml.nvmlDeviceGetMaxClockInfo),
            clock_event_reasons=self._clock_event_reasons(r),
            fan_speed_ratio=fan / 100.0 if fan is not None else None,
            performance_state=pstate if pstate is not None and pstate != _PSTATE_UNKNOWN else None,
            pcie_tx_bytes_per_second=tx * 1000.0 if tx is not None else None,
            pcie_rx_bytes_per_second=rx * 1000.0 if rx is not None else None,
            pcie_replay_errors=r.get("pcie_replay_errors", pynvml.nvmlDeviceGetPcieReplayCounter),
            ecc_errors=self._ecc(r),
            retired_pages=self._retired_pages(r),
            retired_pages_pending=bool(pending_pages) if pending_pages is not None else None,
            remapped_rows=({"correctable": remapped[0], "uncorrectable": remapped[1]} if remapped else {}),
            remapped_rows_pending=bool(remapped[2]) if remapped else None,
            remapped_rows_failure=bool(remapped[3]) if remapped else None,
            gpm_ratios=self._gpm(r, key, info),
            xid_errors=self._xid.counts(uuid),
            processes=self._processes(r, key),
        )
        return replace(sample, unsupported=frozenset(r.unsupported)) if r.unsupported else sample

    def _read_info(self, r: _GpuReader) -> GpuInfo:
        handle = r.handle
        arch = r.get("architecture", pynvml.nvmlDeviceGetArchitecture)
        return GpuInfo(
            name=pynvml.nvmlDeviceGetName(handle),
            pci_bus_id=pynvml.nvmlDeviceGetPciInfo(handle).busId,
            serial=r.get("serial", pynvml.nvmlDeviceGetSerial),
            vbios_version=r.get("vbios_version", pynvml.nvmlDeviceGetVbiosVersion),
            architecture=_ARCHITECTURES.get(arch) if arch is not None else None,
        )

    @staticmethod
    def _memory(r: _GpuReader) -> tuple[int | None, int | None, int | None, int | None]:
        """(used, free, total, reserved): v2 separates the driver's reservation from "used"; drivers
        without it only have v1, where "used" includes the reservation and it is not known apart."""
        try:
            mem = pynvml.nvmlDeviceGetMemoryInfo(r.handle, version=pynvml.nvmlMemory_v2)
            return int(mem.used), int(mem.free), int(mem.total), int(mem.reserved)
        except pynvml.NVMLError as exc:
            if exc.value not in _FIELD_LEVEL_ERRORS:
                raise
        mem = r.get("memory_used_bytes", pynvml.nvmlDeviceGetMemoryInfo)
        if mem is None:
            r.unsupported |= {"memory_used_bytes", "memory_free_bytes", "memory_total_bytes",
                              "memory_reserved_bytes"}
            return None, None, None, None
        r.unsupported.add("memory_reserved_bytes")
        return int(mem.used), int(mem.free), int(mem.total), None

    @staticmethod
    def _memory_temperature(r: _GpuReader) -> float | None:
        values = r.get("temperature_memory_celsius", pynvml.nvmlDeviceGetFieldValues,
                       [pynvml.NVML_FI_DEV_MEMORY_TEMP])
        if not values:
            return None
        fv = values[0]
        if fv.nvmlReturn != pynvml.NVML_SUCCESS:
            if fv.nvmlReturn in _UNSUPPORTED_ERRORS:
                r.unsupported.add("temperature_memory_celsius")
            return None
        value = _field_value(fv)
        return float(value) if value else None  # 0 means "no sensor" on boards without HBM readings

    @staticmethod
    def _thresholds(r: _GpuReader) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, threshold in _THRESHOLDS.items():
            value = r.get("temperature_thresholds_celsius", pynvml.nvmlDeviceGetTemperatureThreshold, threshold)
            if value:
                out[name] = float(value)
        if out:
            r.unsupported.discard("temperature_thresholds_celsius")  # some thresholds are, some aren't
        return out

    @staticmethod
    def _clocks(r: _GpuReader, field: str, fn: Callable[..., int]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, clock in _CLOCKS.items():
            mhz = r.get(field, fn, clock)
            if mhz is not None:
                out[name] = mhz * 1e6
        if out:
            r.unsupported.discard(field)
        return out

    @staticmethod
    def _clock_event_reasons(r: _GpuReader) -> dict[str, bool]:
        active = r.get("clock_event_reasons", pynvml.nvmlDeviceGetCurrentClocksEventReasons)
        if active is None:
            return {}
        supported = r.get("clock_event_reasons", pynvml.nvmlDeviceGetSupportedClocksEventReasons)
        if supported is None:
            supported = sum(CLOCK_EVENT_REASONS.values())
            r.unsupported.discard("clock_event_reasons")
        return {name: bool(active & bit) for name, bit in CLOCK_EVENT_REASONS.items() if supported & bit}

    @staticmethod
    def _ecc(r: _GpuReader) -> dict[tuple[str, str], int]:
        out: dict[tuple[str, str], int] = {}
        for error_type, et in _ECC_ERROR_TYPES.items():
            for counter, ct in _ECC_COUNTERS.items():
                value = r.get("ecc_errors", pynvml.nvmlDeviceGetTotalEccErrors, et, ct)
                if value is None:
                    return {}  # ECC off or not supported: all four are absent together
                out[(error_type, counter)] = int(value)
        return out

    @staticmethod
    def _retired_pages(r: _GpuReader) -> dict[str, int]:
        out: dict[str, int] = {}
        for cause, c in _RETIREMENT_CAUSES.items():
            pages = r.get("retired_pages", pynvml.nvmlDeviceGetRetiredPages, c)
            if pages is None:
                return {}
            out[cause] = len(pages)
        return out

    def _gpm(self, r: _GpuReader, key: int, info: GpuInfo) -> dict[str, float]:
        """GPM metrics are rates between two samples: keep this poll's sample for the next one."""
        if info.architecture in _PRE_GPM_ARCHITECTURES:
            r.unsupported.add("gpm_ratios")
            return {}
        supported = self._gpm_support.get(key)
        if supported is None:
            support = r.get("gpm_ratios", pynvml.nvmlGpmQueryDeviceSupport)
            supported = self._gpm_support[key] = bool(support and support.isSupportedDevice)
        if not supported:
            r.unsupported.add("gpm_ratios")
            return {}
        sample = pynvml.nvmlGpmSampleAlloc()
        if r.get("gpm_ratios", pynvml.nvmlGpmSampleGet, sample) is None:
            pynvml.nvmlGpmSampleFree(sample)
            return {}
        previous = self._gpm_samples.get(key)
        self._gpm_samples[key] = sample
        if previous is None:
            return {}
        try:
            request = pynvml.c_nvmlGpmMetricsGet_t()
            request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
            request.numMetrics = len(_GPM_METRICS)
            request.sample1 = previous
            request.sample2 = sample
            for i, metric_id in enumerate(_GPM_METRICS.values()):
                request.metrics[i].metricId = metric_id
            try:
                pynvml.nvmlGpmMetricsGet(request)
            except pynvml.NVMLError as exc:
                log.debug("GPM metrics unavailable: %s", exc)
                return {}
            out: dict[str, float] = {}
            for i, name in enumerate(_GPM_METRICS):
                metric = request.metrics[i]
                if metric.nvmlReturn == pynvml.NVML_SUCCESS:
                    out[name] = min(1.0, max(0.0, metric.value / 100.0))
            return out
        finally:
            pynvml.nvmlGpmSampleFree(previous)

    def _processes(self, r: _GpuReader, key: int) -> tuple[GpuProcess, ...]:
        """Compute and graphics processes, one entry per PID (a process with both kinds of context is
        listed by NVML twice; it counts as compute), with SM utilization where NVML samples it."""
        by_pid: dict[int, tuple[str, int | None]] = {}
        for ptype, fn in (("compute", _compute_processes), ("graphics", _graphics_processes)):
            for p in r.get("processes", fn) or ():
                if p.pid not in by_pid:
                    by_pid[p.pid] = (ptype, p.usedGpuMemory)
        if not by_pid:
            return ()
        sm: dict[int, tuple[int, float]] = {}  # pid -> (timestamp, ratio) of its newest sample
        since = self._proc_util_since.get(key, 0)
        for s in r.get("process_sm_utilization_ratio", pynvml.nvmlDeviceGetProcessUtilization, since) or ():
            if s.pid not in sm or s.timeStamp >= sm[s.pid][0]:
                sm[s.pid] = (s.timeStamp, min(1.0, s.smUtil / 100.0))
        if sm:
            self._proc_util_since[key] = max(ts for ts, _ in sm.values())
        return tuple(
            GpuProcess(
                pid=pid,
                process_type=ptype,
                used_memory_bytes=int(used) if used is not None else None,
                sm_utilization_ratio=sm[pid][1] if pid in sm else None,
            )
            for pid, (ptype, used) in sorted(by_pid.items())
        )


def _compute_processes(handle: Any) -> list[Any]:
    """v3 of the call (driver 510+), else v2: pynvml's unversioned wrapper raises a non-NVML error."""
    try:
        return pynvml.nvmlDeviceGetComputeRunningProcesses_v3(handle)
    except pynvml.NVMLError_FunctionNotFound:
        return pynvml.nvmlDeviceGetComputeRunningProcesses_v2(handle)


def _graphics_processes(handle: Any) -> list[Any]:
    try:
        return pynvml.nvmlDeviceGetGraphicsRunningProcesses_v3(handle)
    except pynvml.NVMLError_FunctionNotFound:
        return pynvml.nvmlDeviceGetGraphicsRunningProcesses_v2(handle)


def _field_value(fv: Any) -> float | int:
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

