"""The real NvmlReader on the simulated NVML library: values, absent fields, GPU faults, XID events
through NVML's event API, and NVML itself failing and coming back."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter.nvml import NvmlReader
from exporter.simulate import SimulatedNvml, install, parse_scenario
from exporter.snapshot import GpuSample, NodeSnapshot
from harness.clock import FakeClock
from harness.support import wait_until

GiB = 2**30


class Rig:
    """A simulated fleet plus the reader under test; ``wall`` is the reader's wall clock."""

    def __init__(self, scenario: Any) -> None:
        self.clock = FakeClock()
        self.wall = FakeClock(1_700_000_000.0)
        self.sim: SimulatedNvml = install(scenario, clock=self.clock)
        self.reader = NvmlReader("node-t", xid_retry_seconds=0.05, wall_clock=self.wall)

    def read(self) -> NodeSnapshot:
        return self.reader.read()

    def wait_listening(self, uuid: str) -> None:
        """XIDs posted before the listener registered a GPU are lost (as with real NVML): wait for it."""
        wait_until(lambda: uuid in self.reader.xid_listening, timeout=10, message=f"XID listener on {uuid}")

    def gpu(self, uuid: str, snapshot: NodeSnapshot | None = None) -> GpuSample:
        snapshot = snapshot or self.read()
        return next(g for g in snapshot.gpus if g.uuid == uuid)

    def close(self) -> None:
        self.reader.close()  # before uninstall: the XID thread must not reach for a real library
        self.sim.uninstall()


@pytest.fixture
def rig() -> Iterator[Callable[[Any], Rig]]:
    made: list[Rig] = []

    def make(scenario: Any = "healthy-8gpu") -> Rig:
        r = Rig(scenario)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_healthy_node_values(rig: Callable[[Any], Rig]) -> None:
    r = rig("healthy-8gpu")
    snap = r.read()
    assert snap.nvml_up and snap.host == "node-t"
    assert (snap.driver_version, snap.cuda_driver_version) == ("550.54.15", "12.4")
    assert [g.index for g in snap.gpus] == list(range(8))
    assert len({g.uuid for g in snap.gpus}) == 8 and all(g.uuid.startswith("GPU-") for g in snap.gpus)
    g = snap.gpus[0]
    assert g.up and g.error is None
    assert g.info is not None
    assert g.info.name == "NVIDIA H100 80GB HBM3" and g.info.architecture == "hopper"
    assert g.info.pci_bus_id == "00000000:18:00.0" and g.info.serial and g.info.mig_mode == "disabled"
    assert (g.utilization_gpu_ratio, g.utilization_memory_ratio) == (0.93, 0.41)
    # Memory v2: the driver's reservation is reported apart from "used".
    assert g.memory_total_bytes == 80 * GiB and g.memory_reserved_bytes == 512 * 2**20
    assert g.memory_used_bytes == 61 * GiB
    assert g.memory_free_bytes == 80 * GiB - 61 * GiB - 512 * 2**20
    assert (g.temperature_gpu_celsius, g.temperature_memory_celsius) == (62, 70)
    assert g.temperature_thresholds_celsius == {"slowdown": 90, "shutdown": 92, "gpu_max": 87, "memory_max": 95}
    assert (g.power_usage_watts, g.power_limit_watts) == (520, 700)
    assert g.clocks_hertz == {"graphics": 1980e6, "sm": 1980e6, "memory": 2619e6}
    assert g.clocks_max_hertz == g.clocks_hertz
    assert set(g.clock_event_reasons) >= {"sw_thermal_slowdown", "hw_slowdown", "sw_power_cap"}
    assert not any(g.clock_event_reasons.values())
    assert g.performance_state == 0
    assert (g.pcie_tx_bytes_per_second, g.pcie_rx_bytes_per_second) == (1.2e9, 2.5e9)
    assert g.pcie_replay_errors == 0
    assert g.ecc_errors == {(t, c): 0 for t in ("corrected", "uncorrected") for c in ("volatile", "aggregate")}
    assert g.remapped_rows == {"correctable": 0, "uncorrectable": 0}
    assert g.remapped_rows_pending is False and g.remapped_rows_failure is False
    # H100 SXM: no fan; Hopper: page retirement replaced by row remapping.
    assert g.fan_speed_ratio is None and g.retired_pages == {} and g.retired_pages_pending is None
    assert {"fan_speed_ratio", "retired_pages", "retired_pages_pending"} <= g.unsupported
    assert [(p.pid, p.process_type, p.used_memory_bytes, p.sm_utilization_ratio) for p in g.processes] == [
        (4242, "compute", 61 * GiB, 0.91)
    ]
    assert g.xid_errors == {}


