"""NVLink, PCIe link, throttle time, recovery action and MIG through the real NvmlReader on the simulated
NVML library (the shipped scenarios for each), plus what they cost in NVML calls per poll."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from exporter.nvml import NvmlReader
from exporter.simulate import SimulatedNvml, install, parse_scenario
from exporter.snapshot import GpuSample, NodeSnapshot

GiB = 2**30


class Rig:
    """A simulated fleet on a hand-moved clock plus the reader under test."""

    def __init__(self, scenario: Any) -> None:
        self.t = 0.0
        self.sim: SimulatedNvml = install(scenario, clock=lambda: self.t)
        self.reader = NvmlReader("node-s", xid_retry_seconds=0.05)

    def at(self, seconds: float) -> NodeSnapshot:
        """Move scenario time to ``seconds`` and poll."""
        self.t = seconds
        return self.reader.read()

    def gpu(self, seconds: float, index: int) -> GpuSample:
        return self.at(seconds).gpus[index]

    def close(self) -> None:
        self.reader.close()
        self.sim.uninstall()


@pytest.fixture
def rig() -> Iterator[Callable[[Any], Rig]]:
    made: list[Rig] = []

    def make(scenario: Any) -> Rig:
        made.append(Rig(scenario))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_nvlink_crc_burst_then_link_down(rig: Callable[[Any], Rig]) -> None:
    r = rig("nvlink-fault")
    g = r.gpu(1, 3)
    assert sorted(g.nvlink_up) == list(range(18)) and all(g.nvlink_up.values())
    # Hopper: no data CRC counter; flit CRC, replay and recovery per link, from the scoped field ids.
    assert {e for (_, e) in g.nvlink_errors} == {"crc_flit", "replay", "recovery"}
    assert all(n == 0 for n in g.nvlink_errors.values())
    bytes_before = g.nvlink_bytes[(5, "tx")]
    g = r.gpu(6, 3)  # 3 s into the burst
    assert g.nvlink_errors[(5, "crc_flit")] == pytest.approx(1200, abs=1)
    assert g.nvlink_errors[(5, "replay")] == pytest.approx(75, abs=1)
    assert g.nvlink_errors[(4, "crc_flit")] == 0 and g.nvlink_errors[(5, "recovery")] == 0
    assert g.nvlink_bytes[(5, "tx")] - bytes_before == pytest.approx(5 * 18e9, rel=0.01)
    g = r.gpu(12, 3)  # down since 9 s: state 0, counters frozen, no more traffic on it
    assert g.nvlink_up[5] is False and sum(g.nvlink_up.values()) == 17
    assert g.nvlink_errors[(5, "crc_flit")] == pytest.approx(2400, abs=1)
    frozen = (g.nvlink_errors[(5, "crc_flit")], g.nvlink_bytes[(5, "rx")])
    g = r.gpu(20, 3)
    assert (g.nvlink_errors[(5, "crc_flit")], g.nvlink_bytes[(5, "rx")]) == frozen
    assert g.nvlink_bytes[(4, "rx")] > frozen[1]
    other = r.gpu(20, 2)
    assert other.nvlink_errors[(0, "replay")] == 1 and all(other.nvlink_up.values())


def test_pcie_link_downtrained_under_load_and_lowered_at_idle(rig: Callable[[Any], Rig]) -> None:
    r = rig("pcie-downtrained")
    snap = r.at(1)
    busy = snap.gpus[1]
    assert (busy.pcie_link_generation, busy.pcie_link_generation_max, busy.pcie_link_generation_device_max) == (5, 5, 5)
    assert (busy.pcie_link_width_lanes, busy.pcie_link_width_max_lanes) == (16, 16)
    assert busy.pcie_errors["correctable"] == 0 and set(busy.pcie_errors) >= {"fatal", "non_fatal", "replay_rollover"}
    slot = snap.gpus[3]  # a Gen5 card in a Gen4 slot
    assert (slot.pcie_link_generation, slot.pcie_link_generation_max, slot.pcie_link_generation_device_max) == (4, 4, 5)
    snap = r.at(7)
    busy, idle = snap.gpus[1], snap.gpus[2]
    assert (busy.pcie_link_generation, busy.pcie_link_width_lanes) == (3, 8)
    assert busy.pcie_link_width_max_lanes == 16 and busy.pcie_link_generation_max == 5  # maxima stay
    assert busy.pcie_errors["correctable"] == 480 and busy.pcie_errors["replay_rollover"] == 1
    assert busy.pcie_replay_errors == 35
    assert (idle.pcie_link_generation, idle.pcie_link_width_lanes, idle.utilization_gpu_ratio) == (1, 16, 0.0)


def test_throttle_time_accumulates_per_reason(rig: Callable[[Any], Rig]) -> None:
    r = rig("overheating")
    g = r.gpu(4, 3)
    assert g.throttle_seconds["power"] == 0 and set(g.throttle_seconds) >= {"power", "thermal", "sync_boost"}
    assert r.gpu(9, 3).throttle_seconds["power"] == pytest.approx(4.0)  # power-capped since 5 s
    hot = r.gpu(15, 2)
    assert hot.throttle_seconds["thermal"] == pytest.approx(7.0)  # thermal slowdown since 8 s
    assert hot.throttle_seconds["power"] == 0
    assert r.gpu(15, 0).throttle_seconds["thermal"] == 0


def test_recovery_action_appears(rig: Callable[[Any], Rig]) -> None:
    r = rig("recovery-action")
    assert [g.recovery_action for g in r.at(1).gpus] == ["none"] * 4
    assert [g.recovery_action for g in r.at(5).gpus] == ["none", "none", "gpu_reset", "none"]
    assert [g.recovery_action for g in r.at(8).gpus] == ["drain_p2p", "none", "gpu_reset", "none"]


def test_mig_instances_memory_gpm_and_processes(rig: Callable[[Any], Rig]) -> None:
    r = rig("mig-h100")
    snap = r.at(1)
    mig, whole = snap.gpus
    assert mig.info is not None and mig.info.mig_mode == "enabled"
    assert [(m.gpu_instance, m.compute_instance, m.profile) for m in mig.mig_instances] == [
        (gi, 0, "1g.10gb") for gi in range(7, 14)]
    assert len({m.uuid for m in mig.mig_instances}) == 7 and all(m.uuid.startswith("MIG-") for m in mig.mig_instances)
    by_gi = {m.gpu_instance: m for m in mig.mig_instances}
    assert by_gi[7].memory_used_bytes == 5 * GiB and by_gi[7].memory_total_bytes == 10 * GiB
    assert by_gi[12].memory_used_bytes == 0
    assert by_gi[7].gpm_ratios == {}  # GPM needs two samples
    procs = {p.pid: (p.gpu_instance, p.compute_instance) for p in mig.processes}
    assert procs[9107] == (7, 0) and procs[9113] == (13, 0) and len(procs) == 6
    # In MIG mode NVML has no whole-GPU utilization: absent, not 0.
    assert mig.utilization_gpu_ratio is None and "utilization_gpu_ratio" in mig.unsupported
    assert whole.mig_instances == () and all(p.gpu_instance is None for p in whole.processes)
    assert whole.info is not None and whole.info.mig_mode == "disabled"
    mig = r.gpu(6, 0)
    by_gi = {m.gpu_instance: m for m in mig.mig_instances}
    assert by_gi[13].memory_used_bytes == pytest.approx(9.8 * GiB, rel=1e-6)
    assert by_gi[7].gpm_ratios == pytest.approx({"sm_active": 0.62, "tensor_active": 0.4, "dram_bandwidth": 0.3})
    assert by_gi[12].gpm_ratios == {"sm_active": 0.0, "tensor_active": 0.0, "dram_bandwidth": 0.0}


def test_mig_repartition_and_mig_off(rig: Callable[[Any], Rig]) -> None:
    r = rig("mig-h100")
    assert len(r.gpu(1, 0).mig_instances) == 7
    two = [{"gpu_instance": 1, "compute_instance": 0, "profile": "3g.40gb", "memory_total_bytes": "40GiB"},
           {"gpu_instance": 2, "compute_instance": 0, "profile": "3g.40gb", "memory_total_bytes": "40GiB"}]
    r.sim.apply({"gpu": 0, "set": {"mig_instances": two, "processes": []}})
    r.gpu(2, 0)  # the old handles answer "not found": the reader enumerates again on the next poll
    assert [(m.gpu_instance, m.profile) for m in r.gpu(3, 0).mig_instances] == [(1, "3g.40gb"), (2, "3g.40gb")]
    r.sim.apply({"gpu": 0, "set": {"mig_mode": "disabled"}})
    g = r.gpu(4, 0)
    assert g.mig_instances == () and g.info is not None and g.info.mig_mode == "disabled"


def test_legacy_card_has_none_of_it_and_still_reports(rig: Callable[[Any], Rig]) -> None:
    r = rig("legacy-card")
    r.at(1)
    g = r.gpu(2, 0)
    assert g.up and g.utilization_gpu_ratio == 0.8 and g.power_usage_watts == 180
    assert g.nvlink_up == {} and g.nvlink_errors == {} and g.nvlink_bytes == {}
    assert g.pcie_link_generation is None and g.pcie_link_width_max_lanes is None and g.pcie_errors == {}
    assert g.throttle_seconds == {} and g.recovery_action is None and g.mig_instances == ()
    assert {"nvlink", "pcie_link_generation", "pcie_errors", "throttle_seconds", "recovery_action"} <= g.unsupported
    # Its R470 driver (as simulated) refuses a whole batch holding a field id it does not know: the
    # plan asks those entries one by one once, and keeps the ones it answers.
    assert g.pcie_replay_errors == 0 and "pcie_replay_errors" not in g.unsupported
    calls = r.sim.lib.calls
    calls.clear()
    assert r.gpu(3, 0).pcie_replay_errors == 0
    assert calls["nvmlDeviceGetFieldValues"] == 2  # one kept batch per GPU from then on


def test_older_nvlink_driver_falls_back_to_per_link_ids_and_state_calls(rig: Callable[[Any], Rig]) -> None:
    """Volta: no link-scoped field ids in this driver model, so state comes from nvmlDeviceGetNvLinkState
    and the counters (with data CRC) from the per-link ids L0..L5."""
    r = rig(parse_scenario({"gpus": [{"name": "Tesla V100-SXM2-32GB", "architecture": "volta", "nvlink_links": 6,
                                      "nvlink_links_down": [2], "nvlink_errors": {1: {"crc_data": 3, "replay": 2}}}]}))
    g = r.gpu(1, 0)
    assert g.nvlink_up == {0: True, 1: True, 2: False, 3: True, 4: True, 5: True}
    assert g.nvlink_errors[(1, "crc_data")] == 3 and g.nvlink_errors[(1, "replay")] == 2
    assert {e for (_, e) in g.nvlink_errors} == {"crc_flit", "crc_data", "replay", "recovery"}
    assert g.nvlink_bytes == {} and "nvlink_bytes" in g.unsupported and "nvlink" not in g.unsupported
    calls = r.sim.lib.calls
    calls.clear()
    r.gpu(2, 0)
    assert calls["nvmlDeviceGetNvLinkState"] == 7  # 6 links + the call that finds no 7th


def test_field_plan_and_board_constants_keep_the_poll_cost_flat(rig: Callable[[Any], Rig]) -> None:
    r = rig("healthy-8gpu")
    r.at(1)
    calls = r.sim.lib.calls
    calls.clear()
    snap = r.at(2)
    g = snap.gpus[0]
    assert len(g.nvlink_up) == 18 and g.throttle_seconds and g.pcie_errors and g.recovery_action == "none"
    per_gpu = {name: n / 8 for name, n in calls.items()}
    # Every field value of a GPU (18 links x 6, 12 PCIe counters, 8 throttle reasons, recovery action,
    # memory temperature, replays: 131) in batches of 64; constants are not asked again.
    assert per_gpu["nvmlDeviceGetFieldValues"] == 3
    for constant in ("nvmlDeviceGetTemperatureThreshold", "nvmlDeviceGetMaxClockInfo",
                     "nvmlDeviceGetMaxPcieLinkGeneration", "nvmlDeviceGetGpuMaxPcieLinkGeneration",
                     "nvmlDeviceGetMaxPcieLinkWidth", "nvmlDeviceGetSupportedClocksEventReasons",
                     "nvmlGpmSampleAlloc", "nvmlGpmSampleFree"):
        assert calls[constant] == 0, constant
    # 35 C calls per GPU per poll here with every new field on (the reader before them made 43 on
    # benchmarks/poll_cost.py's fleet): a guard against regressions.
    assert sum(per_gpu.values()) <= 36, per_gpu
    assert per_gpu["nvmlDeviceGetComputeRunningProcesses_v3"] == 1  # the kept buffer: no size query


def test_constants_are_read_again_when_a_gpu_comes_back(rig: Callable[[Any], Rig]) -> None:
    r = rig("tiny")
    assert r.gpu(1, 0).temperature_thresholds_celsius["slowdown"] == 90
    r.sim.apply({"gpu": "all", "set": {"temperature_thresholds_celsius": {"slowdown": 80}}})
    assert r.gpu(2, 0).temperature_thresholds_celsius["slowdown"] == 90  # a board constant: cached
    r.sim.apply({"gpu": 0, "lost": True})
    assert not r.gpu(3, 0).up
    r.sim.apply({"gpu": 0, "lost": False})
    assert r.gpu(4, 0).temperature_thresholds_celsius["slowdown"] == 80  # read afresh after the outage
    assert r.gpu(4, 1).temperature_thresholds_celsius["slowdown"] == 90


@pytest.mark.parametrize(("event", "expected"), [
    ({"gpu": 0, "set": {"nvlink_links_down": [36]}}, "nvlink_links_down[0]: expected an integer in 0..35"),
    ({"gpu": 0, "set": {"nvlink_errors": {2: {"crc": 1}}}}, "unknown key 'crc'"),
    ({"gpu": 0, "add_nvlink_errors": {"x": {"replay": 1}}}, "expected an integer"),
    ({"gpu": 0, "set": {"recovery_action": "reboot"}}, "expected one of none, gpu_reset, node_reboot"),
    ({"gpu": 0, "set": {"pcie_errors": {"corrected": 1}}}, "unknown key 'corrected'"),
    ({"gpu": 0, "set": {"pcie_link_width_lanes": 0}}, "pcie_link_width_lanes: expected an integer in 1..32"),
    ({"gpu": 0, "set": {"throttle_seconds": {"heat": 1}}}, "unknown key 'heat'"),
    ({"gpu": 0, "set": {"mig_instances": [{"gpu_instance": 1, "profile": "1g.10gb"}] * 2}}, "listed twice"),
    ({"gpu": 0, "set": {"mig_instances": [{"profile": "1g.10gb"}]}}, "missing required key 'gpu_instance'"),
])
def test_bad_link_and_mig_events_are_refused_with_their_path(rig: Callable[[Any], Rig], event: Any,
                                                             expected: str) -> None:
    from exporter.simulate import ScenarioError

    r = rig("tiny")
    with pytest.raises(ScenarioError, match=expected.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        r.sim.apply(event)


def test_yaml_link_indexes_are_integers(tmp_path: Any) -> None:
    from exporter.simulate import load_scenario

    path = tmp_path / "links.yaml"
    path.write_text("gpus:\n  - nvlink_links: 4\n    nvlink_errors: {3: {replay: 7}}\n")
    assert load_scenario(path).gpus[0]["nvlink_errors"] == {3: {"replay": 7}}


def test_compute_instances_of_one_gpu_instance_share_its_memory_read(rig: Callable[[Any], Rig]) -> None:
    r = rig("mig-h100")
    shared = [{"gpu_instance": 1, "compute_instance": ci, "profile": "1c.3g.40gb", "memory_total_bytes": "40GiB"}
              for ci in (0, 1)]  # fmt: skip
    r.sim.apply({"gpu": 0, "set": {"mig_instances": shared, "processes": []}})
    r.gpu(1, 0)  # the old handles answer "not found": the reader enumerates again on the next poll
    assert [(m.gpu_instance, m.compute_instance) for m in r.gpu(2, 0).mig_instances] == [(1, 0), (1, 1)]
    calls = r.sim.lib.calls
    calls.clear()
    g = r.gpu(3, 0)
    assert [m.memory_total_bytes for m in g.mig_instances] == [40 * GiB, 40 * GiB]
    # GPU 0, GPU 1, and GPU instance 1 once (its memory is the same whichever compute instance asks).
    assert calls["nvmlDeviceGetMemoryInfo"] + calls["nvmlDeviceGetMemoryInfo_v2"] == 3
