"""The simulator through its real interfaces: scenario files (shipped and broken), the fake NVML beneath
unchanged pynvml calls on a test clock, apply()/uninstall, and ``python -m exporter.simulate.run``
running a real peer exporter (nvitop-exporter) on the simulated fleet."""

from __future__ import annotations

import contextlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynvml
import pytest

from exporter.simulate import ScenarioError, SimulatedNvml, install, load_scenario, shipped_scenarios
from exporter.simulate.run import main as run_main
from harness.clock import FakeClock
from harness.support import ManagedProcess, free_port, http_get, parse_metrics, wait_until

REQUIRED = {"healthy-8gpu", "overheating", "failing-gpu", "busy-multiprocess", "tiny", "mixed-fleet"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sim_factory(clock: FakeClock) -> Iterator[Any]:
    """install(scenario, clock) + nvmlInit; shut down and uninstall afterwards whatever happens."""
    installed: list[SimulatedNvml] = []

    def make(scenario: str) -> SimulatedNvml:
        sim = install(scenario, clock=clock)
        installed.append(sim)
        pynvml.nvmlInit()
        return sim

    yield make
    for sim in reversed(installed):
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
        sim.uninstall()


def handle(i: int) -> Any:
    return pynvml.nvmlDeviceGetHandleByIndex(i)


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# --- scenario files -------------------------------------------------------------------------------

def test_required_scenarios_are_shipped() -> None:
    assert set(shipped_scenarios()) >= REQUIRED


@pytest.mark.parametrize("name", shipped_scenarios())
def test_shipped_scenario_loads_and_runs_its_whole_timeline(name: str, sim_factory: Any, clock: FakeClock) -> None:
    sc = load_scenario(name)
    assert sc.name == name and sc.description and sc.gpus
    assert all(ev.at <= 30 for ev in sc.timeline), "fault times must stay short enough for tests"
    sim = sim_factory(name)
    assert pynvml.nvmlDeviceGetCount() == len(sc.gpus)
    clock.now += max((ev.at for ev in sc.timeline), default=0) + 10
    assert sim.now == pytest.approx(max((ev.at for ev in sc.timeline), default=0) + 10)
    # Every GPU answers (or fails with an NVML error, never anything else) for the calls exporters make.
    for i in range(pynvml.nvmlDeviceGetCount()):
        for call in (pynvml.nvmlDeviceGetName, pynvml.nvmlDeviceGetMemoryInfo, pynvml.nvmlDeviceGetUtilizationRates,
                     pynvml.nvmlDeviceGetPowerUsage, pynvml.nvmlDeviceGetComputeRunningProcesses,
                     pynvml.nvmlDeviceGetGraphicsRunningProcesses):
            with contextlib.suppress(pynvml.NVMLError):
                call(handle(i))


def _error(tmp_path: Path, text: str, name: str = "s.yaml") -> str:
    path = write(tmp_path, text, name)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    return msg


def test_unknown_scenario_names_the_shipped_ones() -> None:
    with pytest.raises(ScenarioError, match=r"no-such-thing.*shipped: .*healthy-8gpu"):
        load_scenario("no-such-thing")


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"gpus: [\xff\xfe]\n")
    with pytest.raises(ScenarioError, match=rf"{path}: cannot read"):
        load_scenario(path)


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    msg = _error(tmp_path, "gpus:\n  - count: 2\n    name: [unclosed\n")
    assert "not valid YAML" in msg and "line" in msg


def test_bad_toml(tmp_path: Path) -> None:
    msg = _error(tmp_path, "gpus = [\n", name="s.toml")
    assert "not valid TOML" in msg


def test_toml_scenario_loads(tmp_path: Path) -> None:
    path = write(tmp_path, """
        name = "t"
        [[gpus]]
        count = 2
        power_usage_watts = 100
    """, name="t.toml")
    sc = load_scenario(path)
    assert len(sc.gpus) == 2 and sc.gpus[1]["power_usage_watts"] == 100


def test_unknown_key_names_line_key_and_choices(tmp_path: Path) -> None:
    msg = _error(tmp_path, """\
        gpus:
          - count: 2
            temprature_gpu_celsius: 50
        """)
    assert "line 3" in msg and "gpus[0].temprature_gpu_celsius" in msg
    assert "unknown key" in msg and "temperature_gpu_celsius" in msg  # the valid choices are listed


