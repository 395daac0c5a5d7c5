"""Poll cost of the NVML reader: NVML calls per GPU per poll and CPU per poll, in process.

The real ``NvmlReader`` polls a simulated fleet (8 x H100 SXM, 32 processes each, 18 NVLink links,
PCIe link and error counters, throttle counters, recovery action: every field on) for ``--polls``
polls; a second run puts every GPU in MIG mode with 7 instances. Each NVML C call is counted by
wrapping the functions nvidia-ml-py looks up (``pynvml._nvmlGetFunctionPointer``), so the count is what
a real driver would see (pynvml's list wrappers call twice: size, then data). CPU is this thread's CPU time per ``read()`` (median), which includes the simulated
library's own Python; a second pass times the simulated library's functions to give the reader's own
share (what it would cost over the real C library, driver time aside). ``idle share`` is CPU per poll
at one poll per second. The simulated fleet's PIDs do not exist on this host, so the attribution
engine finds no /proc entry for them; a separate figure times the engine alone on as many live PIDs
(``sleep`` processes this script starts and stops). Prints figures; asserts nothing.

Before/after a change, run the same script against the other tree's ``exporter`` (it then writes the
fleet without the keys that tree does not know):

    python -m benchmarks.poll_cost                          # this tree (≈40 s)
    cd /tmp && PYTHONPATH=/path/to/other/checkout python /path/to/this/benchmarks/poll_cost.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pynvml

PROCESSES_PER_GPU = 32
NEW_KEYS = ("nvlink_links", "nvlink_bytes_per_second", "mig_mode", "mig_instances")


def fleet(gpus: int, mig: bool, new_keys: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "NVIDIA H100 80GB HBM3", "architecture": "hopper", "power_usage_watts": 500,
        "temperature_gpu_celsius": 60, "utilization_gpu_ratio": 0.9, "utilization_memory_ratio": 0.4,
        "gpm_ratios": {"sm_active": 0.8, "tensor_active": 0.5, "dram_bandwidth": 0.3},
        "unsupported": ["fan_speed_ratio"],
    }
    if new_keys:
        spec |= {"nvlink_links": 18, "nvlink_bytes_per_second": {"tx": 1e10, "rx": 1e10}}
        if mig:
            spec |= {"mig_mode": "enabled", "mig_instances": [
                {"gpu_instance": gi, "compute_instance": 0, "profile": "1g.10gb", "memory_total_bytes": "10GiB",
                 "gpm_ratios": {"sm_active": 0.5}} for gi in range(7, 14)]}
    gpus_out = []
    for slot in range(gpus):
        procs = [{"pid": 100_000 + slot * 100 + j, "type": "compute", "name": "python",
                  "used_memory_bytes": 2**28, "sm_utilization_ratio": 0.02} for j in range(PROCESSES_PER_GPU)]
        if new_keys and mig:
            for j, p in enumerate(procs):
                p |= {"gpu_instance": 7 + j % 7, "compute_instance": 0}
        gpus_out.append({**spec, "processes": procs})
    return {"name": f"poll-cost-{gpus}", "description": "poll cost benchmark", "gpus": gpus_out}


def count_calls(inside: list[float] | None = None) -> tuple[Counter[str], Callable[[], None]]:
    """Count every NVML C call made through pynvml's wrappers (and, with ``inside``, add up the CPU
    time spent in the simulated library itself); returns (counter, undo)."""
    calls: Counter[str] = Counter()
    original = pynvml._nvmlGetFunctionPointer

    def counting(name: str) -> Any:
        fn = original(name)

        def counted(*args: Any) -> Any:  # one C call (pynvml's list wrappers make two per lookup)
            calls[name] += 1
            return fn(*args)

        if inside is None:
            return counted

        def timed(*args: Any) -> Any:
            calls[name] += 1
            t0 = time.thread_time()
            try:
                return fn(*args)
            finally:
                inside[0] += time.thread_time() - t0

        return timed

    pynvml._nvmlGetFunctionPointer = counting
    return calls, lambda: setattr(pynvml, "_nvmlGetFunctionPointer", original)


def measure(gpus: int, polls: int, mig: bool) -> dict[str, Any] | None:
    from exporter.nvml import NvmlReader
    from exporter.simulate import ScenarioError, install, parse_scenario

    try:
        scenario = parse_scenario(fleet(gpus, mig, new_keys=True))
        new_fields = True
    except ScenarioError:
        if mig:
            return None  # that tree has no MIG simulation
        scenario = parse_scenario(fleet(gpus, mig, new_keys=False))
        new_fields = False
    t = [0.0]
    sim = install(scenario, clock=lambda: t[0])
    reader = NvmlReader("bench")
    inside = [0.0]
    try:
        calls, undo = count_calls()
        try:
            for _ in range(3):  # warm-up: NVML session, field plans, board constants, GPM pairs
                t[0] += 1.0
                reader.read()
            calls.clear()
            cpu: list[float] = []
            for _ in range(polls):
                t[0] += 1.0
                c0 = time.thread_time()
                snap = reader.read()
                cpu.append(time.thread_time() - c0)
            assert snap.nvml_up and all(g.up for g in snap.gpus)
        finally:
            undo()
        # A second pass that also times the simulated library, to take its share out.
        _, undo = count_calls(inside)
        try:
            for _ in range(polls):
                t[0] += 1.0
                reader.read()
        finally:
            undo()
    finally:
        reader.close()
        sim.uninstall()
    per_gpu_poll = sum(calls.values()) / gpus / polls
    return {
        "new_fields": new_fields,
        "calls": per_gpu_poll,
        "top": [(name, n / gpus / polls) for name, n in calls.most_common(8)],
        "cpu_ms": statistics.median(cpu) * 1e3,
        "sim_ms": inside[0] / polls * 1e3,
        "series_fields": len(snap.gpus[0].nvlink_errors) + len(snap.gpus[0].nvlink_up) if new_fields else 0,
    }


def attribution_cost(gpus: int, polls: int) -> float:
    """CPU per poll (median, ms) of the attribution engine alone over ``gpus`` x PROCESSES_PER_GPU live
    PIDs (its /proc reads), at the default proc root."""
    import subprocess

    from exporter.attribution.engine import AttributionEngine
    from exporter.snapshot import GpuProcess, GpuSample, NodeSnapshot

    sleepers = [subprocess.Popen(["sleep", "600"]) for _ in range(gpus * PROCESSES_PER_GPU)]
    try:
        snap = NodeSnapshot(host="bench", timestamp_seconds=0.0, nvml_up=True, gpus=tuple(
            GpuSample(index=g, uuid=f"GPU-{g}", up=True, processes=tuple(
                GpuProcess(pid=p.pid, process_type="compute", used_memory_bytes=2**28)
                for p in sleepers[g * PROCESSES_PER_GPU:(g + 1) * PROCESSES_PER_GPU]))
            for g in range(gpus)))
        engine = AttributionEngine()
        for _ in range(3):
            engine(snap)
        cpu = []
        for _ in range(polls):
            c0 = time.thread_time()
            engine(snap)
            cpu.append(time.thread_time() - c0)
        return statistics.median(cpu) * 1e3
    finally:
        for p in sleepers:
            p.kill()
        for p in sleepers:
            p.wait()


def process_idle(gpus: int, seconds: float) -> tuple[float, bool] | None:
    """The whole exporter process (``python -m exporter --simulate FLEET --interval 1``), never scraped:
    its CPU share of one core over ``seconds`` after a warm-up, from /proc. Returns (share, new fields)."""
    import tempfile
    from pathlib import Path

    import yaml

    from exporter.simulate import ScenarioError, parse_scenario
    from harness.process import start_exporter

    new_keys = True
    try:
        parse_scenario(fleet(gpus, False, new_keys=True))
    except ScenarioError:
        new_keys = False
    with tempfile.TemporaryDirectory(prefix="poll-cost-") as tmp:
        path = Path(tmp) / "fleet.yaml"
        path.write_text(yaml.safe_dump(fleet(gpus, False, new_keys=new_keys)))
        child, _ = start_exporter(Path(tmp), "--simulate", str(path), "--interval", "1", "--docker", "off")
        try:
            time.sleep(3.0)  # imports done, first polls (field plans, constants) behind it
            c0, t0 = _cpu_seconds(child.pid), time.monotonic()
            time.sleep(seconds)
            return (_cpu_seconds(child.pid) - c0) / (time.monotonic() - t0), new_keys
        finally:
            child.stop()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--gpus", type=int, default=8, help="simulated GPUs (default 8)")
    parser.add_argument("--polls", type=int, default=30, help="measured polls per run (default 30)")
    parser.add_argument("--process-seconds", type=float, default=20.0,
                        help="idle window of the whole-process measurement; 0 skips it (default 20)")
    args = parser.parse_args()
    import exporter

    print(f"poll_cost: exporter from {os.path.dirname(exporter.__file__)}, {args.gpus} x H100 x "
          f"{PROCESSES_PER_GPU} processes, {args.polls} polls, Python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for mig in (False, True):
        r = measure(args.gpus, args.polls, mig)
        label = "MIG 7 instances/GPU" if mig else "whole GPUs"
        if r is None:
            print(f"\n{label}: not simulated by this tree")
            continue
        print(f"\n{label} ({'all new fields on' if r['new_fields'] else 'without the new fields'}):")
        print(f"  NVML calls per GPU per poll  {r['calls']:.1f}")
        reader_ms = max(0.0, r["cpu_ms"] - r["sim_ms"])
        print(f"  CPU per poll (median)        {r['cpu_ms']:.2f} ms  (reader + simulated NVML)")
        print(f"  ... in the simulated NVML    {r['sim_ms']:.2f} ms  (mean; real NVML does this in C + driver)")
        print(f"  idle share at 1 s polling    {r['cpu_ms'] / 1000:.2%} of a core with the simulator, "
              f"{reader_ms / 1000:.2%} for the reader alone")
        print("  most frequent calls per GPU per poll: "
              + ", ".join(f"{name.removeprefix('nvmlDevice')} {n:.1f}" for name, n in r["top"]))
    ms = attribution_cost(args.gpus, args.polls)
    print(f"\nattribution engine alone, {args.gpus * PROCESSES_PER_GPU} live PIDs: {ms:.2f} ms per poll "
          f"(median), {ms / 1000:.2%} of a core at 1 s polling")
    if args.process_seconds > 0:
        idle = process_idle(args.gpus, args.process_seconds)
        if idle is not None:
            share, new_fields = idle
            print(f"\nwhole exporter process, 1 s polling, not scraped, {args.process_seconds:g} s "
                  f"({'all new fields on' if new_fields else 'without the new fields'}): "
                  f"{share:.2%} of a core (simulated NVML included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
