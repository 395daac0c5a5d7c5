"""A stand-in for libnvidia-ml.so: Python functions with NVML's C signatures, placed under pynvml.

nvidia-ml-py keeps the loaded library in ``pynvml.nvmlLib`` and looks each C function up by name
(``getattr``), caching the result. Putting an object with the same function names there makes every
unchanged pynvml wrapper, and every program built on them (our reader, nvitop-exporter), run against
the simulated fleet: results are written through the ctypes ``byref`` arguments the wrappers pass,
and failures are NVML's own return codes, so NVML's error paths are exercised for real.

Handles are fake pointers (``_DEV_BASE + slot``); nothing ever dereferences them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import pynvml

from exporter.nvml.field_values import (
    NVLINK_ERRORS,
    PCIE_ERROR_FIELDS,
    THROTTLE_FIELDS,
    legacy_nvlink_field,
)
from exporter.nvml.fields import CLOCK_EVENT_REASONS
from exporter.simulate.scenario import (
    ARCHITECTURES,
    ERROR_CODES,
    MAX_MIG_DEVICES,
    MIG_ARCHITECTURE_MIN,
    RECOVERY_ACTION_NAMES,
    Scenario,
    TimedEvent,
    _copy,
)

log = logging.getLogger(__name__)

SUCCESS = 0
ERROR_UNINITIALIZED = 1
ERROR_INVALID_ARGUMENT = 2
ERROR_NOT_SUPPORTED = 3
ERROR_NOT_FOUND = 6
ERROR_INSUFFICIENT_SIZE = 7
ERROR_TIMEOUT = 10
ERROR_FUNCTION_NOT_FOUND = 13
ERROR_GPU_IS_LOST = 15

_DEV_BASE = 0x7E570000
_EVSET_BASE = 0x7E580000
_GPM_BASE = 0x7E590000
_MIG_BASE = 0x7E5A0000  # + slot * 8 + MIG device index
_MAX_SLOTS = 0x10000

EVENT_XID = 0x8  # nvmlEventTypeXidCriticalError
_THRESHOLD_IDS = {0: "shutdown", 1: "slowdown", 2: "memory_max", 3: "gpu_max"}
_CLOCK_IDS = {0: "graphics", 1: "sm", 2: "memory"}
_FI_DEV_MEMORY_TEMP = 82
# Field ids the simulated driver answers (besides memory temperature), from pynvml's constants.
_FI_PCIE = {fid: name for name, fid in PCIE_ERROR_FIELDS.items()}
_FI_THROTTLE = {fid: name for name, fid in THROTTLE_FIELDS.items()}
_FI_NVLINK_SCOPED = {
    pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_CRC: "crc_flit",
    pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY: "replay",
    pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY: "recovery",
}
_FI_NVLINK_LEGACY = {fid: (error, link) for error in NVLINK_ERRORS for link in range(12)
                     if (fid := legacy_nvlink_field(error, link)) is not None}
_FI_NVLINK_BYTES = {pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX: "tx", pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX: "rx"}
# Field id -> (kind, name, link): what the simulated driver answers for it (one lookup per entry).
_FIELD_KINDS: dict[int, tuple[str, str, int]] = {
    _FI_DEV_MEMORY_TEMP: ("memory_temperature", "", 0),
    pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER: ("pcie_replay", "", 0),
    pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION: ("recovery_action", "", 0),
    pynvml.NVML_FI_DEV_NVLINK_GET_STATE: ("nvlink", "", 0),
    **{fid: ("pcie_errors", name, 0) for fid, name in _FI_PCIE.items()},
    **{fid: ("throttle", name, 0) for fid, name in _FI_THROTTLE.items()},
    **{fid: ("legacy", error, link) for fid, (error, link) in _FI_NVLINK_LEGACY.items()},
    **{fid: ("nvlink_errors", error, 0) for fid, error in _FI_NVLINK_SCOPED.items()},
    **{fid: ("nvlink_bytes", direction, 0) for fid, direction in _FI_NVLINK_BYTES.items()},
}
# Kinds read straight from one GPU field: kind -> (the name that makes it "not supported", state key).
_PLAIN_FIELDS = {
    "memory_temperature": ("temperature_memory_celsius", "temperature_memory_celsius"),
    "pcie_replay": ("pcie_replay_errors", "pcie_replay_errors"),
    "recovery_action": ("recovery_action", "recovery_action"),
    "pcie_errors": ("pcie_errors", "pcie_errors"),
    "throttle": ("throttle_seconds", "throttle_seconds"),
}
# Which clock-event reasons accumulate which throttle counter (the simulator's model of the driver).
_THROTTLE_BY_REASON = {
    "sw_power_cap": "power", "sw_thermal_slowdown": "thermal", "hw_thermal_slowdown": "thermal",
    "sync_boost": "sync_boost", "hw_power_brake_slowdown": "board_limit", "hw_slowdown": "reliability",
}
# Keys whose change alters an accumulating counter: settle the counters before changing them.
_RATE_KEYS = frozenset({"clock_event_reasons", "nvlink_error_rates", "nvlink_bytes_per_second",
                        "nvlink_links_down", "nvlink_links", "throttle_seconds", "nvlink_errors"})
_VT_UINT, _VT_ULL = 1, 3  # NVML_VALUE_TYPE_UNSIGNED_INT, _UNSIGNED_LONG_LONG
# The simulator's model of an old driver (scenario driver_version before 520): it knows field ids up
# to 169 only, and a batch holding a newer id fails as a whole with INVALID_ARGUMENT. (Whether real
# old drivers fail the batch or only the entry is not known here; the reader copes with both.)
_OLD_DRIVER_MAJOR = 520
_FI_OLD_DRIVER_MAX = 170
_GPM_IDS = {2: "sm_active", 5: "tensor_active", 10: "dram_bandwidth"}  # SM_UTIL, ANY_TENSOR_UTIL, DRAM_BW_UTIL
_VOID_P = ctypes.c_void_p


def _addr(handle: Any) -> int:
    """Address a fake handle (a ctypes pointer) stands for."""
    v = ctypes.cast(handle, _VOID_P).value
    return v or 0


def _set_ptr(ptr_obj: Any, value: int) -> None:
    """Write a pointer value into a ctypes pointer object the caller passed by reference."""
    _VOID_P.from_buffer(ptr_obj).value = value


class FakeNvmlLib:
    """The fake function table. Attributes are plain functions (pynvml may set ``restype`` on them)."""

    def __init__(self, scenario: Scenario, clock: Callable[[], float]) -> None:
        self.scenario = scenario
        self._clock = clock
        self._t0 = clock()
        self.lock = threading.RLock()
        self.gpus: list[dict[str, Any]] = [_copy(g) for g in scenario.gpus]
        for g in self.gpus:
            g["_energy_t"] = 0.0
            g["_acc_t"] = 0.0
            g["_nvlink_bytes"] = {}
        self._timeline: deque[TimedEvent] = deque(scenario.timeline)
        self._ramps: list[tuple[int, str, float, float, float, float]] = []  # slot, key, t0, v0, t1, v1
        self.now = 0.0
        self._old_driver = int(scenario.driver_version.split(".")[0]) < _OLD_DRIVER_MAJOR
        self.delay_seconds = 0.0
        self.init_error: str | None = None
        self.initialized = 0
        self._event_sets: dict[int, dict[str, Any]] = {}
        self._event_cond = threading.Condition(self.lock)
        self._gpm_samples: dict[int, tuple[int, float, int | None] | None] = {}
        self._next_id = 1
        self.apply_event: Callable[[dict[str, Any]], None] = lambda ev: None  # set by SimulatedNvml
        self._funcs: dict[str, Callable[..., Any]] = {}
        self.calls: Counter[str] = Counter()  # NVML calls made, by function name (benchmarks, cost tests)
        for name in dir(self):
            if name.startswith("nvml"):
                self._funcs[name] = _plain(getattr(self, name), name, self.calls)

    # --- function table ---------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not defined below: answer "not supported" so callers degrade cleanly.
        if name.startswith("nvml"):
            def unsupported(*_args: Any) -> int:
                return ERROR_NOT_SUPPORTED

            log.debug("simulated NVML: %s is not simulated, answering NOT_SUPPORTED", name)
            return unsupported
        raise AttributeError(name)

    def function(self, name: str) -> Callable[..., Any]:
        """The plain function pynvml should get for ``name`` (counted in ``calls``)."""
        fn = self._funcs.get(name)
        if fn is None:
            fn = self._funcs[name] = _plain(getattr(self, name), name, self.calls)
        return fn

    # --- time and state ---------------------------------------------------------------------------

    def advance(self) -> float:
        """Apply due timeline events and move ramps; return the scenario time."""
        now = self._clock() - self._t0
        self.now = now
        if (self._timeline and self._timeline[0].at <= now) or self._ramps:
            with self.lock:
                while self._timeline and self._timeline[0].at <= now:
                    due = self._timeline.popleft()
                    self.now = due.at  # ramps and energy start when the event was due, not when seen
                    self.apply_event(due.event)
                self.now = now
                if self._ramps:
                    keep = []
                    for ramp in self._ramps:
                        slot, key, t0, v0, t1, v1 = ramp
                        frac = 1.0 if t1 <= t0 or now >= t1 else max(0.0, (now - t0) / (t1 - t0))
                        self.set_field(slot, key, v0 + (v1 - v0) * frac)
                        if frac < 1.0:
                            keep.append(ramp)
                    self._ramps = keep
        return now

    def start_ramp(self, slot: int, key: str, target: float, duration: float) -> None:
        self._ramps = [r for r in self._ramps if not (r[0] == slot and r[1] == key)]
        g = self.gpus[slot]
        start = g[key]
        if start is None:  # memory_used_bytes derived from processes
            start = self.memory_used(g)
        self._ramps.append((slot, key, self.now, float(start), self.now + duration, float(target)))

    def cancel_ramp(self, slot: int, key: str) -> None:
        self._ramps = [r for r in self._ramps if not (r[0] == slot and r[1] == key)]

    def set_field(self, slot: int, key: str, value: Any) -> None:
        g = self.gpus[slot]
        if key == "power_usage_watts":
            self._settle_energy(g)
        if key in _RATE_KEYS:
            self.settle_counters(g)
        if key in ("performance_state", "pcie_replay_errors") and value is not None:
            value = round(value)
        if key in ("memory_total_bytes", "memory_used_bytes", "memory_reserved_bytes") and value is not None:
            value = int(value)
        if key == "energy_consumed_joules":
            g["_energy_t"] = self.now
        g[key] = value

    def _settle_energy(self, g: dict[str, Any]) -> None:
        now = self.now
        g["energy_consumed_joules"] += g["power_usage_watts"] * max(0.0, now - g["_energy_t"])
        g["_energy_t"] = now

    def settle_counters(self, g: dict[str, Any]) -> None:
        """Accumulate the rate-driven counters (throttle time, NVLink errors and bytes) up to now."""
        dt = max(0.0, self.now - g["_acc_t"])
        g["_acc_t"] = self.now
        if not dt:
            return
        throttled = {_THROTTLE_BY_REASON[r] for r in g["clock_event_reasons"] if r in _THROTTLE_BY_REASON}
        if throttled:
            spent = dict(g["throttle_seconds"])
            for reason in throttled | {"below_application_clocks"}:
                spent[reason] = spent.get(reason, 0.0) + dt
            g["throttle_seconds"] = spent
        links = g["nvlink_links"]
        if g["nvlink_error_rates"]:
            errors = {link: dict(c) for link, c in g["nvlink_errors"].items()}
            for link, rates in g["nvlink_error_rates"].items():
                if link < links and link not in g["nvlink_links_down"]:  # no traffic, no errors
                    counters = errors.setdefault(link, {})
                    for error, rate in rates.items():
                        counters[error] = counters.get(error, 0) + rate * dt
            g["nvlink_errors"] = errors
        rates = g["nvlink_bytes_per_second"]
        if links and any(rates.values()):
            for link in range(links):
                if link not in g["nvlink_links_down"]:
                    moved = g["_nvlink_bytes"].setdefault(link, {"tx": 0.0, "rx": 0.0})
                    for direction, rate in rates.items():
                        moved[direction] += rate * dt

    @staticmethod
    def memory_used(g: dict[str, Any]) -> int:
        used = g["memory_used_bytes"]
        if used is None:
            used = sum(p["used_memory_bytes"] for p in g["processes"])
        return int(min(used, max(0, g["memory_total_bytes"] - g["memory_reserved_bytes"])))

    def present_slots(self) -> list[int]:
        return [i for i, g in enumerate(self.gpus) if g["present"]]

    def post_xid(self, slot: int, xid: int) -> None:
        with self._event_cond:
            for es in self._event_sets.values():
                if es["mask"].get(slot, 0) & EVENT_XID:
                    es["queue"].append((slot, EVENT_XID, xid))
            self._event_cond.notify_all()

    # --- helpers used by the C-like functions -----------------------------------------------------

    def _dev(self, handle: Any, field: str | None = None) -> tuple[int, dict[str, Any] | None]:
        """(return code, GPU state) for a device handle, honouring lost / error / unsupported."""
        self.advance()
        if not self.initialized:
            return ERROR_UNINITIALIZED, None
        slot = _addr(handle) - _DEV_BASE
        if not 0 <= slot < len(self.gpus):
            return ERROR_INVALID_ARGUMENT, None
        g = self.gpus[slot]
        if g["lost"]:
            return ERROR_GPU_IS_LOST, None
        if g["error"] is not None:
            return ERROR_CODES[g["error"]], None
        if not g["present"]:
            return ERROR_GPU_IS_LOST, None
        if field is not None and field in g["unsupported"]:
            return ERROR_NOT_SUPPORTED, None
        return SUCCESS, g

    def _mig(self, handle: Any) -> tuple[int, dict[str, Any] | None, dict[str, Any] | None]:
        """(return code, GPU state, MIG device) for a MIG device handle; (SUCCESS, None, None) when
        ``handle`` is not a MIG handle at all."""
        offset = _addr(handle) - _MIG_BASE
        if not 0 <= offset < len(self.gpus) * 8:
            return SUCCESS, None, None
        slot, index = divmod(offset, 8)
        rc, g = self._dev(_DEV_BASE + slot)
        if g is None:
            return rc, None, None
        instances = g["mig_instances"] if g["mig_mode"] == "enabled" else []
        if index >= len(instances):
            return ERROR_NOT_FOUND, None, None
        return SUCCESS, g, instances[index]

    @staticmethod
    def mig_uuid(g: dict[str, Any], inst: dict[str, Any]) -> str:
        tail = g["uuid"].removeprefix("GPU-")
        return f"MIG-{tail[:-4]}{inst['gpu_instance']:02x}{inst['compute_instance']:02x}"

    # --- library and system -----------------------------------------------------------------------

    def nvmlInitWithFlags(self, flags: int) -> int:
        self.advance()
        if self.init_error is not None:
            return ERROR_CODES[self.init_error]
        self.initialized += 1
        return SUCCESS

    def nvmlInit_v2(self) -> int:
        return self.nvmlInitWithFlags(0)

    def nvmlInit(self) -> int:
        return self.nvmlInitWithFlags(0)

    def nvmlShutdown(self) -> int:
        if not self.initialized:
            return ERROR_UNINITIALIZED
        self.initialized -= 1
        return SUCCESS

    def nvmlErrorString(self, code: Any) -> bytes:
        code = getattr(code, "value", code)
        names = {v: k for k, v in ERROR_CODES.items()}
        names.update({0: "success", 1: "uninitialized", 2: "invalid_argument", 3: "not_supported",
                      7: "insufficient_size", 13: "function_not_found"})
        return f"Simulated NVML error: {names.get(code, 'code ' + str(code))}".encode()

    def nvmlSystemGetDriverVersion(self, buf: Any, size: Any) -> int:
        buf.value = self.scenario.driver_version.encode()
        return SUCCESS if self.initialized else ERROR_UNINITIALIZED

    def nvmlSystemGetNVMLVersion(self, buf: Any, size: Any) -> int:
        buf.value = self.scenario.nvml_version.encode()
        return SUCCESS

    def nvmlSystemGetCudaDriverVersion(self, out: Any) -> int:
        major, minor = self.scenario.cuda_driver_version.split(".")
        out._obj.value = int(major) * 1000 + int(minor) * 10
        return SUCCESS if self.initialized else ERROR_UNINITIALIZED

    def nvmlSystemGetCudaDriverVersion_v2(self, out: Any) -> int:
        return self.nvmlSystemGetCudaDriverVersion(out)

    def nvmlSystemGetProcessName(self, pid: Any, buf: Any, size: Any) -> int:
        pid = pid.value
        for g in self.gpus:
            for p in g["processes"]:
                if p["pid"] == pid:
                    buf.value = p["name"].encode()
                    return SUCCESS
        return ERROR_NOT_FOUND

    def nvmlDeviceGetCount_v2(self, out: Any) -> int:
        self.advance()
        if self.delay_seconds:
            time.sleep(self.delay_seconds)  # a hung driver: real time, so a scrape meanwhile can be timed
        if not self.initialized:
            return ERROR_UNINITIALIZED
        out._obj.value = len(self.present_slots())
        return SUCCESS

    def nvmlDeviceGetCount(self, out: Any) -> int:
        return self.nvmlDeviceGetCount_v2(out)

    def nvmlDeviceGetHandleByIndex_v2(self, index: Any, out: Any) -> int:
        self.advance()
        if not self.initialized:
            return ERROR_UNINITIALIZED
        present = self.present_slots()
        i = index.value
        if not 0 <= i < len(present):
            return ERROR_INVALID_ARGUMENT
        _set_ptr(out._obj, _DEV_BASE + present[i])
        return SUCCESS

    def nvmlDeviceGetHandleByIndex(self, index: Any, out: Any) -> int:
        return self.nvmlDeviceGetHandleByIndex_v2(index, out)

    def nvmlDeviceGetHandleByUUID(self, uuid: Any, out: Any) -> int:
        want = uuid.value.decode() if hasattr(uuid, "value") else bytes(uuid).decode()
        for slot, g in enumerate(self.gpus):
            if g["uuid"] == want and g["present"]:
                _set_ptr(out._obj, _DEV_BASE + slot)
                return SUCCESS
        return ERROR_NOT_FOUND

    def nvmlDeviceGetHandleByPciBusId_v2(self, bus_id: Any, out: Any) -> int:
        want = (bus_id.value if hasattr(bus_id, "value") else bytes(bus_id)).decode().lower()
        for slot, g in enumerate(self.gpus):
            if g["pci_bus_id"].lower() == want and g["present"]:
                _set_ptr(out._obj, _DEV_BASE + slot)
                return SUCCESS
        return ERROR_NOT_FOUND

    # --- identity ---------------------------------------------------------------------------------

    def nvmlDeviceGetIndex(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle)
        if g is None:
            return rc
        out._obj.value = self.present_slots().index(_addr(handle) - _DEV_BASE)
        return SUCCESS

    def _string(self, handle: Any, buf: Any, key: str, field: str | None = None) -> int:
        rc, parent, inst = self._mig(handle)
        if parent is not None and inst is not None:
            value = self.mig_uuid(parent, inst) if key == "uuid" else \
                f"{parent['name']} MIG {inst['profile']}" if key == "name" else None
            if value is None:
                return ERROR_NOT_SUPPORTED
            buf.value = value.encode()
            return SUCCESS
        if rc != SUCCESS:
            return rc
        rc, g = self._dev(handle, field)
        if g is None:
            return rc
        buf.value = g[key].encode()
        return SUCCESS

    def nvmlDeviceGetName(self, handle: Any, buf: Any, size: Any) -> int:
        return self._string(handle, buf, "name")

    def nvmlDeviceGetUUID(self, handle: Any, buf: Any, size: Any) -> int:
        return self._string(handle, buf, "uuid")

    def nvmlDeviceGetSerial(self, handle: Any, buf: Any, size: Any) -> int:
        return self._string(handle, buf, "serial", "serial")

    def nvmlDeviceGetVbiosVersion(self, handle: Any, buf: Any, size: Any) -> int:
        return self._string(handle, buf, "vbios_version", "vbios_version")

    def nvmlDeviceGetPciInfo_v3(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle)
        if g is None:
            return rc
        info = out._obj
        bus = g["pci_bus_id"].encode()
        info.busId = bus
        info.busIdLegacy = bus[-12:] if len(bus) > 12 else bus
        parts = g["pci_bus_id"].replace(".", ":").split(":")
        with contextlib.suppress(ValueError, IndexError):
            info.domain, info.bus, info.device = int(parts[0], 16), int(parts[1], 16), int(parts[2], 16)
        info.pciDeviceId = 0x233010DE
        info.pciSubSystemId = 0x16C110DE
        return SUCCESS

    def nvmlDeviceGetPciInfo_v2(self, handle: Any, out: Any) -> int:
        return self.nvmlDeviceGetPciInfo_v3(handle, out)

    def nvmlDeviceGetArchitecture(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle)
        if g is None:
            return rc
        out._obj.value = ARCHITECTURES[g["architecture"]]
        return SUCCESS

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any, major: Any, minor: Any) -> int:
        rc, g = self._dev(handle)
        if g is None:
            return rc
        cc = {2: (3, 5), 3: (5, 2), 4: (6, 0), 5: (7, 0), 6: (7, 5), 7: (8, 0), 8: (8, 9), 9: (9, 0), 10: (10, 0)}
        major._obj.value, minor._obj.value = cc[ARCHITECTURES[g["architecture"]]]
        return SUCCESS

    def nvmlDeviceGetMigMode(self, handle: Any, current: Any, pending: Any) -> int:
        rc, g = self._dev(handle, "mig_mode")
        if g is None:
            return rc
        current._obj.value = pending._obj.value = 1 if g["mig_mode"] == "enabled" else 0
        return SUCCESS

    def _mig_capable(self, handle: Any) -> tuple[int, dict[str, Any] | None]:
        rc, g = self._dev(handle, "mig")
        if g is None:
            return rc, None
        if ARCHITECTURES[g["architecture"]] < MIG_ARCHITECTURE_MIN or "mig_mode" in g["unsupported"]:
            return ERROR_NOT_SUPPORTED, None
        return SUCCESS, g

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: Any, out: Any) -> int:
        rc, g = self._mig_capable(handle)
        if g is None:
            return rc
        out._obj.value = MAX_MIG_DEVICES
        return SUCCESS

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: Any, index: Any, out: Any) -> int:
        rc, g = self._mig_capable(handle)
        if g is None:
            return rc
        if g["mig_mode"] != "enabled":
            return ERROR_INVALID_ARGUMENT
        i = getattr(index, "value", index)
        if not 0 <= i < MAX_MIG_DEVICES:
            return ERROR_INVALID_ARGUMENT
        if i >= len(g["mig_instances"]):
            return ERROR_NOT_FOUND
        _set_ptr(out._obj, _MIG_BASE + (_addr(handle) - _DEV_BASE) * 8 + i)
        return SUCCESS

    def _mig_id(self, handle: Any, out: Any, key: str) -> int:
        rc, _g, inst = self._mig(handle)
        if rc != SUCCESS:
            return rc
        if inst is None:
            return ERROR_INVALID_ARGUMENT  # not a MIG device handle
        out._obj.value = inst[key]
        return SUCCESS

    def nvmlDeviceGetGpuInstanceId(self, handle: Any, out: Any) -> int:
        return self._mig_id(handle, out, "gpu_instance")

    def nvmlDeviceGetComputeInstanceId(self, handle: Any, out: Any) -> int:
        return self._mig_id(handle, out, "compute_instance")

    def nvmlDeviceIsMigDeviceHandle(self, handle: Any, out: Any) -> int:
        rc, _g, inst = self._mig(handle)
        if rc != SUCCESS:
            return rc
        out._obj.value = 1 if inst is not None else 0
        return SUCCESS

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: Any, out: Any) -> int:
        rc, _g, inst = self._mig(handle)
        if rc != SUCCESS:
            return rc
        if inst is None:
            return ERROR_INVALID_ARGUMENT
        _set_ptr(out._obj, _DEV_BASE + (_addr(handle) - _MIG_BASE) // 8)
        return SUCCESS

    def mig_memory_used(self, g: dict[str, Any], inst: dict[str, Any]) -> int:
        if inst["memory_used_bytes"] is not None:
            return int(inst["memory_used_bytes"])
        return sum(p["used_memory_bytes"] for p in g["processes"] if p.get("gpu_instance") == inst["gpu_instance"])

    # --- utilisation, memory, thermals, power -----------------------------------------------------

    def nvmlDeviceGetUtilizationRates(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle, "utilization_gpu_ratio")
        if g is None:
            return rc
        if g["mig_mode"] == "enabled":
            return ERROR_NOT_SUPPORTED  # as real drivers: no whole-GPU utilization in MIG mode
        if "utilization_memory_ratio" in g["unsupported"]:
            return ERROR_NOT_SUPPORTED
        util = out._obj
        util.gpu = round(g["utilization_gpu_ratio"] * 100)
        util.memory = round(g["utilization_memory_ratio"] * 100)
        return SUCCESS

    def nvmlDeviceGetMemoryInfo(self, handle: Any, out: Any) -> int:
        rc, parent, inst = self._mig(handle)
        if parent is not None and inst is not None:
            mem = out._obj
            mem.total = inst["memory_total_bytes"]
            mem.used = min(mem.total, self.mig_memory_used(parent, inst))
            mem.free = mem.total - mem.used
            return SUCCESS
        if rc != SUCCESS:
            return rc
        rc, g = self._dev(handle, "memory_used_bytes")
        if g is None:
            return rc
        mem = out._obj
        used = self.memory_used(g)
        total = g["memory_total_bytes"]
        # v1 semantics: "used" includes what the driver reserves.
        mem.total, mem.used = total, used + g["memory_reserved_bytes"]
        mem.free = max(0, total - used - g["memory_reserved_bytes"])
        return SUCCESS

    def nvmlDeviceGetMemoryInfo_v2(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle, "memory_used_bytes")
        if g is None:
            return rc
        if "memory_reserved_bytes" in g["unsupported"]:
            return ERROR_FUNCTION_NOT_FOUND  # an older driver: only the v1 call exists
        mem = out._obj
        used = self.memory_used(g)
        total, reserved = g["memory_total_bytes"], g["memory_reserved_bytes"]
        mem.total, mem.used, mem.reserved = total, used, reserved
        mem.free = max(0, total - used - reserved)
        return SUCCESS

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: Any, out: Any) -> int:
        rc, g = self._dev(handle, "temperature_gpu_celsius")
        if g is None:
            return rc
        out._obj.value = max(0, round(g["temperature_gpu_celsius"]))
        return SUCCESS

    def nvmlDeviceGetTemperatureV(self, handle: Any, out: Any) -> int:
        # Newer drivers' versioned call (nvitop and pynvml >= 12.575 prefer it): c_nvmlTemperature_v1_t.
        rc, g = self._dev(handle, "temperature_gpu_celsius")
        if g is None:
            return rc
        out._obj.temperature = max(0, round(g["temperature_gpu_celsius"]))
        return SUCCESS

    def nvmlDeviceGetTemperatureThreshold(self, handle: Any, threshold: Any, out: Any) -> int:
        rc, g = self._dev(handle, "temperature_thresholds_celsius")
        if g is None:
            return rc
        value = g["temperature_thresholds_celsius"].get(_THRESHOLD_IDS.get(threshold.value, ""))
        if value is None:
            return ERROR_NOT_SUPPORTED
        out._obj.value = round(value)
        return SUCCESS

    def nvmlDeviceGetFieldValues(self, handle: Any, count: Any, values: Any) -> int:
        rc, g = self._dev(handle)
        if g is None:
            return rc
        arr = values._obj
        now_us = int(time.time() * 1e6)
        self.settle_counters(g)
        if self._old_driver and any(arr[i].fieldId >= _FI_OLD_DRIVER_MAX for i in range(count.value)):
            return ERROR_INVALID_ARGUMENT  # this model's pre-R520 driver: an unknown id fails the batch
        for i in range(count.value):
            fv = arr[i]
            fv.timestamp = now_us
            rc, value_type, value = self._field(g, fv.fieldId, fv.scopeId)
            fv.nvmlReturn = rc
            if rc == SUCCESS:
                fv.valueType = value_type
                if value_type == _VT_ULL:
                    fv.value.ullVal = value
                else:
                    fv.value.uiVal = value
        return SUCCESS

    def _field(self, g: dict[str, Any], fid: int, scope: int) -> tuple[int, int, int]:
        """(return code, value type, value) of one field value."""
        kind = _FIELD_KINDS.get(fid)
        if kind is None:
            return ERROR_NOT_SUPPORTED, 0, 0
        what, name, link = kind
        unsupported = g["unsupported"]
        if what in _PLAIN_FIELDS:
            family, key = _PLAIN_FIELDS[what]
            if family in unsupported:
                return ERROR_NOT_SUPPORTED, 0, 0
            if what == "memory_temperature":
                return SUCCESS, _VT_UINT, max(0, round(g[key]))
            if what == "recovery_action":
                return SUCCESS, _VT_UINT, RECOVERY_ACTION_NAMES[g[key]]
            if what == "throttle":
                return SUCCESS, _VT_ULL, round(g[key].get(name, 0.0) * 1e9)
            return SUCCESS, _VT_ULL, g[key].get(name, 0) if name else g[key]
        # NVLink. The ids scoped by link exist from Ampere on in this model; older boards answer only
        # the per-link ids of the older API (links 0..11) and the per-link state call.
        links = g["nvlink_links"]
        arch = ARCHITECTURES[g["architecture"]]
        if what == "legacy":
            if not links or "nvlink_errors" in unsupported or (name == "crc_data" and arch >= 9):
                return ERROR_NOT_SUPPORTED, 0, 0
            if link >= links:
                return ERROR_INVALID_ARGUMENT, 0, 0
            return SUCCESS, _VT_ULL, int(g["nvlink_errors"].get(link, {}).get(name, 0))
        if not links or arch < 7 or what in unsupported:  # what: nvlink, nvlink_errors, nvlink_bytes
            return ERROR_NOT_SUPPORTED, 0, 0
        if scope >= links:
            return ERROR_INVALID_ARGUMENT, 0, 0
        if what == "nvlink":
            down = scope in g["nvlink_links_down"]
            return SUCCESS, _VT_UINT, pynvml.NVML_NVLINK_STATE_INACTIVE if down else pynvml.NVML_NVLINK_STATE_ACTIVE
        if what == "nvlink_errors":
            return SUCCESS, _VT_ULL, int(g["nvlink_errors"].get(scope, {}).get(name, 0))
        moved = g["_nvlink_bytes"].get(scope, {}).get(name, 0.0)
        return SUCCESS, _VT_ULL, int(moved // 1024)  # KiB

    def nvmlDeviceGetNvLinkState(self, handle: Any, link: Any, out: Any) -> int:
        rc, g = self._dev(handle, "nvlink")
        if g is None:
            return rc
        link = getattr(link, "value", link)
        if not g["nvlink_links"]:
            return ERROR_NOT_SUPPORTED
        if not 0 <= link < g["nvlink_links"]:
            return ERROR_INVALID_ARGUMENT
        out._obj.value = 0 if link in g["nvlink_links_down"] else 1
        return SUCCESS

    # --- PCIe link --------------------------------------------------------------------------------

    def _pcie_link(self, handle: Any, out: Any, key: str) -> int:
        rc, g = self._dev(handle, key)
        if g is None:
            return rc
        out._obj.value = g[key]
        return SUCCESS

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: Any, out: Any) -> int:
        return self._pcie_link(handle, out, "pcie_link_generation")

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: Any, out: Any) -> int:
        return self._pcie_link(handle, out, "pcie_link_generation_max")

    def nvmlDeviceGetGpuMaxPcieLinkGeneration(self, handle: Any, out: Any) -> int:
        return self._pcie_link(handle, out, "pcie_link_generation_device_max")

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: Any, out: Any) -> int:
        return self._pcie_link(handle, out, "pcie_link_width_lanes")

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: Any, out: Any) -> int:
        return self._pcie_link(handle, out, "pcie_link_width_max_lanes")

    def nvmlDeviceGetViolationStatus(self, handle: Any, policy: Any, out: Any) -> int:
        rc, g = self._dev(handle, "throttle_seconds")
        if g is None:
            return rc
        policy = getattr(policy, "value", policy)
        fid = pynvml.NVML_FI_DEV_PERF_POLICY_POWER + (policy if policy < 10 else policy - 4)  # 10, 11 -> 80, 81
        if fid not in _FI_THROTTLE:
            return ERROR_INVALID_ARGUMENT
        self.settle_counters(g)
        out._obj.referenceTime = int(time.time() * 1e6)
        out._obj.violationTime = round(g["throttle_seconds"].get(_FI_THROTTLE[fid], 0.0) * 1e9)
        return SUCCESS

    def nvmlDeviceGetPowerUsage(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle, "power_usage_watts")
        if g is None:
            return rc
        out._obj.value = round(g["power_usage_watts"] * 1000)
        return SUCCESS

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle, "power_limit_watts")
        if g is None:
            return rc
        out._obj.value = round(g["power_limit_watts"] * 1000)
        return SUCCESS

    def nvmlDeviceGetPowerManagementLimit(self, handle: Any, out: Any) -> int:
        return self.nvmlDeviceGetEnforcedPowerLimit(handle, out)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle, "energy_consumed_joules")
        if g is None:
            return rc
        self._settle_energy(g)
        out._obj.value = round(g["energy_consumed_joules"] * 1000)
        return SUCCESS

    # --- clocks, fan, P-state, PCIe ----------------------------------------------------------------

    def _clock_info(self, handle: Any, clock: Any, out: Any, field: str, key: str) -> int:
        rc, g = self._dev(handle, field)
        if g is None:
            return rc
        value = g[key].get(_CLOCK_IDS.get(clock.value, ""))
        if value is None:
            return ERROR_NOT_SUPPORTED
        out._obj.value = value
        return SUCCESS

    def nvmlDeviceGetClockInfo(self, handle: Any, clock: Any, out: Any) -> int:
        return self._clock_info(handle, clock, out, "clocks_hertz", "clocks_mhz")

    def nvmlDeviceGetMaxClockInfo(self, handle: Any, clock: Any, out: Any) -> int:
        return self._clock_info(handle, clock, out, "clocks_max_hertz", "clocks_max_mhz")

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle, "clock_event_reasons")
        if g is None:
            return rc
        mask = 0
        for reason in g["clock_event_reasons"]:
            mask |= CLOCK_EVENT_REASONS[reason]
        out._obj.value = mask
        return SUCCESS

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: Any, out: Any) -> int:
        return self.nvmlDeviceGetCurrentClocksEventReasons(handle, out)

    def nvmlDeviceGetSupportedClocksEventReasons(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle, "clock_event_reasons")
        if g is None:
            return rc
        out._obj.value = sum(CLOCK_EVENT_REASONS.values())
        return SUCCESS

    def nvmlDeviceGetSupportedClocksThrottleReasons(self, handle: Any, out: Any) -> int:
        return self.nvmlDeviceGetSupportedClocksEventReasons(handle, out)

    def nvmlDeviceGetFanSpeed(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle, "fan_speed_ratio")
        if g is None:
            return rc
        out._obj.value = round(g["fan_speed_ratio"] * 100)
        return SUCCESS

    def nvmlDeviceGetFanSpeed_v2(self, handle: Any, fan: Any, out: Any) -> int:
        return self.nvmlDeviceGetFanSpeed(handle, out)

    def nvmlDeviceGetNumFans(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle, "fan_speed_ratio")
        if g is None:
            return rc
        out._obj.value = 1
        return SUCCESS

    def nvmlDeviceGetPerformanceState(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle, "performance_state")
        if g is None:
            return rc
        out._obj.value = g["performance_state"]
        return SUCCESS

    def nvmlDeviceGetPowerState(self, handle: Any, out: Any) -> int:
        return self.nvmlDeviceGetPerformanceState(handle, out)

    def nvmlDeviceGetPcieThroughput(self, handle: Any, counter: Any, out: Any) -> int:
        key = "pcie_tx_bytes_per_second" if counter.value == 0 else "pcie_rx_bytes_per_second"
        rc, g = self._dev(handle, key)
        if g is None:
            return rc
        out._obj.value = round(g[key] / 1000)  # NVML reports KB/s
        return SUCCESS

    def nvmlDeviceGetPcieReplayCounter(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle, "pcie_replay_errors")
        if g is None:
            return rc
        out._obj.value = g["pcie_replay_errors"]
        return SUCCESS

    # --- memory errors ----------------------------------------------------------------------------

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: Any, counter: Any, out: Any) -> int:
        rc, g = self._dev(handle, "ecc_errors")
        if g is None:
            return rc
        et = "corrected" if error_type.value == 0 else "uncorrected"
        ct = "volatile" if counter.value == 0 else "aggregate"
        out._obj.value = g["ecc_errors"].get(et, {}).get(ct, 0)
        return SUCCESS

    def nvmlDeviceGetEccMode(self, handle: Any, current: Any, pending: Any) -> int:
        rc, g = self._dev(handle, "ecc_errors")
        if g is None:
            return rc
        current._obj.value = pending._obj.value = 1
        return SUCCESS

    def _retired(self, handle: Any, cause: Any, count: Any, pages: Any, times: Any = None) -> int:
        rc, g = self._dev(handle, "retired_pages")
        if g is None:
            return rc
        key = "single_bit_ecc" if cause.value == 0 else "double_bit_ecc"
        n = g["retired_pages"].get(key, 0)
        cap = count._obj.value
        count._obj.value = n
        if pages is None:
            return ERROR_INSUFFICIENT_SIZE if n else SUCCESS
        if cap < n:
            return ERROR_INSUFFICIENT_SIZE
        for i in range(n):
            pages[i] = 0x1000 * (i + 1)
            if times is not None:
                times[i] = 1_700_000_000 + i
        return SUCCESS

    def nvmlDeviceGetRetiredPages(self, handle: Any, cause: Any, count: Any, pages: Any) -> int:
        return self._retired(handle, cause, count, pages)

    def nvmlDeviceGetRetiredPages_v2(self, handle: Any, cause: Any, count: Any, pages: Any, times: Any) -> int:
        return self._retired(handle, cause, count, pages, times)

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle, "retired_pages_pending")
        if g is None:
            return rc
        out._obj.value = 1 if g["retired_pages_pending"] else 0
        return SUCCESS

    def nvmlDeviceGetRemappedRows(self, handle: Any, corr: Any, unc: Any, pending: Any, failure: Any) -> int:
        rc, g = self._dev(handle, "remapped_rows")
        if g is None:
            return rc
        corr._obj.value = g["remapped_rows"].get("correctable", 0)
        unc._obj.value = g["remapped_rows"].get("uncorrectable", 0)
        pending._obj.value = 1 if g["remapped_rows_pending"] else 0
        failure._obj.value = 1 if g["remapped_rows_failure"] else 0
        return SUCCESS

    # --- processes --------------------------------------------------------------------------------

    def _procs(self, handle: Any, count: Any, infos: Any, ptype: str) -> int:
        rc, g = self._dev(handle, "processes")
        if g is None:
            return rc
        procs = [p for p in g["processes"] if p["type"] == ptype]
        cap = count._obj.value
        count._obj.value = len(procs)
        if infos is None:
            return ERROR_INSUFFICIENT_SIZE if procs else SUCCESS
        if cap < len(procs):
            return ERROR_INSUFFICIENT_SIZE
        for i, p in enumerate(procs):
            info = infos[i]
            info.pid = p["pid"]
            info.usedGpuMemory = p["used_memory_bytes"]
            mig = g["mig_mode"] == "enabled" and p.get("gpu_instance") is not None
            info.gpuInstanceId = p["gpu_instance"] if mig else 0xFFFFFFFF
            info.computeInstanceId = (p.get("compute_instance") or 0) if mig else 0xFFFFFFFF
        return SUCCESS

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: Any, count: Any, infos: Any) -> int:
        return self._procs(handle, count, infos, "compute")

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: Any, count: Any, infos: Any) -> int:
        return self._procs(handle, count, infos, "compute")

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, handle: Any, count: Any, infos: Any) -> int:
        return self._procs(handle, count, infos, "graphics")

    def nvmlDeviceGetGraphicsRunningProcesses_v2(self, handle: Any, count: Any, infos: Any) -> int:
        return self._procs(handle, count, infos, "graphics")

    def nvmlDeviceGetMPSComputeRunningProcesses_v3(self, handle: Any, count: Any, infos: Any) -> int:
        rc, g = self._dev(handle)
        if g is None:
            return rc
        count._obj.value = 0
        return SUCCESS

    def nvmlDeviceGetProcessUtilization(self, handle: Any, samples: Any, count: Any, since: Any) -> int:
        rc, g = self._dev(handle, "process_sm_utilization_ratio")
        if g is None:
            return rc
        if g["mig_mode"] == "enabled":
            return ERROR_NOT_SUPPORTED
        procs = [p for p in g["processes"] if p["sm_utilization_ratio"] is not None]
        if not procs:
            return ERROR_NOT_FOUND  # what NVML answers when it has no samples
        cap = count._obj.value
        count._obj.value = len(procs)
        if samples is None or cap < len(procs):
            return ERROR_INSUFFICIENT_SIZE
        ts = int(time.time() * 1e6)
        for i, p in enumerate(procs):
            s = samples[i]
            s.pid = p["pid"]
            s.timeStamp = ts
            s.smUtil = round(p["sm_utilization_ratio"] * 100)
            s.memUtil = s.encUtil = s.decUtil = 0
        return SUCCESS

    # --- XID events -------------------------------------------------------------------------------

    def nvmlEventSetCreate(self, out: Any) -> int:
        if not self.initialized:
            return ERROR_UNINITIALIZED
        with self.lock:
            es_id = self._next_id
            self._next_id += 1
            self._event_sets[es_id] = {"mask": {}, "queue": deque()}
        _set_ptr(out._obj, _EVSET_BASE + es_id)
        return SUCCESS

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle, "xid_errors")
        if g is None:
            return rc
        out._obj.value = EVENT_XID
        return SUCCESS

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: Any, event_set: Any) -> int:
        rc, g = self._dev(handle, "xid_errors")
        if g is None:
            return rc
        es = self._event_sets.get(_addr(event_set) - _EVSET_BASE)
        if es is None:
            return ERROR_INVALID_ARGUMENT
        slot = _addr(handle) - _DEV_BASE
        with self.lock:
            es["mask"][slot] = es["mask"].get(slot, 0) | (event_types.value & EVENT_XID)
        return SUCCESS

    def nvmlEventSetWait_v2(self, event_set: Any, data: Any, timeout_ms: Any) -> int:
        self.advance()
        es = self._event_sets.get(_addr(event_set) - _EVSET_BASE)
        if es is None:
            return ERROR_INVALID_ARGUMENT
        with self._event_cond:
            if not es["queue"]:
                self._event_cond.wait(timeout_ms.value / 1000.0)
        self.advance()
        with self._event_cond:
            if not es["queue"]:
                return ERROR_TIMEOUT
            slot, etype, xid = es["queue"].popleft()
        d = data._obj
        _set_ptr_field(d, _DEV_BASE + slot)
        d.eventType = etype
        d.eventData = xid
        d.gpuInstanceId = d.computeInstanceId = 0xFFFFFFFF
        return SUCCESS

    def nvmlEventSetWait(self, event_set: Any, data: Any, timeout_ms: Any) -> int:
        return self.nvmlEventSetWait_v2(event_set, data, timeout_ms)

    def nvmlEventSetFree(self, event_set: Any) -> int:
        with self._event_cond:
            if self._event_sets.pop(_addr(event_set) - _EVSET_BASE, None) is None:
                return ERROR_INVALID_ARGUMENT
            self._event_cond.notify_all()
        return SUCCESS

    # --- GPM (Hopper and newer) -------------------------------------------------------------------

    def nvmlGpmQueryDeviceSupport(self, handle: Any, out: Any) -> int:
        rc, g = self._dev(handle)
        if g is None:
            return rc
        out._obj.isSupportedDevice = int(ARCHITECTURES[g["architecture"]] >= 9 and "gpm_ratios" not in g["unsupported"])
        return SUCCESS

    def nvmlGpmSampleAlloc(self, out: Any) -> int:
        with self.lock:
            sid = self._next_id
            self._next_id += 1
            self._gpm_samples[sid] = None
        _set_ptr(out._obj, _GPM_BASE + sid)
        return SUCCESS

    def nvmlGpmSampleFree(self, sample: Any) -> int:
        with self.lock:
            if self._gpm_samples.pop(_addr(sample) - _GPM_BASE, 0) == 0:
                return ERROR_INVALID_ARGUMENT
        return SUCCESS

    def nvmlGpmSampleGet(self, handle: Any, sample: Any) -> int:
        rc, g = self._dev(handle, "gpm_ratios")
        if g is None:
            return rc
        if ARCHITECTURES[g["architecture"]] < 9 or g["mig_mode"] == "enabled":
            return ERROR_NOT_SUPPORTED  # in MIG mode GPM is per GPU instance (nvmlGpmMigSampleGet)
        sid = _addr(sample) - _GPM_BASE
        if sid not in self._gpm_samples:
            return ERROR_INVALID_ARGUMENT
        self._gpm_samples[sid] = (_addr(handle) - _DEV_BASE, self.now, None)
        return SUCCESS

    def nvmlGpmMigSampleGet(self, handle: Any, gpu_instance: Any, sample: Any) -> int:
        rc, g = self._dev(handle, "gpm_ratios")
        if g is None:
            return rc
        gi = getattr(gpu_instance, "value", gpu_instance)
        if ARCHITECTURES[g["architecture"]] < 9 or g["mig_mode"] != "enabled":
            return ERROR_NOT_SUPPORTED
        if not any(m["gpu_instance"] == gi for m in g["mig_instances"]):
            return ERROR_NOT_FOUND
        sid = _addr(sample) - _GPM_BASE
        if sid not in self._gpm_samples:
            return ERROR_INVALID_ARGUMENT
        self._gpm_samples[sid] = (_addr(handle) - _DEV_BASE, self.now, gi)
        return SUCCESS

    def nvmlGpmMetricsGet(self, metrics_get: Any) -> int:
        self.advance()
        mg = metrics_get._obj
        s1 = self._gpm_samples.get(_addr(mg.sample1) - _GPM_BASE)
        s2 = self._gpm_samples.get(_addr(mg.sample2) - _GPM_BASE)
        if s1 is None or s2 is None or s1[0] != s2[0] or s1[2] != s2[2]:
            return ERROR_INVALID_ARGUMENT
        g = self.gpus[s2[0]]
        ratios = g["gpm_ratios"]
        if s2[2] is not None:  # a MIG GPU instance
            ratios = next((m["gpm_ratios"] for m in g["mig_instances"] if m["gpu_instance"] == s2[2]), {})
        for i in range(mg.numMetrics):
            m = mg.metrics[i]
            name = _GPM_IDS.get(m.metricId)
            if name is None:
                m.nvmlReturn = ERROR_NOT_SUPPORTED
                continue
            m.value = ratios.get(name, 0.0) * 100.0
            m.nvmlReturn = SUCCESS
        return SUCCESS


def _set_ptr_field(event_data: Any, value: int) -> None:
    """Set c_nvmlEventData_t.device (a pointer field at offset 0) to a fake handle."""
    _VOID_P.from_buffer(event_data).value = value


def _plain(method: Callable[..., Any], name: str, calls: Counter[str]) -> Callable[..., Any]:
    """Wrap a bound method in a plain function so callers can set attributes (``fn.restype``); count
    each call."""

    def fn(*args: Any) -> Any:
        calls[name] += 1
        return method(*args)

    fn.__name__ = name
    return fn
