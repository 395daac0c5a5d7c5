"""Simulated GPUs at the NVML boundary, so the real reader (and any nvidia-ml-py program) runs on them.

``install(load_scenario("healthy-8gpu"))`` replaces the NVML library beneath nvidia-ml-py's wrappers
(``pynvml.nvmlLib``) with a fake function table (exporter.simulate.fake). The scenario's timeline
runs on ``clock`` (monotonic by default; tests pass their own) starting at install time.

Event schema (a timeline entry without ``at``; also the body of POST /-/simulate/events, and what
``SimulatedNvml.apply`` takes). ``gpu`` is a scenario slot index, a list of them, or ``"all"``:

- ``{"gpu": 0, "set": {"temperature_gpu_celsius": 95, "clock_event_reasons": ["sw_thermal_slowdown"]}}``
  sets GpuSample-named fields (base units; clocks as ``clocks_mhz``/``clocks_max_mhz``; sizes may be
  ``"8GiB"``; ``memory_used_bytes: null`` means "sum of the processes").
- ``{"gpu": 0, "ramp": {"temperature_gpu_celsius": 95}, "duration_seconds": 60}`` moves numeric fields
  linearly from their current value.
- ``{"gpu": 1, "xid": 79}`` delivers an XID through the NVML event API; 79 ("fell off the bus") also
  makes the GPU lost.
- ``{"gpu": 2, "lost": true}`` / ``false``: every call on the GPU answers NVML_ERROR_GPU_IS_LOST / recovers.
- ``{"gpu": 2, "present": false}`` / ``true``: the GPU vanishes from / returns to enumeration.
- ``{"gpu": 3, "error": "timeout"}`` / ``null``: calls on the GPU fail with that NVML error
  (gpu_lost, timeout, unknown, not_found, no_permission, ...).
- ``{"gpu": 0, "unsupported": ["fan_speed_ratio"]}`` / ``"supported": [...]``: NVML answers NOT_SUPPORTED.
- ``{"gpu": 0, "add_process": {"pid": 1234, "type": "compute", "used_memory_bytes": "4GiB",
  "sm_utilization_ratio": 0.5}}`` / ``{"gpu": 0, "remove_process": 1234}``.
- ``{"gpu": 0, "allocate": {"pid": 1234, "used_memory_bytes": "6GiB"}}``: like ``add_process``, but
  the device decides: when the process's new total does not fit beside the others (total minus reserved
  memory), nothing changes and SimulatedOutOfMemory is raised (the HTTP API answers 409 with
  ``free_bytes``); the GPU's used memory becomes the sum of its processes. Jobs sharing a simulated GPU
  compete for it this way (workload.train --sim-gpu).
- ``{"gpu": 0, "add_ecc_errors": {"corrected": 10, "uncorrected": 1}}`` adds to volatile and aggregate.
- ``{"gpu": 0, "add_nvlink_errors": {3: {"crc_flit": 500, "replay": 20}}}`` adds to link 3's NVLink
  error counters (``set: {nvlink_error_rates: {3: {crc_flit: 50}}}`` makes them grow per second instead;
  ``set: {nvlink_links_down: [3]}`` takes link 3 down).
- PCIe link, throttle time, recovery action and MIG are GPU fields too: ``set: {pcie_link_width_lanes: 8,
  pcie_link_generation: 3}``, ``set: {recovery_action: gpu_reset}``, ``set: {mig_instances: [...]}``.
  Throttle time grows by itself while a matching ``clock_event_reasons`` entry is set.
- Node-wide, no ``gpu``: ``{"nvml_delay_seconds": 2.0}`` (each device enumeration stalls that long,
  like a hung driver) and ``{"nvml_init_error": "driver_not_loaded"}`` / ``null`` (nvmlInit fails).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from exporter.simulate.fake import FakeNvmlLib
from exporter.simulate.scenario import (
    Scenario,
    ScenarioError,
    SimulatedOutOfMemory,
    TimedEvent,
    load_scenario,
    parse_scenario,
    shipped_scenarios,
    validate_event,
)

__all__ = [
    "Scenario",
    "ScenarioError",
    "SimulatedNvml",
    "SimulatedOutOfMemory",
    "TimedEvent",
    "install",
    "load_scenario",
    "parse_scenario",
    "shipped_scenarios",
]

log = logging.getLogger(__name__)
_install_lock = threading.Lock()


class _FunctionTable:
    """What pynvml.nvmlLib points at: attribute lookups return the fake's plain functions."""

    def __init__(self, fake: FakeNvmlLib) -> None:
        self._fake = fake

    def __getattr__(self, name: str) -> Any:
        return self._fake.function(name)


