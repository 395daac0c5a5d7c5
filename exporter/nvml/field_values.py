"""NVML field values read in batches: one ``nvmlDeviceGetFieldValues`` call answers many counters.

Which field ids a GPU answers depends on its architecture and driver (NVLink counters moved from
per-link ids ``..._L0`` .. ``_L11`` to ids scoped by link; a PCIe card has no NVLink at all). So each
*value* (``FieldSpec``) lists candidate ``(field id, scope id)`` pairs in order of preference, and a
``FieldPlan`` asks for every candidate once per NVML session, keeps the first one each GPU answers and
drops the values it refuses as "not supported". Every later poll asks only for the kept ids, in
batches of at most ``BATCH`` entries: the cost is one or two calls per GPU, whatever is enabled.

Field ids come from nvidia-ml-py's own constants, never numbers typed here. ``read_device_fields``
turns one GPU's answers into base units (``DeviceFields``).
"""

from __future__ import annotations

import ctypes
import logging
import struct
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pynvml

from exporter.nvml.errors import FieldReader
from exporter.nvml.fields import field_value

log = logging.getLogger(__name__)

_KIB = 1024
_NS = 1e-9
BATCH = 64  # entries per nvmlDeviceGetFieldValues call (a precaution: NVML documents no maximum)
_SCOPE_ALL = 0


class _FieldValue(ctypes.Structure):
    """nvmlFieldValue_t with pynvml's own layout (its ``_fields_``), as a plain ctypes structure: pynvml's
    printable structure converts on every attribute access, which costs more than the NVML call for a
    batch of a hundred values read every poll."""

    _fields_ = pynvml.c_nvmlFieldValue_t._fields_


# A polled batch is decoded from its bytes (valueType, nvmlReturn, the 8-byte value union) rather than
# through a ctypes structure and union per entry, which cost 2 us a value (a thousand values per poll at
# 8 GPUs). Each union member is read from the union's first bytes in native order, as ctypes does;
# ``field_value`` stays the reference for the other paths, and a test holds the two equal.
_ENTRY = struct.Struct("=24xII8s")
_MEMBERS = {  # value type -> the union member's own format
    pynvml.NVML_VALUE_TYPE_DOUBLE: struct.Struct("=d"),
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: struct.Struct("=I"),
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: struct.Struct("=Q" if ctypes.sizeof(ctypes.c_ulong) == 8 else "=I"),
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: struct.Struct("=Q"),
    pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: struct.Struct("=q"),
    pynvml.NVML_VALUE_TYPE_SIGNED_INT: struct.Struct("=i"),
    pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: struct.Struct("=H"),
}
_OTHER = struct.Struct("=I")  # field_value's fallback: uiVal
_RAW_DECODING = (  # the layout the format assumes; anything else takes the ctypes path
    _ENTRY.size == ctypes.sizeof(_FieldValue)
    and (_FieldValue.valueType.offset, _FieldValue.nvmlReturn.offset, _FieldValue.value.offset) == (24, 28, 32)
)


def decoded(arrays: Iterable[Any]) -> Iterator[float | int | None]:
    """Per entry of filled request arrays: its value, or None where NVML answered an error."""
    ok = pynvml.NVML_SUCCESS
    for array in arrays:
        if not _RAW_DECODING:
            yield from (field_value(fv) if fv.nvmlReturn == ok else None for fv in array)
            continue
        for vt, ret, raw in _ENTRY.iter_unpack(memoryview(array).cast("B")):
            yield _MEMBERS.get(vt, _OTHER).unpack_from(raw)[0] if ret == ok else None

