"""Scenario files: a simulated GPU fleet plus a timeline of faults, validated strictly.

A scenario is YAML (or TOML) so people can write one by hand; every mistake must therefore come back
as a message naming the file, the line (YAML) or key path, and what was expected, because a silently
ignored typo (``temprature_gpu_celsius``) would make a demo or an alert test quietly wrong.

Field names are those of ``exporter.snapshot.GpuSample`` in base units (bytes, watts, Celsius,
ratios 0..1), except clocks, which are given in MHz as NVML speaks them (``clocks_mhz``). Byte sizes
may be written as ``"80GiB"``. The event schema is documented in ``exporter/simulate/__init__.py``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from exporter.nvml.field_values import NVLINK_ERRORS, PCIE_ERROR_FIELDS, RECOVERY_ACTIONS, THROTTLE_FIELDS
from exporter.nvml.fields import CLOCK_EVENT_REASONS


class ScenarioError(ValueError):
    """A scenario file or event is invalid; the message says where and what was expected."""


class SimulatedOutOfMemory(ScenarioError):
    """An ``allocate`` event that does not fit in the simulated GPU's free memory (answered 409)."""

    def __init__(self, message: str, free_bytes: int, total_bytes: int) -> None:
        super().__init__(message)
        self.free_bytes = free_bytes
        self.total_bytes = total_bytes


# --- vocabulary -------------------------------------------------------------------------------------

ARCHITECTURES = {
    "kepler": 2, "maxwell": 3, "pascal": 4, "volta": 5, "turing": 6,
    "ampere": 7, "ada": 8, "hopper": 9, "blackwell": 10,
}
THRESHOLDS = ("slowdown", "shutdown", "gpu_max", "memory_max")
CLOCKS = ("graphics", "sm", "memory")
GPM_METRICS = ("sm_active", "tensor_active", "dram_bandwidth")
PCIE_ERRORS = tuple(PCIE_ERROR_FIELDS)
THROTTLE_REASONS = tuple(THROTTLE_FIELDS)
RECOVERY_ACTION_NAMES = {name: code for code, name in RECOVERY_ACTIONS.items()}
MAX_NVLINKS = 36  # NVML_NVLINK_MAX_LINKS
MAX_MIG_DEVICES = 7
MIG_ARCHITECTURE_MIN = 7  # MIG exists from Ampere (A100/A30) on
# Error kinds a scenario can make NVML answer with, and the NVML return code for each.
ERROR_CODES = {
    "gpu_lost": 15,  # NVML_ERROR_GPU_IS_LOST
    "timeout": 10,  # NVML_ERROR_TIMEOUT
    "unknown": 999,  # NVML_ERROR_UNKNOWN
    "not_found": 6,  # NVML_ERROR_NOT_FOUND
    "no_permission": 4,  # NVML_ERROR_NO_PERMISSION
    "driver_not_loaded": 9,  # NVML_ERROR_DRIVER_NOT_LOADED
    "library_not_found": 12,  # NVML_ERROR_LIBRARY_NOT_FOUND
    "reset_required": 16,  # NVML_ERROR_RESET_REQUIRED
}
# Names usable in ``unsupported``: the GpuSample fields (and process fields) NVML may refuse.
UNSUPPORTABLE = frozenset({
    "utilization_gpu_ratio", "utilization_memory_ratio",
    "memory_used_bytes", "memory_free_bytes", "memory_total_bytes", "memory_reserved_bytes",
    "temperature_gpu_celsius", "temperature_memory_celsius", "temperature_thresholds_celsius",
    "power_usage_watts", "power_limit_watts", "energy_consumed_joules",
    "clocks_hertz", "clocks_max_hertz", "clock_event_reasons",
    "fan_speed_ratio", "performance_state",
    "pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second", "pcie_replay_errors",
    "ecc_errors", "retired_pages", "retired_pages_pending",
    "remapped_rows", "remapped_rows_pending", "remapped_rows_failure",
    "gpm_ratios", "xid_errors", "processes", "process_sm_utilization_ratio",
    "serial", "vbios_version", "mig_mode",
    "nvlink", "nvlink_errors", "nvlink_bytes", "pcie_link_generation", "pcie_link_generation_max",
    "pcie_link_generation_device_max", "pcie_link_width_lanes", "pcie_link_width_max_lanes", "pcie_errors",
    "throttle_seconds", "recovery_action", "mig",
})

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


# --- typed views of the validated data ---------------------------------------------------------------