def test_energy_counter_follows_the_clock_and_gpm_needs_two_samples(rig: Callable[[Any], Rig]) -> None:
    r = rig("healthy-8gpu")
    first = r.read().gpus[0]
    assert first.gpm_ratios == {}  # GPM is a rate between two samples: nothing on the first poll
    r.clock.advance(10)
    second = r.read().gpus[0]
    assert second.energy_consumed_joules is not None and first.energy_consumed_joules is not None
    assert second.energy_consumed_joules - first.energy_consumed_joules == pytest.approx(5200, abs=1)
    assert second.gpm_ratios == pytest.approx({"sm_active": 0.87, "tensor_active": 0.55, "dram_bandwidth": 0.38})
    r.sim.apply({"gpu": 0, "set": {"gpm_ratios": {"tensor_active": 0.1}}})
    assert r.read().gpus[0].gpm_ratios["tensor_active"] == pytest.approx(0.1)


OLDER_FLEET = parse_scenario({
    "name": "older",
    "gpus": [
        {"name": "Tesla V100-SXM2-32GB", "architecture": "volta", "memory_total_bytes": "32GiB",
         "fan_speed_ratio": 0.45, "retired_pages": {"single_bit_ecc": 2, "double_bit_ecc": 1},
         "retired_pages_pending": True, "unsupported": ["memory_reserved_bytes", "temperature_memory_celsius"],
         "clock_event_reasons": ["sw_power_cap", "hw_slowdown"],
         "processes": [{"pid": 10, "type": "compute", "used_memory_bytes": "1GiB"}]},
        {"name": "NVIDIA A100-SXM4-80GB", "architecture": "ampere",
         "remapped_rows": {"correctable": 3, "uncorrectable": 1}, "remapped_rows_pending": True},
    ],
})


def test_older_architectures(rig: Callable[[Any], Rig]) -> None:
    r = rig(OLDER_FLEET)
    r.read()
    volta, ampere = r.read().gpus
    assert volta.info is not None and volta.info.architecture == "volta"
    assert volta.fan_speed_ratio == 0.45
    assert volta.retired_pages == {"single_bit_ecc": 2, "double_bit_ecc": 1} and volta.retired_pages_pending
    assert volta.remapped_rows == {} and volta.remapped_rows_pending is None
    assert volta.gpm_ratios == {} and "gpm_ratios" in volta.unsupported  # pre-Hopper, even on a 2nd poll
    assert volta.clock_event_reasons["sw_power_cap"] and volta.clock_event_reasons["hw_slowdown"]
    assert not volta.clock_event_reasons["sw_thermal_slowdown"]
    # Only memory info v1: "used" includes the reservation, which is not known apart.
    assert volta.memory_reserved_bytes is None and "memory_reserved_bytes" in volta.unsupported
    assert volta.memory_used_bytes == 1 * GiB + 512 * 2**20
    assert volta.temperature_memory_celsius is None and "temperature_memory_celsius" in volta.unsupported
    assert ampere.remapped_rows == {"correctable": 3, "uncorrectable": 1}
    assert ampere.remapped_rows_pending is True and ampere.remapped_rows_failure is False
    assert ampere.retired_pages == {} and ampere.gpm_ratios == {}