def test_wrong_type_names_expectation(tmp_path: Path) -> None:
    msg = _error(tmp_path, """\
        gpus:
          - power_limit_watts: lots
        """)
    assert "line 2" in msg and "gpus[0].power_limit_watts" in msg and "expected a number" in msg
    msg = _error(tmp_path, "gpus:\n  - utilization_gpu_ratio: 1.5\n")
    assert "ratio between 0 and 1" in msg
    msg = _error(tmp_path, "gpus:\n  - memory_total_bytes: 12 apples\n")
    assert "size in bytes" in msg
    msg = _error(tmp_path, "gpus: {count: 2}\n")
    assert "gpus" in msg and "non-empty list" in msg


@pytest.mark.parametrize(("event", "expected"), [
    ("{at: 3, gpu: 0, xid: abc}", "timeline[1].xid: expected an integer"),
    ("{at: 3, gpu: 9, lost: true}", "timeline[1].gpu: expected a GPU index 0..1"),
    ("{at: 3, gpu: 0, explode: true}", "timeline[1].explode: unknown key"),
    ("{gpu: 0, lost: true}", "timeline[1]: expected a mapping with `at"),
    ("{at: -1, gpu: 0, lost: true}", "timeline[1].at: expected a number in 0.."),
    ("{at: 3, gpu: 0, ramp: {temperature_gpu_celsius: 90}}", "needs `duration_seconds`"),
    ("{at: 3, gpu: 0, set: {uuid: GPU-x}}", "timeline[1].set.uuid: unknown key"),
    ("{at: 3, gpu: 0}", "expected at least one action"),
])
def test_bad_timeline_event_names_line_and_expectation(tmp_path: Path, event: str, expected: str) -> None:
    msg = _error(tmp_path, f"""\
        gpus:
          - count: 2
        timeline:
          - {{at: 1, gpu: 0, xid: 31}}
          - {event}
        """)
    assert "line 5" in msg and expected in msg, msg


def test_merge_key_shares_a_spec_and_explicit_keys_win(tmp_path: Path) -> None:
    sc = load_scenario(write(tmp_path, """\
        gpus:
          - &base {power_limit_watts: 300, temperature_gpu_celsius: 40}
          - <<: *base
            temperature_gpu_celsius: 50
        """))
    assert [g["power_limit_watts"] for g in sc.gpus] == [300, 300]
    assert [g["temperature_gpu_celsius"] for g in sc.gpus] == [40, 50]
    msg = _error(tmp_path, "gpus:\n  - <<: *x\n")  # undefined alias: YAML error with line
    assert "not valid YAML" in msg


# --- the fake beneath pynvml, on a test clock --------------------------------------------------------

def test_timeline_fires_at_its_time_and_ramps_linearly(tmp_path: Path, sim_factory: Any, clock: FakeClock) -> None:
    path = write(tmp_path, """\
        gpus:
          - {count: 2, temperature_gpu_celsius: 50}
        timeline:
          - {at: 5, gpu: 1, set: {clock_event_reasons: [hw_thermal_slowdown]}}
          - {at: 10, gpu: 1, ramp: {temperature_gpu_celsius: 90}, duration_seconds: 10}
        """)
    sim_factory(str(path))
    h = handle(1)
    clock.now += 4.99
    assert pynvml.nvmlDeviceGetCurrentClocksEventReasons(h) == 0
    clock.now += 0.01
    assert pynvml.nvmlDeviceGetCurrentClocksEventReasons(h) == pynvml.nvmlClocksEventReasonHwThermalSlowdown
    clock.now += 5  # t = 10: ramp starts
    assert pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) == 50
    clock.now += 5  # halfway
    assert pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) == 70
    clock.now += 100  # past the end: holds the target
    assert pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU) == 90
    assert pynvml.nvmlDeviceGetTemperature(handle(0), pynvml.NVML_TEMPERATURE_GPU) == 50