class SimulatedNvml:
    """An installed simulation: apply events now, read the state, uninstall."""

    def __init__(self, scenario: Scenario, clock: Callable[[], float]) -> None:
        self.scenario = scenario
        self.lib = FakeNvmlLib(scenario, clock)
        self.lib.apply_event = self._apply_validated
        self._previous: Any = None
        self.installed = False

    @property
    def now(self) -> float:
        """Seconds of scenario time since install (advances the timeline)."""
        return self.lib.advance()

    def apply(self, event: Mapping[str, Any]) -> None:
        """Validate one event (timeline entry without ``at``) and apply it now; ScenarioError if bad."""
        ev = validate_event(event, len(self.lib.gpus))  # not dict(event): a non-mapping must be a ScenarioError
        with self.lib.lock:
            self.lib.advance()
            self._apply_validated(ev)

    def _apply_validated(self, ev: dict[str, Any]) -> None:
        lib = self.lib
        if "nvml_delay_seconds" in ev:
            lib.delay_seconds = ev["nvml_delay_seconds"]
        if "nvml_init_error" in ev:
            lib.init_error = ev["nvml_init_error"]
        for slot in ev.get("gpu", ()):
            g = lib.gpus[slot]
            lib.settle_counters(g)  # accumulated counters up to now, before any rate changes
            for key, value in ev.get("set", {}).items():
                lib.cancel_ramp(slot, key)
                if key == "processes":
                    g["processes"] = [dict(p) for p in value]
                elif isinstance(value, dict) and isinstance(g.get(key), dict):
                    merged = dict(g[key])
                    for k, v in value.items():
                        merged[k] = {**merged.get(k, {}), **v} if isinstance(v, dict) else v
                    g[key] = merged
                else:
                    lib.set_field(slot, key, value)
            for key, target in ev.get("ramp", {}).items():
                lib.start_ramp(slot, key, target, ev["duration_seconds"])
            if "add_ecc_errors" in ev:
                ecc = {k: dict(v) for k, v in g["ecc_errors"].items()}
                for et, n in ev["add_ecc_errors"].items():
                    c = ecc.setdefault(et, {"volatile": 0, "aggregate": 0})
                    c["volatile"] = c.get("volatile", 0) + n
                    c["aggregate"] = c.get("aggregate", 0) + n
                g["ecc_errors"] = ecc
            if "add_nvlink_errors" in ev:
                errors = {link: dict(c) for link, c in g["nvlink_errors"].items()}
                for link, added in ev["add_nvlink_errors"].items():
                    counters = errors.setdefault(link, {})
                    for error, n in added.items():
                        counters[error] = counters.get(error, 0) + n
                g["nvlink_errors"] = errors
            if "unsupported" in ev:
                g["unsupported"] = g["unsupported"] | ev["unsupported"]
            if "supported" in ev:
                g["unsupported"] = g["unsupported"] - ev["supported"]
            if "allocate" in ev:
                p = ev["allocate"]
                others = sum(q["used_memory_bytes"] for q in g["processes"] if q["pid"] != p["pid"])
                free = max(0, g["memory_total_bytes"] - g["memory_reserved_bytes"] - others)
                if p["used_memory_bytes"] > free:
                    raise SimulatedOutOfMemory(
                        f"gpu {slot}: {p['used_memory_bytes']} bytes do not fit, {free} free",
                        free, g["memory_total_bytes"],
                    )
                g["memory_used_bytes"] = None
                g["processes"] = [q for q in g["processes"] if (q["pid"], q["type"]) != (p["pid"], p["type"])]
                g["processes"].append(dict(p))
            if "add_process" in ev:
                p = ev["add_process"]
                g["processes"] = [q for q in g["processes"] if (q["pid"], q["type"]) != (p["pid"], p["type"])]
                g["processes"].append(dict(p))
            if "remove_process" in ev:
                g["processes"] = [q for q in g["processes"] if q["pid"] != ev["remove_process"]]
            if "present" in ev:
                g["present"] = ev["present"]
            if "lost" in ev:
                g["lost"] = ev["lost"]
            if "error" in ev:
                g["error"] = ev["error"]
            if "xid" in ev:
                lib.post_xid(slot, ev["xid"])
                if ev["xid"] == 79:  # "GPU has fallen off the bus"
                    g["lost"] = True
        log.debug("simulated NVML: applied %s", ev)

    def install(self) -> SimulatedNvml:
        import pynvml

        with _install_lock:
            with pynvml.libLoadLock:
                self._previous = pynvml.nvmlLib
                pynvml.nvmlLib = _FunctionTable(self.lib)
                pynvml._nvmlGetFunctionPointer_cache.clear()
            self.installed = True
        log.info("simulated NVML installed: scenario %s (%d GPUs)", self.scenario.name, len(self.lib.gpus))
        return self

    def uninstall(self) -> None:
        """Put back whatever library pynvml had before (usually none: it loads the real one lazily)."""
        import pynvml

        with _install_lock:
            if not self.installed:
                return
            with pynvml.libLoadLock:
                pynvml.nvmlLib = self._previous
                pynvml._nvmlGetFunctionPointer_cache.clear()
            self.installed = False
            with self.lib._event_cond:
                self.lib._event_cond.notify_all()


def install(scenario: Scenario | str, clock: Callable[[], float] = time.monotonic) -> SimulatedNvml:
    """Replace the NVML library beneath pynvml with ``scenario``'s simulated fleet; return the handle."""
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    return SimulatedNvml(scenario, clock).install()