def test_unsupported_fields_are_absent_then_return(rig: Callable[[Any], Rig]) -> None:
    r = rig("healthy-8gpu")
    fields = ["power_usage_watts", "temperature_gpu_celsius", "clocks_hertz", "ecc_errors", "performance_state",
              "pcie_tx_bytes_per_second", "processes", "energy_consumed_joules", "clock_event_reasons",
              "serial", "mig_mode", "remapped_rows"]
    r.sim.apply({"gpu": 1, "unsupported": fields})
    snap = r.read()
    g = snap.gpus[1]
    assert g.up
    assert g.power_usage_watts is None and g.temperature_gpu_celsius is None and g.clocks_hertz == {}
    assert g.ecc_errors == {} and g.performance_state is None and g.pcie_tx_bytes_per_second is None
    assert g.processes == () and g.energy_consumed_joules is None and g.clock_event_reasons == {}
    assert g.remapped_rows == {} and g.remapped_rows_pending is None
    assert g.info is not None and g.info.serial is None and g.info.mig_mode is None
    assert g.pcie_rx_bytes_per_second == 2.5e9  # neighbours of an unsupported field stay
    assert set(fields) - {"serial", "mig_mode"} <= g.unsupported
    assert snap.gpus[0].power_usage_watts == 520 and snap.gpus[0].unsupported == frozenset(
        {"fan_speed_ratio", "retired_pages", "retired_pages_pending"})
    r.sim.apply({"gpu": 1, "supported": fields})
    g = r.read().gpus[1]
    assert g.power_usage_watts == 520 and len(g.processes) == 1 and "power_usage_watts" not in g.unsupported


def test_lost_gpu_is_down_others_keep_reporting_then_recovers(rig: Callable[[Any], Rig]) -> None:
    r = rig("healthy-8gpu")
    uuid = r.read().gpus[2].uuid
    r.sim.apply({"gpu": 2, "lost": True})
    snap = r.read()
    lost = snap.gpus[2]
    assert (lost.index, lost.uuid, lost.up, lost.error) == (2, uuid, False, "gpu_lost")
    assert lost.info is not None and lost.info.name == "NVIDIA H100 80GB HBM3"  # last known identity
    assert lost.temperature_gpu_celsius is None and lost.processes == ()
    assert all(g.up and g.temperature_gpu_celsius == 62 for i, g in enumerate(snap.gpus) if i != 2)
    assert r.read().gpus[2].up is False  # retried every poll, still down
    r.sim.apply({"gpu": 2, "lost": False})
    back = r.read().gpus[2]
    assert back.up and back.uuid == uuid and back.temperature_gpu_celsius == 62 and back.info is not None


@pytest.mark.parametrize("kind", ["timeout", "unknown", "no_permission", "reset_required"])
def test_other_gpu_errors_name_their_kind(rig: Callable[[Any], Rig], kind: str) -> None:
    r = rig("healthy-8gpu")
    r.read()
    r.sim.apply({"gpu": 3, "error": kind})
    snap = r.read()
    assert (snap.gpus[3].up, snap.gpus[3].error) == (False, kind)
    assert sum(g.up for g in snap.gpus) == 7
    r.sim.apply({"gpu": 3, "error": None})
    assert r.read().gpus[3].up


def test_gpu_vanishes_and_returns(rig: Callable[[Any], Rig]) -> None:
    r = rig("healthy-8gpu")
    uuids = [g.uuid for g in r.read().gpus]
    r.sim.apply({"gpu": 5, "present": False})
    snap = r.read()
    assert [g.index for g in snap.gpus] == list(range(7))  # NVML re-enumerates without it
    assert [g.uuid for g in snap.gpus] == uuids[:5] + uuids[6:] and all(g.up for g in snap.gpus)
    r.sim.apply({"gpu": 5, "present": True})
    snap = r.read()
    assert [g.uuid for g in snap.gpus] == uuids and all(g.up for g in snap.gpus)