def test_overheating_timeline(sim_factory: Any, clock: FakeClock) -> None:
    sim_factory("overheating")
    thermal = pynvml.nvmlClocksEventReasonSwThermalSlowdown | pynvml.nvmlClocksEventReasonHwThermalSlowdown
    h2, h3 = handle(2), handle(3)
    assert pynvml.nvmlDeviceGetTemperature(h2, 0) == 66
    assert pynvml.nvmlDeviceGetCurrentClocksEventReasons(h2) == 0
    clock.now += 6
    assert 66 < pynvml.nvmlDeviceGetTemperature(h2, 0) < 89
    assert pynvml.nvmlDeviceGetCurrentClocksEventReasons(h3) == pynvml.nvmlClocksEventReasonSwPowerCap
    clock.now += 8  # t = 14
    slowdown = pynvml.nvmlDeviceGetTemperatureThreshold(h2, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
    assert pynvml.nvmlDeviceGetTemperature(h2, 0) > slowdown
    assert pynvml.nvmlDeviceGetCurrentClocksEventReasons(h2) == thermal
    assert pynvml.nvmlDeviceGetClockInfo(h2, pynvml.NVML_CLOCK_SM) == 900
    assert pynvml.nvmlDeviceGetFanSpeed(h2) == 100
    assert pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle(0)) == 0


def test_failing_gpu_timeline_delivers_xids_then_gpu_is_lost(sim_factory: Any, clock: FakeClock) -> None:
    sim_factory("failing-gpu")
    es = pynvml.nvmlEventSetCreate()
    for i in range(4):
        pynvml.nvmlDeviceRegisterEvents(handle(i), pynvml.nvmlEventTypeXidCriticalError, es)
    h1 = handle(1)
    uncorrected = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    assert pynvml.nvmlDeviceGetTotalEccErrors(h1, uncorrected, pynvml.NVML_VOLATILE_ECC) == 0
    with pytest.raises(pynvml.NVMLError_Timeout):
        pynvml.nvmlEventSetWait(es, 0)
    clock.now += 7
    assert pynvml.nvmlDeviceGetTotalEccErrors(h1, uncorrected, pynvml.NVML_VOLATILE_ECC) == 1
    assert pynvml.nvmlDeviceGetTotalEccErrors(h1, pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                                              pynvml.NVML_AGGREGATE_ECC) == 3 + 12 + 40
    assert pynvml.nvmlDeviceGetRemappedRows(h1) == (1, 1, 1, 0)  # corr, unc, pending, failure
    with pytest.raises(pynvml.NVMLError_NotSupported):  # Ampere: row remapping, no page retirement
        pynvml.nvmlDeviceGetRetiredPagesPendingStatus(h1)
    clock.now += 10  # t = 17
    xids = []
    for _ in range(4):
        data = pynvml.nvmlEventSetWait(es, 0)
        xids.append(data.eventData)
        assert pynvml.nvmlDeviceGetUUID(handle(0)) != ""  # GPU 0 still answers
    assert xids == [48, 63, 94, 79]
    with pytest.raises(pynvml.NVMLError_GpuIsLost):
        pynvml.nvmlDeviceGetUtilizationRates(h1)
    assert pynvml.nvmlDeviceGetUtilizationRates(handle(2)).gpu == 85
    pynvml.nvmlEventSetFree(es)


def test_busy_multiprocess_processes_come_and_go(sim_factory: Any, clock: FakeClock) -> None:
    sim_factory("busy-multiprocess")

    def pids(i: int) -> tuple[set[int], set[int]]:
        h = handle(i)
        return ({p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)},
                {p.pid for p in pynvml.nvmlDeviceGetGraphicsRunningProcesses(h)})

    assert pids(0) == ({7001, 7003}, {1501, 1733})
    assert pids(1)[0] == {7101, 7102, 7103}
    clock.now += 5.5
    assert pids(0)[1] == {1501, 1733, 7050}
    assert pids(1)[0] == {7101, 7102, 7103, 7310} and pids(2)[0] == {7202, 7203}
    clock.now += 10
    assert pids(0) == ({7002, 7003}, {1501, 1733})
    assert pids(1)[0] == {7102, 7103, 7310} and pids(2)[0] == {7202, 7203, 7220}
    mem = pynvml.nvmlDeviceGetMemoryInfo(handle(3), version=pynvml.nvmlMemory_v2)
    assert mem.used == int(47.5 * 2**30) and mem.free < 2**30
    assert pynvml.nvmlSystemGetProcessName(7302) == "paraview"