@dataclass(frozen=True)
class TimedEvent:
    """One timeline entry: ``event`` (validated, without ``at``) applied ``at`` seconds after install."""

    at: float
    event: dict[str, Any]


@dataclass(frozen=True)
class Scenario:
    """A validated scenario: system facts, one state dict per simulated GPU, and the timeline."""

    name: str
    source: str
    description: str
    driver_version: str
    cuda_driver_version: str
    nvml_version: str
    gpus: tuple[dict[str, Any], ...]
    timeline: tuple[TimedEvent, ...] = field(default=())


# --- loading ----------------------------------------------------------------------------------------

class _Ctx:
    """Where we are in a document: file name plus YAML marks by key path, for error messages."""

    def __init__(self, source: str, marks: dict[tuple[Any, ...], int]) -> None:
        self.source = source
        self.marks = marks

    def fail(self, path: tuple[Any, ...], expected: str) -> ScenarioError:
        line = None
        p = path
        while line is None:
            line = self.marks.get(p)
            if not p:
                break
            p = p[:-1]
        where = self.source if line is None else f"{self.source}, line {line}"
        key = _fmt_path(path) or "(top level)"
        return ScenarioError(f"{where}: {key}: {expected}")


def _fmt_path(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _construct(node: yaml.Node, path: tuple[Any, ...], marks: dict[tuple[Any, ...], int], source: str) -> Any:
    """Turn a composed YAML node into plain Python while remembering each key's line."""
    marks[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        merged: list[dict[Any, Any]] = []
        merged_marks: dict[tuple[Any, ...], int] = {}
        for knode, vnode in node.value:
            if knode.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: shared GPU specs, explicit keys win
                sources = vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode]
                for src in sources:
                    value = _construct(src, path, merged_marks, source)
                    if not isinstance(value, dict):
                        raise ScenarioError(f"{source}, line {knode.start_mark.line + 1}: {_fmt_path(path) or '(top level)'}: "
                                            "`<<` expects a mapping (or list of mappings) to merge")
                    merged.append(value)
                continue
            key = _scalar(knode) if isinstance(knode, yaml.ScalarNode) else None
            if not isinstance(key, str | int) or isinstance(key, bool):  # int: NVLink link indexes
                raise ScenarioError(f"{source}, line {knode.start_mark.line + 1}: keys must be strings")
            if key in out:
                raise ScenarioError(f"{source}, line {knode.start_mark.line + 1}: {_fmt_path((*path, key))}: "
                                    "duplicate key")
            marks[(*path, key)] = knode.start_mark.line + 1
            out[key] = _construct(vnode, (*path, key), marks, source)
            marks[(*path, key)] = knode.start_mark.line + 1
        for m in merged:
            for k, v in m.items():
                out.setdefault(k, v)
        for p, line in merged_marks.items():
            marks.setdefault(p, line)
        marks[path] = node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, (*path, i), marks, source) for i, v in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    """Resolve a scalar node's tag (int, float, bool, null, str) the way yaml.safe_load would."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def _find_shipped(name: str) -> Path | None:
    base = resources.files("exporter.simulate") / "scenarios"
    for suffix in (".yaml", ".yml", ".toml"):
        candidate = base / f"{name}{suffix}"
        if candidate.is_file():
            return Path(str(candidate))
    return None


def shipped_scenarios() -> list[str]:
    """Names of the scenarios shipped with the package (for --help and the README)."""
    base = resources.files("exporter.simulate") / "scenarios"
    return sorted(p.name.rsplit(".", 1)[0] for p in base.iterdir() if p.name.endswith((".yaml", ".toml")))


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Load a shipped scenario by name, or a YAML/TOML file by path; raise ScenarioError if invalid."""
    text_name = str(name_or_path)
    path = Path(text_name)
    if not path.is_file():
        shipped = _find_shipped(text_name)
        if shipped is None:
            raise ScenarioError(
                f"{text_name}: no such scenario file, and not a shipped scenario "
                f"(shipped: {', '.join(shipped_scenarios())})"
            )
        path = shipped
    source = str(path)
    try:
        raw_text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{source}: cannot read: {exc}") from exc
    marks: dict[tuple[Any, ...], int] = {}
    if path.suffix == ".toml":
        import tomllib

        try:
            data: Any = tomllib.loads(raw_text)
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(f"{source}: not valid TOML: {exc}") from exc
    else:
        try:
            node = yaml.compose(raw_text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as exc:
            raise ScenarioError(f"{source}: not valid YAML: {exc}") from exc
        data = {} if node is None else _construct(node, (), marks, source)
    default_name = path.name.rsplit(".", 1)[0]
    return parse_scenario(data, source=source, marks=marks, default_name=default_name)


def parse_scenario(data: Any, source: str = "<scenario>", marks: dict[tuple[Any, ...], int] | None = None,
                   default_name: str = "scenario") -> Scenario:
    """Validate an already-parsed scenario document (dict) and build a Scenario."""
    ctx = _Ctx(source, marks or {})
    doc = _mapping(ctx, (), data, {"name", "description", "driver_version", "cuda_driver_version",
                                   "nvml_version", "gpus", "timeline"}, required={"gpus"})
    name = _str(ctx, ("name",), doc.get("name", default_name))
    groups = doc["gpus"]
    if not isinstance(groups, list) or not groups:
        raise ctx.fail(("gpus",), "expected a non-empty list of GPU groups (each with optional `count`)")
    gpus: list[dict[str, Any]] = []
    for gi, group in enumerate(groups):
        gpath = ("gpus", gi)
        g = _mapping(ctx, gpath, group, _GPU_KEYS | {"count"})
        count = _int(ctx, (*gpath, "count"), g.get("count", 1), lo=1, hi=4096)
        for _ in range(count):
            gpus.append(_gpu_state(ctx, gpath, g, slot=len(gpus), scenario=name))
    timeline: list[TimedEvent] = []
    raw_tl = doc.get("timeline", [])
    if not isinstance(raw_tl, list):
        raise ctx.fail(("timeline",), "expected a list of events, each with `at: <seconds>`")
    for ei, ev in enumerate(raw_tl):
        epath = ("timeline", ei)
        if not isinstance(ev, dict) or "at" not in ev:
            raise ctx.fail(epath, "expected a mapping with `at: <seconds>` and an action")
        at = _num(ctx, (*epath, "at"), ev["at"], lo=0)
        body = {k: v for k, v in ev.items() if k != "at"}
        timeline.append(TimedEvent(at=at, event=validate_event(body, len(gpus), ctx, epath)))
    timeline.sort(key=lambda t: t.at)
    return Scenario(
        name=name,
        source=source,
        description=_str(ctx, ("description",), doc.get("description", "")),
        driver_version=_str(ctx, ("driver_version",), doc.get("driver_version", "550.54.15")),
        cuda_driver_version=_version(ctx, ("cuda_driver_version",), doc.get("cuda_driver_version", "12.4")),
        nvml_version=_str(ctx, ("nvml_version",), doc.get("nvml_version", "12.550.54.15")),
        gpus=tuple(gpus),
        timeline=tuple(timeline),
    )


# --- GPU state --------------------------------------------------------------------------------------

_RATIO_FIELDS = ("utilization_gpu_ratio", "utilization_memory_ratio", "fan_speed_ratio")
_BYTES_FIELDS = ("memory_total_bytes", "memory_used_bytes", "memory_reserved_bytes")
_FLOAT_FIELDS = ("temperature_gpu_celsius", "temperature_memory_celsius", "power_usage_watts",
                 "power_limit_watts", "energy_consumed_joules", "pcie_tx_bytes_per_second",
                 "pcie_rx_bytes_per_second")
_INT_FIELDS = ("performance_state", "pcie_replay_errors")
_BOOL_FIELDS = ("retired_pages_pending", "remapped_rows_pending", "remapped_rows_failure")
_PCIE_LINK_FIELDS = {  # field -> highest value
    "pcie_link_generation": 6, "pcie_link_generation_max": 6, "pcie_link_generation_device_max": 6,
    "pcie_link_width_lanes": 32, "pcie_link_width_max_lanes": 32,
}
_STR_FIELDS = ("name", "uuid", "serial", "pci_bus_id", "vbios_version")
# Fields a `ramp` may move linearly.
RAMPABLE = frozenset(_RATIO_FIELDS + _BYTES_FIELDS + _FLOAT_FIELDS + _INT_FIELDS)
# Fields `set` may change after start (identity stays fixed: it is what the exporter keys on).
SETTABLE = frozenset(RAMPABLE | set(_BOOL_FIELDS) | set(_PCIE_LINK_FIELDS) | {
    "temperature_thresholds_celsius", "clocks_mhz", "clocks_max_mhz", "clock_event_reasons",
    "ecc_errors", "retired_pages", "remapped_rows", "gpm_ratios", "mig_mode", "processes",
    "pcie_errors", "nvlink_links", "nvlink_links_down", "nvlink_errors", "nvlink_error_rates",
    "nvlink_bytes_per_second", "throttle_seconds", "recovery_action", "mig_instances",
})
_GPU_KEYS = frozenset(SETTABLE | set(_STR_FIELDS) | {"architecture", "unsupported"})

_DEFAULTS: dict[str, Any] = {
    "name": "NVIDIA H100 80GB HBM3",
    "architecture": "hopper",
    "vbios_version": "96.00.89.00.01",
    "mig_mode": "disabled",
    "utilization_gpu_ratio": 0.0,
    "utilization_memory_ratio": 0.0,
    "memory_total_bytes": 80 * 2**30,
    "memory_reserved_bytes": 512 * 2**20,
    "memory_used_bytes": None,  # None: the sum of the processes' memory
    "temperature_gpu_celsius": 35.0,
    "temperature_memory_celsius": 40.0,
    "temperature_thresholds_celsius": {"slowdown": 90.0, "shutdown": 92.0, "gpu_max": 87.0, "memory_max": 95.0},
    "power_usage_watts": 70.0,
    "power_limit_watts": 700.0,
    "energy_consumed_joules": 0.0,
    "clocks_mhz": {"graphics": 1980, "sm": 1980, "memory": 2619},
    "clocks_max_mhz": {"graphics": 1980, "sm": 1980, "memory": 2619},
    "clock_event_reasons": [],
    "fan_speed_ratio": 0.3,
    "performance_state": 0,
    "pcie_tx_bytes_per_second": 0.0,
    "pcie_rx_bytes_per_second": 0.0,
    "pcie_replay_errors": 0,
    "ecc_errors": {"corrected": {"volatile": 0, "aggregate": 0}, "uncorrected": {"volatile": 0, "aggregate": 0}},
    "retired_pages": {"single_bit_ecc": 0, "double_bit_ecc": 0},
    "retired_pages_pending": False,
    "remapped_rows": {"correctable": 0, "uncorrectable": 0},
    "remapped_rows_pending": False,
    "remapped_rows_failure": False,
    "gpm_ratios": {"sm_active": 0.0, "tensor_active": 0.0, "dram_bandwidth": 0.0},
    "processes": [],
    # PCIe link: an H100 SXM's Gen5 x16 in a Gen5 slot.
    "pcie_link_generation": 5,
    "pcie_link_generation_max": 5,
    "pcie_link_generation_device_max": 5,
    "pcie_link_width_lanes": 16,
    "pcie_link_width_max_lanes": 16,
    "pcie_errors": {},  # name -> count (absent names count 0)
    # NVLink: how many links the board has (0: none), which are down, absolute error counters
    # {link: {error: n}}, error rates {link: {error: per second}} and data rates {tx, rx} per up link,
    # both accumulated on the scenario clock.
    "nvlink_links": 0,
    "nvlink_links_down": [],
    "nvlink_errors": {},
    "nvlink_error_rates": {},
    "nvlink_bytes_per_second": {"tx": 0.0, "rx": 0.0},
    # Throttle time: a starting offset per reason; it grows while a matching clock-event reason is set.
    "throttle_seconds": {},
    "recovery_action": "none",
    # MIG devices (used while mig_mode is enabled): [{gpu_instance, compute_instance, profile,
    # memory_total_bytes, memory_used_bytes (null: its processes' sum), gpm_ratios}].
    "mig_instances": [],
}


def _gpu_state(ctx: _Ctx, gpath: tuple[Any, ...], g: dict[str, Any], slot: int, scenario: str) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for key, default in _DEFAULTS.items():
        state[key] = _copy(default)
    for key, value in g.items():
        if key == "count":
            continue
        if key in _STR_FIELDS:
            state[key] = _str(ctx, (*gpath, key), value)
        elif key == "architecture":
            if value not in ARCHITECTURES:
                raise ctx.fail((*gpath, key), f"expected one of {', '.join(ARCHITECTURES)}, got {value!r}")
            state[key] = value
        elif key == "unsupported":
            state[key] = _unsupported(ctx, (*gpath, key), value)
        else:
            state[key] = _field_value(ctx, (*gpath, key), key, value)
    # Identity derived from the slot unless given (given identities repeat across `count`, so suffix).
    state.setdefault("uuid", f"GPU-{_hex(scenario, 8)}-{slot:04x}-4{slot % 4096:03x}-8000-{_hex(scenario + str(slot), 12)}")
    if "uuid" in g and g.get("count", 1) > 1:
        state["uuid"] = f"{g['uuid']}-{slot}"
    state.setdefault("serial", f"{1650923000000 + slot}")
    state.setdefault("pci_bus_id", f"00000000:{0x18 + slot * 0x10 & 0xFF:02X}:00.0")
    arch = ARCHITECTURES[state["architecture"]]
    # Real drivers: row remapping replaced page retirement with Ampere; GPM exists from Hopper on.
    unsup = {"retired_pages", "retired_pages_pending"} if arch >= 7 else \
        {"remapped_rows", "remapped_rows_pending", "remapped_rows_failure"}
    if arch < 9:
        unsup.add("gpm_ratios")
    state["unsupported"] = frozenset(unsup) | state.get("unsupported", frozenset())
    state["lost"] = False
    state["present"] = True
    state["error"] = None
    return state


def _hex(seed: str, n: int) -> str:
    import hashlib

    return hashlib.sha256(seed.encode()).hexdigest()[:n]


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _field_value(ctx: _Ctx, path: tuple[Any, ...], key: str, value: Any) -> Any:
    """Validate one settable GPU field and return it in the simulator's internal form."""
    if key in _RATIO_FIELDS:
        return _num(ctx, path, value, lo=0, hi=1, what="a ratio between 0 and 1")
    if key in _BYTES_FIELDS:
        if key == "memory_used_bytes" and value is None:
            return None
        return _bytes(ctx, path, value)
    if key in _FLOAT_FIELDS:
        return _num(ctx, path, value, lo=-273 if "temperature" in key else 0)
    if key in _INT_FIELDS:
        return _int(ctx, path, value, lo=0, hi=15 if key == "performance_state" else 2**62)
    if key in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ctx.fail(path, f"expected true or false, got {value!r}")
        return value
    if key == "temperature_thresholds_celsius":
        d = _mapping(ctx, path, value, set(THRESHOLDS))
        return {k: _num(ctx, (*path, k), v) for k, v in d.items()}
    if key in ("clocks_mhz", "clocks_max_mhz"):
        d = _mapping(ctx, path, value, set(CLOCKS))
        return {k: _int(ctx, (*path, k), v, lo=0, hi=100_000) for k, v in d.items()}
    if key == "clock_event_reasons":
        if not isinstance(value, list):
            raise ctx.fail(path, f"expected a list of reasons ({', '.join(CLOCK_EVENT_REASONS)})")
        for i, r in enumerate(value):
            if r not in CLOCK_EVENT_REASONS:
                raise ctx.fail((*path, i), f"expected one of {', '.join(CLOCK_EVENT_REASONS)}, got {r!r}")
        return list(value)
    if key == "ecc_errors":
        d = _mapping(ctx, path, value, {"corrected", "uncorrected"})
        out = {}
        for et, counters in d.items():
            c = _mapping(ctx, (*path, et), counters, {"volatile", "aggregate"})
            out[et] = {k: _int(ctx, (*path, et, k), v, lo=0) for k, v in c.items()}
        return out
    if key == "retired_pages":
        d = _mapping(ctx, path, value, {"single_bit_ecc", "double_bit_ecc"})
        return {k: _int(ctx, (*path, k), v, lo=0, hi=100_000) for k, v in d.items()}
    if key == "remapped_rows":
        d = _mapping(ctx, path, value, {"correctable", "uncorrectable"})
        return {k: _int(ctx, (*path, k), v, lo=0, hi=100_000) for k, v in d.items()}
    if key == "gpm_ratios":
        d = _mapping(ctx, path, value, set(GPM_METRICS))
        return {k: _num(ctx, (*path, k), v, lo=0, hi=1, what="a ratio between 0 and 1") for k, v in d.items()}
    if key == "mig_mode":
        if value not in ("enabled", "disabled"):
            raise ctx.fail(path, f"expected `enabled` or `disabled`, got {value!r}")
        return value
    if key in _PCIE_LINK_FIELDS:
        return _int(ctx, path, value, lo=1, hi=_PCIE_LINK_FIELDS[key])
    if key == "pcie_errors":
        d = _mapping(ctx, path, value, set(PCIE_ERRORS))
        return {k: _int(ctx, (*path, k), v, lo=0) for k, v in d.items()}
    if key == "nvlink_links":
        return _int(ctx, path, value, lo=0, hi=MAX_NVLINKS)
    if key == "nvlink_links_down":
        if not isinstance(value, list):
            raise ctx.fail(path, "expected a list of link indexes")
        return sorted({_int(ctx, (*path, i), v, lo=0, hi=MAX_NVLINKS - 1) for i, v in enumerate(value)})
    if key in ("nvlink_errors", "nvlink_error_rates"):
        if not isinstance(value, Mapping):
            raise ctx.fail(path, f"expected a mapping of link index -> {{{', '.join(NVLINK_ERRORS)}}}")
        out_links: dict[int, dict[str, float]] = {}
        for link, counters in value.items():
            lpath = (*path, link)
            index = _int(ctx, lpath, int(link) if isinstance(link, str) and link.isdigit() else link,
                         lo=0, hi=MAX_NVLINKS - 1)
            c = _mapping(ctx, lpath, counters, set(NVLINK_ERRORS))
            out_links[index] = {k: (_int(ctx, (*lpath, k), v, lo=0) if key == "nvlink_errors"
                                    else _num(ctx, (*lpath, k), v, lo=0)) for k, v in c.items()}
        return out_links
    if key == "nvlink_bytes_per_second":
        d = _mapping(ctx, path, value, {"tx", "rx"})
        return {k: _num(ctx, (*path, k), v, lo=0) for k, v in d.items()}
    if key == "throttle_seconds":
        d = _mapping(ctx, path, value, set(THROTTLE_REASONS))
        return {k: _num(ctx, (*path, k), v, lo=0) for k, v in d.items()}
    if key == "recovery_action":
        if value not in RECOVERY_ACTION_NAMES:
            raise ctx.fail(path, f"expected one of {', '.join(RECOVERY_ACTION_NAMES)}, got {value!r}")
        return value
    if key == "mig_instances":
        if not isinstance(value, list) or len(value) > MAX_MIG_DEVICES:
            raise ctx.fail(path, f"expected a list of at most {MAX_MIG_DEVICES} MIG devices")
        instances = [_mig_instance(ctx, (*path, i), m) for i, m in enumerate(value)]
        seen_ids: set[tuple[int, int]] = set()
        for i, m in enumerate(instances):
            ids = (m["gpu_instance"], m["compute_instance"])
            if ids in seen_ids:
                raise ctx.fail((*path, i), f"GPU instance {ids[0]} / compute instance {ids[1]} listed twice")
            seen_ids.add(ids)
        return instances
    if key == "processes":
        if not isinstance(value, list):
            raise ctx.fail(path, "expected a list of processes ({pid, type, used_memory_bytes, ...})")
        procs = [_process(ctx, (*path, i), p) for i, p in enumerate(value)]
        seen: set[tuple[int, str]] = set()
        for i, p in enumerate(procs):
            k = (p["pid"], p["type"])
            if k in seen:
                raise ctx.fail((*path, i, "pid"), f"pid {p['pid']} ({p['type']}) listed twice")
            seen.add(k)
        return procs
    raise ctx.fail(path, f"unknown field {key!r}")


def _mig_instance(ctx: _Ctx, path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    d = _mapping(ctx, path, value, {"gpu_instance", "compute_instance", "profile", "memory_total_bytes",
                                    "memory_used_bytes", "gpm_ratios"}, required={"gpu_instance", "profile"})
    used = d.get("memory_used_bytes")
    return {
        "gpu_instance": _int(ctx, (*path, "gpu_instance"), d["gpu_instance"], lo=0, hi=64),
        "compute_instance": _int(ctx, (*path, "compute_instance"), d.get("compute_instance", 0), lo=0, hi=64),
        "profile": _str(ctx, (*path, "profile"), d["profile"]),
        "memory_total_bytes": _bytes(ctx, (*path, "memory_total_bytes"), d.get("memory_total_bytes", "10GiB")),
        "memory_used_bytes": None if used is None else _bytes(ctx, (*path, "memory_used_bytes"), used),
        "gpm_ratios": _field_value(ctx, (*path, "gpm_ratios"), "gpm_ratios", d.get("gpm_ratios", {})),
    }


def _process(ctx: _Ctx, path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    d = _mapping(ctx, path, value, {"pid", "type", "used_memory_bytes", "sm_utilization_ratio", "name",
                                    "gpu_instance", "compute_instance"}, required={"pid"})
    ptype = d.get("type", "compute")
    if ptype not in ("compute", "graphics"):
        raise ctx.fail((*path, "type"), f"expected `compute` or `graphics`, got {ptype!r}")
    sm = d.get("sm_utilization_ratio")
    return {
        "pid": _int(ctx, (*path, "pid"), d["pid"], lo=1, hi=2**32 - 1),
        "type": ptype,
        "used_memory_bytes": _bytes(ctx, (*path, "used_memory_bytes"), d.get("used_memory_bytes", 0)),
        "sm_utilization_ratio": None if sm is None else
        _num(ctx, (*path, "sm_utilization_ratio"), sm, lo=0, hi=1, what="a ratio between 0 and 1"),
        "name": _str(ctx, (*path, "name"), d.get("name", f"python{d['pid']}")),
        "gpu_instance": None if d.get("gpu_instance") is None else
        _int(ctx, (*path, "gpu_instance"), d["gpu_instance"], lo=0, hi=64),
        "compute_instance": None if d.get("compute_instance") is None else
        _int(ctx, (*path, "compute_instance"), d["compute_instance"], lo=0, hi=64),
    }


def _unsupported(ctx: _Ctx, path: tuple[Any, ...], value: Any) -> frozenset[str]:
    if not isinstance(value, list):
        raise ctx.fail(path, "expected a list of field names")
    for i, v in enumerate(value):
        if v not in UNSUPPORTABLE:
            raise ctx.fail((*path, i), f"expected a field name NVML can refuse ({', '.join(sorted(UNSUPPORTABLE))}), "
                                       f"got {v!r}")
    return frozenset(value)


# --- events -----------------------------------------------------------------------------------------

_EVENT_KEYS = frozenset({"gpu", "set", "ramp", "duration_seconds", "xid", "lost", "present", "error",
                         "unsupported", "supported", "add_process", "remove_process", "add_ecc_errors",
                         "add_nvlink_errors", "allocate", "nvml_delay_seconds", "nvml_init_error"})
_GLOBAL_ACTIONS = frozenset({"nvml_delay_seconds", "nvml_init_error"})


def validate_event(event: Any, gpu_count: int, ctx: _Ctx | None = None,
                   path: tuple[Any, ...] = ("event",)) -> dict[str, Any]:
    """Check one event (timeline entry without `at`) and return its normalised form."""
    ctx = ctx or _Ctx("event", {})
    ev = _mapping(ctx, path, event, set(_EVENT_KEYS))
    actions = set(ev) - {"gpu", "duration_seconds"}
    if not actions:
        raise ctx.fail(path, f"expected at least one action ({', '.join(sorted(_EVENT_KEYS - {'gpu', 'duration_seconds'}))})")
    out: dict[str, Any] = {}
    gpu_actions = actions - _GLOBAL_ACTIONS
    if gpu_actions:
        if "gpu" not in ev:
            raise ctx.fail(path, f"`gpu` (an index, a list of indexes or \"all\") is required for {', '.join(sorted(gpu_actions))}")
        g = ev["gpu"]
        if g == "all":
            out["gpu"] = list(range(gpu_count))
        else:
            items = g if isinstance(g, list) else [g]
            for i, item in enumerate(items):
                if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < gpu_count:
                    p = (*path, "gpu", i) if isinstance(g, list) else (*path, "gpu")
                    raise ctx.fail(p, f"expected a GPU index 0..{gpu_count - 1}, a list of them or \"all\", got {item!r}")
            out["gpu"] = list(items)
    elif "gpu" in ev:
        raise ctx.fail((*path, "gpu"), "not used by node-wide actions (nvml_delay_seconds, nvml_init_error)")
    if "set" in ev:
        d = _mapping(ctx, (*path, "set"), ev["set"], set(SETTABLE))
        out["set"] = {k: _field_value(ctx, (*path, "set", k), k, v) for k, v in d.items()}
    if "ramp" in ev:
        d = _mapping(ctx, (*path, "ramp"), ev["ramp"], set(RAMPABLE))
        if "duration_seconds" not in ev:
            raise ctx.fail(path, "`ramp` needs `duration_seconds` (how long the change takes)")
        out["ramp"] = {k: _field_value(ctx, (*path, "ramp", k), k, v) for k, v in d.items()}
        if any(v is None for v in out["ramp"].values()):
            raise ctx.fail((*path, "ramp"), "ramp targets must be numbers")
    if "duration_seconds" in ev:
        if "ramp" not in ev:
            raise ctx.fail((*path, "duration_seconds"), "only used together with `ramp`")
        out["duration_seconds"] = _num(ctx, (*path, "duration_seconds"), ev["duration_seconds"], lo=0)
    if "xid" in ev:
        out["xid"] = _int(ctx, (*path, "xid"), ev["xid"], lo=1, hi=2**31)
    for flag in ("lost", "present"):
        if flag in ev:
            if not isinstance(ev[flag], bool):
                raise ctx.fail((*path, flag), f"expected true or false, got {ev[flag]!r}")
            out[flag] = ev[flag]
    for key in ("error", "nvml_init_error"):
        if key in ev:
            if ev[key] is not None and ev[key] not in ERROR_CODES:
                raise ctx.fail((*path, key), f"expected null or one of {', '.join(ERROR_CODES)}, got {ev[key]!r}")
            out[key] = ev[key]
    for key in ("unsupported", "supported"):
        if key in ev:
            out[key] = _unsupported(ctx, (*path, key), ev[key])
    if "add_process" in ev:
        out["add_process"] = _process(ctx, (*path, "add_process"), ev["add_process"])
    if "allocate" in ev:
        out["allocate"] = _process(ctx, (*path, "allocate"), ev["allocate"])
    if "remove_process" in ev:
        out["remove_process"] = _int(ctx, (*path, "remove_process"), ev["remove_process"], lo=1, hi=2**32 - 1)
    if "add_ecc_errors" in ev:
        d = _mapping(ctx, (*path, "add_ecc_errors"), ev["add_ecc_errors"], {"corrected", "uncorrected"})
        out["add_ecc_errors"] = {k: _int(ctx, (*path, "add_ecc_errors", k), v, lo=0) for k, v in d.items()}
    if "add_nvlink_errors" in ev:
        out["add_nvlink_errors"] = _field_value(ctx, (*path, "add_nvlink_errors"), "nvlink_errors",
                                                ev["add_nvlink_errors"])
    if "nvml_delay_seconds" in ev:
        out["nvml_delay_seconds"] = _num(ctx, (*path, "nvml_delay_seconds"), ev["nvml_delay_seconds"], lo=0, hi=600)
    return out


# --- primitive checks -------------------------------------------------------------------------------

def _mapping(ctx: _Ctx, path: tuple[Any, ...], value: Any, allowed: set[str] | frozenset[str],
             required: set[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ctx.fail(path, f"expected a mapping with keys from: {', '.join(sorted(allowed))}; got {type(value).__name__}")
    for key in value:
        if key not in allowed:
            raise ctx.fail((*path, key), f"unknown key {key!r}; expected one of: {', '.join(sorted(allowed))}")
    for key in sorted(required or ()):
        if key not in value:
            raise ctx.fail(path, f"missing required key {key!r}")
    return dict(value)


def _num(ctx: _Ctx, path: tuple[Any, ...], value: Any, lo: float | None = None, hi: float | None = None,
         what: str = "a number") -> float:
    if isinstance(value, str):  # YAML 1.1 reads "1.2e9" (no sign in the exponent) as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ctx.fail(path, f"expected {what}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"{'' if lo is None else lo}..{'' if hi is None else hi}"
        raise ctx.fail(path, f"expected {what} in {rng}, got {value!r}")
    return float(value)


def _int(ctx: _Ctx, path: tuple[Any, ...], value: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.fail(path, f"expected an integer, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ctx.fail(path, f"expected an integer in {'' if lo is None else lo}..{'' if hi is None else hi}, got {value}")
    return value


def _str(ctx: _Ctx, path: tuple[Any, ...], value: Any) -> str:
    if not isinstance(value, str):
        raise ctx.fail(path, f"expected a string, got {value!r}")
    return value


def _version(ctx: _Ctx, path: tuple[Any, ...], value: Any) -> str:
    text = str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not re.fullmatch(r"\d+\.\d+", text):
        raise ctx.fail(path, f"expected a version like \"12.4\", got {value!r}")
    return text


def _bytes(ctx: _Ctx, path: tuple[Any, ...], value: Any) -> int:
    if isinstance(value, bool):
        raise ctx.fail(path, f"expected a size in bytes (e.g. 1073741824 or \"1GiB\"), got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ctx.fail(path, f"expected a non-negative size, got {value!r}")
        return int(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2)])
    raise ctx.fail(path, f"expected a size in bytes (e.g. 1073741824 or \"1GiB\"), got {value!r}")