def test_xid_events_are_counted_per_gpu_and_code(rig: Callable[[Any], Rig]) -> None:
    r = rig("healthy-8gpu")
    uuids = [g.uuid for g in r.read().gpus]
    r.wait_listening(uuids[0])
    r.sim.apply({"gpu": 0, "xid": 13})
    wait_until(lambda: 13 in r.gpu(uuids[0]).xid_errors, timeout=10, message="XID 13 counted")
    r.wall.advance(60)
    r.sim.apply({"gpu": 0, "xid": 13})
    r.sim.apply({"gpu": 0, "xid": 31})
    g0 = wait_until(lambda: (g := r.gpu(uuids[0])).xid_errors[13].count == 2 and 31 in g.xid_errors and g,
                    timeout=10, message="second XID 13 and XID 31")
    assert g0.xid_errors[13].last_seen_timestamp_seconds == 1_700_000_060.0
    assert g0.xid_errors[31].count == 1 and g0.up
    assert all(not g.xid_errors for g in r.read().gpus[1:])

    # 79 "fell off the bus": the GPU is lost, and its count stays visible on the down GPU.
    r.wait_listening(uuids[1])
    r.sim.apply({"gpu": 1, "xid": 79})
    g1 = wait_until(lambda: (g := r.gpu(uuids[1])).xid_errors and g, timeout=10, message="XID 79 counted")
    assert g1.xid_errors[79].count == 1 and not g1.up and g1.error == "gpu_lost"
    # Recovered GPU: counts are kept (counters since exporter start) and new events still arrive.
    r.sim.apply({"gpu": 1, "lost": False})
    assert r.gpu(uuids[1]).up
    r.wait_listening(uuids[1])
    r.sim.apply({"gpu": 1, "xid": 79})
    wait_until(lambda: r.gpu(uuids[1]).xid_errors[79].count == 2, timeout=10, message="XID after recovery")


def test_xid_after_gpu_vanished_and_returned(rig: Callable[[Any], Rig]) -> None:
    r = rig("healthy-8gpu")
    uuid = r.read().gpus[4].uuid
    r.sim.apply({"gpu": 4, "present": False})
    assert len(r.read().gpus) == 7
    r.sim.apply({"gpu": 4, "present": True})
    assert r.gpu(uuid).up
    r.wait_listening(uuid)
    r.sim.apply({"gpu": 4, "xid": 48})
    got = wait_until(lambda: r.gpu(uuid).xid_errors.get(48), timeout=10, message="XID 48 after return")
    assert got.count == 1


def test_nvml_init_failure_then_recovery(rig: Callable[[Any], Rig]) -> None:
    r = rig("healthy-8gpu")
    r.sim.apply({"nvml_init_error": "driver_not_loaded"})
    snap = r.read()
    assert snap.nvml_up is False and snap.gpus == () and snap.host == "node-t"
    assert r.read().nvml_up is False  # retried, still failing, still no exception
    r.sim.apply({"nvml_init_error": None})
    snap = r.read()
    assert snap.nvml_up and len(snap.gpus) == 8 and snap.driver_version == "550.54.15"
    # The XID listener retried its own init too.
    r.wait_listening(snap.gpus[6].uuid)
    r.sim.apply({"gpu": 6, "xid": 94})
    wait_until(lambda: 94 in r.read().gpus[6].xid_errors, timeout=10, message="XID after NVML came back")


def test_processes_graphics_dedupe_and_exit(rig: Callable[[Any], Rig]) -> None:
    r = rig("healthy-8gpu")
    r.sim.apply({"gpu": 0, "add_process": {"pid": 5000, "type": "compute", "used_memory_bytes": "2GiB",
                                           "sm_utilization_ratio": 0.25}})
    r.sim.apply({"gpu": 0, "add_process": {"pid": 6000, "type": "graphics", "used_memory_bytes": "1GiB"}})
    # A process with compute and graphics contexts is listed twice by NVML; it is one process here.
    r.sim.apply({"gpu": 0, "add_process": {"pid": 4242, "type": "graphics", "used_memory_bytes": "61GiB"}})
    procs = {p.pid: p for p in r.read().gpus[0].processes}
    assert set(procs) == {4242, 5000, 6000}
    assert (procs[4242].process_type, procs[6000].process_type) == ("compute", "graphics")
    assert procs[5000].used_memory_bytes == 2 * GiB and procs[5000].sm_utilization_ratio == 0.25
    assert procs[6000].sm_utilization_ratio is None  # no utilization sample for it
    r.sim.apply({"gpu": 0, "remove_process": 5000})
    assert {p.pid for p in r.read().gpus[0].processes} == {4242, 6000}
    r.sim.apply({"gpu": 0, "set": {"processes": []}})
    assert r.read().gpus[0].processes == ()