def test_unsupported_fields_answer_nvml_not_supported(sim_factory: Any) -> None:
    sim_factory("mixed-fleet")
    h100, a100, t4 = handle(0), handle(1), handle(2)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetFanSpeed(h100)
    assert pynvml.nvmlDeviceGetFanSpeed(t4) == 30
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetTotalEnergyConsumption(a100)
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetRemappedRows(t4)
    assert pynvml.nvmlDeviceGetRetiredPagesPendingStatus(t4) == pynvml.NVML_FEATURE_ENABLED
    assert pynvml.nvmlDeviceGetRemappedRows(a100)[0] == 2
    assert pynvml.nvmlGpmQueryDeviceSupport(h100).isSupportedDevice == 1
    assert pynvml.nvmlGpmQueryDeviceSupport(a100).isSupportedDevice == 0
    with pytest.raises(pynvml.NVMLError_NotSupported):  # functions the fake does not simulate at all
        pynvml.nvmlDeviceGetEncoderUtilization(h100)


# --- apply() and uninstall ----------------------------------------------------------------------------

@pytest.mark.parametrize(("event", "expected"), [
    ({"gpu": 5, "lost": True}, "expected a GPU index 0..1"),
    ({"gpu": 0, "set": {"temperature_gpu_celsius": "hot"}}, "event.set.temperature_gpu_celsius: expected a number"),
    ({"gpu": 0, "nope": 1}, "event.nope: unknown key"),
    ({"lost": True}, "`gpu`"),
    ({"gpu": 0, "error": "melted"}, "expected null or one of gpu_lost"),
    ({"gpu": 0, "unsupported": ["warp_drive"]}, "expected a field name NVML can refuse"),
    ({"gpu": 0, "add_process": {"type": "compute"}}, "missing required key 'pid'"),
    ({"gpu": 0, "nvml_delay_seconds": 1}, "not used by node-wide actions"),
    ([1, 2], "expected a mapping"),
])
def test_apply_rejects_bad_events(sim_factory: Any, event: Any, expected: str) -> None:
    sim = sim_factory("tiny")
    with pytest.raises(ScenarioError) as info:
        sim.apply(event)
    assert expected in str(info.value)
    assert pynvml.nvmlDeviceGetTemperature(handle(0), 0) == 50  # nothing half-applied


def test_apply_good_events(sim_factory: Any) -> None:
    sim = sim_factory("tiny")
    sim.apply({"gpu": "all", "set": {"temperature_gpu_celsius": 77}})
    assert [pynvml.nvmlDeviceGetTemperature(handle(i), 0) for i in range(2)] == [77, 77]
    sim.apply({"gpu": 1, "error": "timeout"})
    with pytest.raises(pynvml.NVMLError_Timeout):
        pynvml.nvmlDeviceGetName(handle(1))
    sim.apply({"gpu": 1, "error": None, "unsupported": ["power_usage_watts"]})
    with pytest.raises(pynvml.NVMLError_NotSupported):
        pynvml.nvmlDeviceGetPowerUsage(handle(1))
    sim.apply({"gpu": 0, "present": False})
    assert pynvml.nvmlDeviceGetCount() == 1


def test_uninstall_restores_pynvml(clock: FakeClock) -> None:
    before = pynvml.nvmlLib
    sim = install("tiny", clock=clock)
    assert pynvml.nvmlLib is not before
    pynvml.nvmlInit()
    assert pynvml.nvmlDeviceGetCount() == 2
    pynvml.nvmlShutdown()
    sim.uninstall()
    assert pynvml.nvmlLib is before
    assert not pynvml._nvmlGetFunctionPointer_cache  # no fake function survives in pynvml's cache
    sim.uninstall()  # idempotent


# --- python -m exporter.simulate.run --------------------------------------------------------------

def test_run_refuses_bad_invocations(capsys: pytest.CaptureFixture[str]) -> None:
    before = pynvml.nvmlLib
    assert run_main(["no-such-scenario", "--", "nvitop-exporter"]) == 2
    assert "no-such-scenario: no such scenario file" in capsys.readouterr().err
    assert run_main(["tiny", "--"]) == 2
    assert "missing command" in capsys.readouterr().err
    assert run_main(["tiny", "--", "no-such-program-xyz"]) == 2
    assert "no-such-program-xyz: not a module" in capsys.readouterr().err
    assert run_main(["tiny", "--", "sh"]) == 2
    assert "is not a Python program" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        run_main(["tiny"])
    assert info.value.code == 2 and "missing `-- CMD" in capsys.readouterr().err
    assert pynvml.nvmlLib is before  # nothing was installed for a refused command