# Return codes inside one field value that mean "this GPU has no such value" (drop it from the plan).
# INVALID_ARGUMENT is what a link index beyond the GPU's last link answers.
_ABSENT = frozenset({
    pynvml.NVML_ERROR_NOT_SUPPORTED,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_INVALID_ARGUMENT,
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
})


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One value: its key in the result, the family it belongs to (named in ``GpuSample.unsupported``
    when the GPU answers none of the family), and the field ids that can answer it, preferred first."""

    key: Hashable
    family: str
    candidates: tuple[tuple[int, int], ...]


class _Batches:
    """Request arrays for a fixed list of (field id, scope id), filled in once and reused every poll
    (NVML writes the answers next to the ids it leaves in place)."""

    def __init__(self, ids: list[tuple[int, int]]) -> None:
        self.arrays: list[Any] = []
        for start in range(0, len(ids), BATCH):
            chunk = ids[start:start + BATCH]
            array = (_FieldValue * len(chunk))()
            for entry, (fid, scope) in zip(array, chunk, strict=True):
                entry.fieldId, entry.scopeId = fid, scope
            self.arrays.append(array)

    def get(self, handle: Any) -> list[Any]:
        """One nvmlDeviceGetFieldValues call per array (the C function, as pynvml's wrapper calls it),
        then every array, filled. Raises NVMLError when a call itself fails (the GPU is lost, or the
        driver has no field API)."""
        for array in self.arrays:
            _call(handle, array)
        return self.arrays

    def get_tolerant(self, handle: Any) -> list[Any | None]:
        """Like ``get``, but a batch the driver refuses as a whole (an id it does not know may fail the
        entire call on some drivers) is asked again one entry at a time; entries it refuses are None.
        Errors that concern the GPU itself still raise. Used once per session, to find the plan."""
        out: list[Any | None] = []
        for array in self.arrays:
            try:
                _call(handle, array)
                out.extend(array)
                continue
            except pynvml.NVMLError as exc:
                if exc.value not in _ABSENT:
                    raise
            for entry in array:
                single = (_FieldValue * 1)(entry)
                try:
                    _call(handle, single)
                    out.append(single[0])
                except pynvml.NVMLError as exc:
                    if exc.value not in _ABSENT:
                        raise
                    out.append(None)
        return out


def _call(handle: Any, array: Any) -> None:
    fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetFieldValues")
    ret = fn(handle, ctypes.c_int32(len(array)), ctypes.byref(array))
    if ret != pynvml.NVML_SUCCESS:
        raise pynvml.NVMLError(ret)


class FieldPlan:
    """The field values one GPU answers, found on the first read of an NVML session."""

    def __init__(self, specs: Iterable[FieldSpec]) -> None:
        self._specs = tuple(specs)
        self._chosen: list[tuple[Hashable, tuple[int, int]]] | None = None
        self._batches: _Batches | None = None
        self.unsupported: frozenset[str] = frozenset()  # families with no value on this GPU

    @property
    def resolved(self) -> bool:
        return self._chosen is not None

    @property
    def size(self) -> int:
        """Entries asked per poll once resolved (benchmarks report it)."""
        return len(self._chosen) if self._chosen is not None else sum(len(s.candidates) for s in self._specs)

    def read(self, handle: Any) -> dict[Hashable, float | int]:
        """Values by key; a value whose field answered an error this time is left out."""
        if self._chosen is None:
            return self._resolve(handle)
        if not self._chosen or self._batches is None:
            return {}
        answers = decoded(self._batches.get(handle))
        return {key: value for (key, _), value in zip(self._chosen, answers, strict=True) if value is not None}

    def _resolve(self, handle: Any) -> dict[Hashable, float | int]:
        asked = [c for s in self._specs for c in s.candidates]
        values = _Batches(asked).get_tolerant(handle) if asked else []
        answers = {(c[0], c[1]): fv for c, fv in zip(asked, values, strict=True) if fv is not None}
        chosen: list[tuple[Hashable, tuple[int, int]]] = []
        result: dict[Hashable, float | int] = {}
        families_seen: set[str] = set()
        for spec in self._specs:
            pick = None
            for cand in spec.candidates:
                fv = answers.get(cand)
                if fv is not None and fv.nvmlReturn == pynvml.NVML_SUCCESS:
                    pick = cand
                    result[spec.key] = field_value(fv)
                    break
            if pick is None:
                # Keep the first candidate that failed for another reason (busy, no data yet).
                pick = next((c for c in spec.candidates
                             if c in answers and answers[c].nvmlReturn not in _ABSENT), None)
            if pick is not None:
                chosen.append((spec.key, pick))
                families_seen.add(spec.family)
        self._chosen = chosen
        self._batches = _Batches([fid for _, fid in chosen])
        self.unsupported = frozenset(s.family for s in self._specs) - families_seen
        log.debug("field plan: %d of %d values answered", len(chosen), len(self._specs))
        return result


# --- the values read this way -------------------------------------------------------------------------

# PCIe error counters (label value -> field id). Correctable / non-fatal / fatal are the AER classes.
PCIE_ERROR_FIELDS = {
    "correctable": pynvml.NVML_FI_DEV_PCIE_COUNT_CORRECTABLE_ERRORS,
    "non_fatal": pynvml.NVML_FI_DEV_PCIE_COUNT_NON_FATAL_ERROR,
    "fatal": pynvml.NVML_FI_DEV_PCIE_COUNT_FATAL_ERROR,
    "replay_rollover": pynvml.NVML_FI_DEV_PCIE_REPLAY_ROLLOVER_COUNTER,
    "l0_to_recovery": pynvml.NVML_FI_DEV_PCIE_L0_TO_RECOVERY_COUNTER,
    "naks_received": pynvml.NVML_FI_DEV_PCIE_COUNT_NAKS_RECEIVED,
    "naks_sent": pynvml.NVML_FI_DEV_PCIE_COUNT_NAKS_SENT,
    "receiver_error": pynvml.NVML_FI_DEV_PCIE_COUNT_RECEIVER_ERROR,
    "bad_tlp": pynvml.NVML_FI_DEV_PCIE_COUNT_BAD_TLP,
    "bad_dllp": pynvml.NVML_FI_DEV_PCIE_COUNT_BAD_DLLP,
    "lcrc": pynvml.NVML_FI_DEV_PCIE_COUNT_LCRC_ERROR,
    "unsupported_request": pynvml.NVML_FI_DEV_PCIE_COUNT_UNSUPPORTED_REQ,
}

# Cumulative time (ns) the clocks were held below what was asked, by reason: the perf-policy
# counters of nvmlDeviceGetViolationStatus, read as field values. These ids are stable across
# drivers; the newer NVML_FI_DEV_CLOCKS_EVENT_REASON_* thermal/power-brake ids are not (251-253 in
# the 12.570 headers, 269-271 in 12.575+), so they are not read: a driver with the other numbering
# would answer a different field under the same id.
THROTTLE_FIELDS = {
    "power": pynvml.NVML_FI_DEV_PERF_POLICY_POWER,
    "thermal": pynvml.NVML_FI_DEV_PERF_POLICY_THERMAL,
    "sync_boost": pynvml.NVML_FI_DEV_PERF_POLICY_SYNC_BOOST,
    "board_limit": pynvml.NVML_FI_DEV_PERF_POLICY_BOARD_LIMIT,
    "low_utilization": pynvml.NVML_FI_DEV_PERF_POLICY_LOW_UTILIZATION,
    "reliability": pynvml.NVML_FI_DEV_PERF_POLICY_RELIABILITY,
    "below_application_clocks": pynvml.NVML_FI_DEV_PERF_POLICY_TOTAL_APP_CLOCKS,
    "below_base_clocks": pynvml.NVML_FI_DEV_PERF_POLICY_TOTAL_BASE_CLOCKS,
}

# NVML_FI_DEV_GET_GPU_RECOVERY_ACTION values -> label (unknown future codes: "code_<n>").
RECOVERY_ACTIONS = {
    pynvml.NVML_GPU_RECOVERY_ACTION_NONE: "none",
    pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET: "gpu_reset",
    pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT: "node_reboot",
    pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_P2P: "drain_p2p",
    pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET: "drain_and_reset",
    pynvml.NVML_GPU_RECOVERY_ACTION_RECOVER_IMEX_DOMAIN: "recover_imex_domain",
    pynvml.NVML_GPU_RECOVERY_ACTION_BUS_RESET: "bus_reset",
    pynvml.NVML_GPU_RECOVERY_ACTION_SYSTEM_REBOOT: "system_reboot",
}

NVLINK_ERRORS = ("crc_flit", "crc_data", "replay", "recovery")
# Per-link ids of the older API exist for links 0..11 only: (error, link) -> id.
_LEGACY_NVLINK_BASES = {
    "crc_flit": (pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_L0, pynvml.NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_L6),
    "crc_data": (pynvml.NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_L0, pynvml.NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_L6),
    "replay": (pynvml.NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_L0, pynvml.NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_L6),
    "recovery": (pynvml.NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_L0, pynvml.NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_L6),
}
# Ids scoped by link (scopeId = link index), any link count.
_SCOPED_NVLINK = {
    "crc_flit": pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_CRC,
    "replay": pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_REPLAY,
    "recovery": pynvml.NVML_FI_DEV_NVLINK_ERROR_DL_RECOVERY,
}
_NVLINK_BYTES = {"tx": pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, "rx": pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX}
# Link states that carry traffic (SLEEP is the low-power idle state of a trained link).
NVLINK_UP_STATES = frozenset({pynvml.NVML_NVLINK_STATE_ACTIVE, pynvml.NVML_NVLINK_STATE_SLEEP})


def legacy_nvlink_field(error: str, link: int) -> int | None:
    """The per-link id of the older API (links 0..11: L0..L5 and L6..L11 are two separate ranges)."""
    if link >= 12:
        return None
    low, high = _LEGACY_NVLINK_BASES[error]
    return low + link if link < 6 else high + link - 6


def nvlink_specs(max_links: int = pynvml.NVML_NVLINK_MAX_LINKS) -> list[FieldSpec]:
    """State, error counters and data bytes of every link index NVML could have: links a GPU does not
    have answer INVALID_ARGUMENT / NOT_SUPPORTED on the first read and drop out of the plan."""
    specs: list[FieldSpec] = []
    for link in range(max_links):
        specs.append(FieldSpec(("nvlink_state", link), "nvlink", ((pynvml.NVML_FI_DEV_NVLINK_GET_STATE, link),)))
        for error in NVLINK_ERRORS:
            cands: list[tuple[int, int]] = []
            if error in _SCOPED_NVLINK:
                cands.append((_SCOPED_NVLINK[error], link))
            legacy = legacy_nvlink_field(error, link)
            if legacy is not None:
                cands.append((legacy, _SCOPE_ALL))
            if cands:
                specs.append(FieldSpec(("nvlink_errors", link, error), "nvlink_errors", tuple(cands)))
        for direction, fid in _NVLINK_BYTES.items():
            specs.append(FieldSpec(("nvlink_bytes", link, direction), "nvlink_bytes", ((fid, link),)))
    return specs


def device_specs() -> list[FieldSpec]:
    """Every field-value read of one GPU per poll (NVLink, PCIe counters, throttle time, recovery
    action, memory temperature)."""
    specs = [
        FieldSpec(("memory_temperature",), "temperature_memory_celsius", ((pynvml.NVML_FI_DEV_MEMORY_TEMP, 0),)),
        FieldSpec(("pcie_replay",), "pcie_replay_errors", ((pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER, 0),)),
        FieldSpec(("recovery_action",), "recovery_action", ((pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION, 0),)),
    ]
    specs += [FieldSpec(("pcie_errors", name), "pcie_errors", ((fid, 0),)) for name, fid in PCIE_ERROR_FIELDS.items()]
    specs += [FieldSpec(("throttle", name), "throttle_seconds", ((fid, 0),)) for name, fid in THROTTLE_FIELDS.items()]
    return specs + nvlink_specs()


def recovery_action_name(code: int) -> str:
    return RECOVERY_ACTIONS.get(code, f"code_{code}" if 0 <= code < 256 else "unknown")


def nvlink_state_probe(handle: Any, get_state: Callable[[Any, int], int]) -> dict[int, bool]:
    """Older drivers without the scoped state field: ask nvmlDeviceGetNvLinkState per link until the
    GPU says there is no such link. Returns link -> up."""
    out: dict[int, bool] = {}
    for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
        try:
            out[link] = bool(get_state(handle, link))
        except pynvml.NVMLError as exc:
            if exc.value in _ABSENT:
                break
            raise
    return out


@dataclass(slots=True)
class DeviceFields:
    """What one GPU's field values gave in one poll, in base units (absent: None or a missing key)."""

    memory_temperature: float | None = None
    pcie_replay_errors: int | None = None
    recovery_action: str | None = None
    pcie_errors: dict[str, int] = field(default_factory=dict)
    throttle_seconds: dict[str, float] = field(default_factory=dict)
    nvlink_up: dict[int, bool] = field(default_factory=dict)
    nvlink_errors: dict[tuple[int, str], int] = field(default_factory=dict)
    nvlink_bytes: dict[tuple[int, str], int] = field(default_factory=dict)


class DeviceFieldReader:
    """One GPU's field values for one NVML session: its plan, plus the per-link state calls of drivers
    without the link-scoped state field."""

    def __init__(self) -> None:
        self.plan = FieldPlan(device_specs())
        self._nvlink_by_call: bool | None = None  # None: not decided yet

    def read(self, r: FieldReader) -> DeviceFields:
        values = self.plan.read(r.handle)
        r.unsupported |= self.plan.unsupported
        out = DeviceFields()
        for key, value in values.items():
            kind = key[0]  # type: ignore[index]
            if kind == "nvlink_state":
                out.nvlink_up[key[1]] = int(value) in NVLINK_UP_STATES  # type: ignore[index]
            elif kind == "nvlink_errors":
                out.nvlink_errors[(key[1], key[2])] = int(value)  # type: ignore[index]
            elif kind == "nvlink_bytes":
                out.nvlink_bytes[(key[1], key[2])] = int(value) * _KIB  # type: ignore[index]
            elif kind == "pcie_errors":
                out.pcie_errors[key[1]] = int(value)  # type: ignore[index]
            elif kind == "throttle":
                out.throttle_seconds[key[1]] = value * _NS  # type: ignore[index]
            elif kind == "recovery_action":
                out.recovery_action = recovery_action_name(int(value))
            elif kind == "pcie_replay":
                out.pcie_replay_errors = int(value)
            elif kind == "memory_temperature":
                out.memory_temperature = float(value) if value else None  # 0: no HBM sensor reading
        if "nvlink" in self.plan.unsupported and self._nvlink_by_call is not False:
            out.nvlink_up = nvlink_state_probe(r.handle, pynvml.nvmlDeviceGetNvLinkState)
            self._nvlink_by_call = bool(out.nvlink_up)
            if out.nvlink_up:
                r.unsupported.discard("nvlink")
        return out