def test_timeline_thermal_ramp_and_throttle(rig: Callable[[Any], Rig]) -> None:
    scenario = parse_scenario({
        "name": "ramp",
        "gpus": [{"count": 2, "temperature_gpu_celsius": 60}],
        "timeline": [
            {"at": 10, "gpu": 1, "ramp": {"temperature_gpu_celsius": 90}, "duration_seconds": 20},
            {"at": 30, "gpu": 1, "set": {"clock_event_reasons": ["sw_thermal_slowdown"], "clocks_mhz": {"sm": 1200}}},
        ],
    })
    r = rig(scenario)
    assert r.read().gpus[1].temperature_gpu_celsius == 60
    r.clock.advance(20)
    assert r.read().gpus[1].temperature_gpu_celsius == 75
    r.clock.advance(15)
    g = r.read().gpus[1]
    assert g.temperature_gpu_celsius == 90 and g.clock_event_reasons["sw_thermal_slowdown"]
    assert g.clocks_hertz["sm"] == 1200e6
    assert r.read().gpus[0].temperature_gpu_celsius == 60


def test_exporter_without_any_nvml_library_keeps_serving(tmp_path: Path) -> None:
    """The real exporter, no --simulate, on a machine without libnvidia-ml: it serves, says NVML is
    down with the reason counted, and keeps retrying (never crashes, never hangs a scrape)."""
    import ctypes.util

    from harness.support import http_get, parse_metrics, start_exporter, wait_until

    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip("this machine has a real NVML library")
    proc, base = start_exporter(tmp_path, "--interval", "0.2", "--docker", "off")
    try:

        def retried() -> dict[str, Any] | None:
            m = parse_metrics(http_get(base + "/metrics")[1])
            errors = [v for labels, v in m.get("gpu_exporter_poll_errors_total", []) if labels.get("kind") == "nvml_init"]
            return m if errors and errors[0] >= 2 else None

        m = wait_until(retried, timeout=30, message="nvml_init errors counted and retried")
        assert m["gpu_exporter_nvml_up"][0][1] == 0
        assert "gpu_up" not in m and "gpu_devices" not in m
        assert http_get(base + "/healthz")[0] == 200
        assert proc.alive()
    finally:
        proc.stop()
    assert "Traceback" not in proc.log()


def test_unexpected_exception_on_one_gpu_marks_only_it_down(
    rig: Callable[[Any], Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pynvml

    r = rig("healthy-8gpu")
    broken_uuid = r.read().gpus[2].uuid
    real = pynvml.nvmlDeviceGetPowerUsage

    def power(handle: Any) -> int:
        if pynvml.nvmlDeviceGetUUID(handle) == broken_uuid:
            raise ValueError("a bug in a wrapper")
        return int(real(handle))

    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", power)
    snap = r.read()
    assert snap.nvml_up and (snap.gpus[2].up, snap.gpus[2].error) == (False, "unknown")
    assert snap.gpus[2].uuid == broken_uuid and all(g.up for i, g in enumerate(snap.gpus) if i != 2)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", real)
    assert r.read().gpus[2].power_usage_watts == 520


def test_nvml_failing_mid_run_reinitialises(rig: Callable[[Any], Rig], monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver going away under a running reader (count fails): nvml_up=False, then a fresh session."""
    import pynvml

    r = rig("healthy-8gpu")
    uuids = [g.uuid for g in r.read().gpus]
    r.wait_listening(uuids[7])
    real = pynvml.nvmlDeviceGetCount

    def gone() -> int:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", gone)
    assert r.read().nvml_up is False
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", real)
    snap = r.read()
    assert snap.nvml_up and [g.uuid for g in snap.gpus] == uuids and all(g.up for g in snap.gpus)
    r.sim.apply({"gpu": 7, "xid": 31})  # the listener's event set outlived the blip, or was rebuilt
    wait_until(lambda: 31 in r.gpu(uuids[7]).xid_errors, timeout=10, message="XID after NVML re-init")