def test_run_python_file_sees_the_fleet_and_its_argv(tmp_path: Path, log_dir: Path) -> None:
    script = write(tmp_path, """\
        import sys
        import pynvml
        pynvml.nvmlInit()
        print("argv", sys.argv[1:], "count", pynvml.nvmlDeviceGetCount(),
              pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(2)))
        sys.exit(3)
        """, name="probe.py")
    proc = ManagedProcess("probe", [sys.executable, "-m", "exporter.simulate.run", "mixed-fleet", "--", str(script),
                                    "--flag"], log_dir)
    try:
        assert proc.proc.wait(60) == 3
    finally:
        proc.stop()
    assert "argv ['--flag'] count 3 Tesla T4" in proc.log()


def test_nvitop_exporter_runs_unchanged_on_the_simulated_fleet(log_dir: Path) -> None:
    port = free_port()
    proc = ManagedProcess("nvitop-exporter", [
        sys.executable, "-m", "exporter.simulate.run", "healthy-8gpu", "--",
        "nvitop-exporter", "--bind-address", "127.0.0.1", "--port", str(port), "--interval", "0.5",
    ], log_dir)
    try:
        def eight_gpus() -> dict[str, list[tuple[dict[str, str], float]]] | None:
            if not proc.alive():
                raise AssertionError(f"nvitop-exporter exited:\n{proc.log()}")
            status, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=2)
            metrics = parse_metrics(body) if status == 200 else {}
            util = metrics.get("gpu_utilization_Percentage", [])
            return metrics if len({labels["uuid"] for labels, _ in util}) == 8 else None

        metrics = wait_until(eight_gpus, timeout=60, interval=0.2, message="nvitop-exporter /metrics with 8 GPUs")
    finally:
        proc.stop()
    names = {labels["devicename"] for labels, _ in metrics["gpu_utilization_Percentage"]}
    assert names == {"NVIDIA H100 80GB HBM3"}
    assert {v for _, v in metrics["gpu_utilization_Percentage"]} == {93.0}
    assert {v for _, v in metrics["gpu_power_usage_W"]} == {520.0}
    assert {v for _, v in metrics["gpu_temperature_C"]} == {62.0}


def test_run_module_target(tmp_path: Path, log_dir: Path) -> None:
    write(tmp_path, """\
        import sys
        import pynvml
        pynvml.nvmlInit()
        print("module", __name__, sys.argv, pynvml.nvmlDeviceGetCount())
        """, name="probe_mod.py")
    proc = ManagedProcess("probe-mod", [sys.executable, "-m", "exporter.simulate.run", "tiny", "--", "-m", "probe_mod",
                                        "x"], log_dir, env={"PYTHONPATH": str(tmp_path)})
    try:
        assert proc.proc.wait(60) == 0
    finally:
        proc.stop()
    assert "module __main__" in proc.log() and "'x'] 2" in proc.log()


def test_allocate_competes_for_the_gpus_memory(sim_factory: Any) -> None:
    """Issue 16: ``allocate`` lets jobs sharing a simulated GPU run it out of memory for real."""
    from exporter.simulate import SimulatedOutOfMemory

    sim = sim_factory("healthy-8gpu")  # 80 GiB, 0.5 GiB reserved, pid 4242 holds 61 GiB
    sim.apply({"gpu": 2, "allocate": {"pid": 10, "used_memory_bytes": "10GiB"}})
    sim.apply({"gpu": 2, "allocate": {"pid": 10, "used_memory_bytes": "18GiB"}})  # grows in place
    with pytest.raises(SimulatedOutOfMemory) as err:
        sim.apply({"gpu": 2, "allocate": {"pid": 11, "used_memory_bytes": "1GiB"}})
    assert err.value.free_bytes == int(0.5 * 2**30) and err.value.total_bytes == 80 * 2**30
    procs = {p.pid: p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle(2))}
    assert procs == {4242: 61 * 2**30, 10: 18 * 2**30}  # the refused allocation changed nothing
    used = pynvml.nvmlDeviceGetMemoryInfo(handle(2), version=pynvml.nvmlMemory_v2).used
    assert used == 79 * 2**30  # the sum of the processes
