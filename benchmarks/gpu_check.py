"""GPU checks on a machine with a real NVIDIA GPU: what the simulator cannot prove.

Run through ``benchmarks/gpu_check.sh`` (it installs the wheels the GPU machine lacks). In one run:

1. **NVML vs nvidia-smi**: the exporter on real NVML, its values compared per GPU (by UUID) with
   ``nvidia-smi --query-gpu`` within tolerances; the fields the card reports as unsupported. Then the
   PCIe link, NVLink state and error counters, throttle counters, recovery action and MIG devices
   against ``nvidia-smi`` (``benchmarks/gpu_check_links.py``).
2. **Hook adds no device synchronisation**: a CUDA training loop that itself never syncs, run with
   ``torch.cuda.set_sync_debug_mode("warn")``, with and without the hook: the hook must add zero
   synchronising-operation warnings; steps/s with and without the hook (medians, ratio).
3. **A real CUDA OOM** (over-allocation caught by the training code, ``workload.train --fault oom@N``)
   is counted by the exporter with the requested size; the workload's PID is joined to NVML's
   per-process memory (``gpu_process_memory_used_bytes`` carries ``training_job``).
4. **Side by side with nvitop-exporter** on the same card: /metrics latency p50/p99 of both and the
   memory-used values they report.
5. **DDP wait timing without a sync** (issue 16): a 1-rank NCCL DDP job with ``mon.watch_ddp`` under
   ``set_sync_debug_mode("warn")``: no more sync warnings than without the hook; the CUDA-event-timed
   collective wait reaches the exporter (``training_collective_wait_seconds_total`` > 0) and the hook's
   device UUID matches the GPU's (``training_process_gpu_info``).
6. The hook overhead benchmark (``python -m benchmarks.hook_overhead --cuda``).

Prints a report and writes the same as JSON (``--out``). Exit 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from benchmarks.gpu_check_links import check_links_vs_smi
from harness.process import Child, free_port, parse_metrics, start_exporter

REPO = Path(__file__).resolve().parent.parent

log = logging.getLogger("gpu_check")

# nvidia-smi field → (exporter metric, extra label filter, scale from nvidia-smi units to base units,
# absolute tolerance in base units, relative tolerance). Utilization, power and clocks move between
# the two reads, so they get loose tolerances; totals and thresholds must match.
SMI_FIELDS: dict[str, tuple[str, dict[str, str], float, float, float]] = {
    "memory.total": ("gpu_memory_total_bytes", {}, 2**20, 2**20, 0.0),
    "memory.used": ("gpu_memory_used_bytes", {}, 2**20, 256 * 2**20, 0.02),
    "temperature.gpu": ("gpu_temperature_celsius", {}, 1.0, 3.0, 0.0),
    "power.draw": ("gpu_power_usage_watts", {}, 1.0, 30.0, 0.15),
    "power.limit": ("gpu_power_limit_watts", {}, 1.0, 1.0, 0.0),
    "utilization.gpu": ("gpu_utilization_ratio", {}, 0.01, 0.25, 0.0),
    "clocks.sm": ("gpu_clock_hertz", {"clock": "sm"}, 1e6, 150e6, 0.0),
    "clocks.mem": ("gpu_clock_hertz", {"clock": "memory"}, 1e6, 50e6, 0.0),
    "clocks.max.sm": ("gpu_clock_max_hertz", {"clock": "sm"}, 1e6, 1e6, 0.0),
    "pstate": ("gpu_performance_state", {}, 1.0, 2.0, 0.0),
}


Series = dict[str, list[tuple[dict[str, str], float]]]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def wait_for(url: str, child: Child, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited before {url} answered:\n{child.log()[-2000:]}")
        if http_get(url, timeout=1)[0] == 200:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def find(series: Series, name: str, **labels: str) -> list[float]:
    return [v for lab, v in series.get(name, []) if all(lab.get(k) == w for k, w in labels.items())]


def scrape(base: str) -> Series:
    status, body = http_get(base + "/metrics")
    if status != 200:
        raise RuntimeError(f"{base}/metrics answered {status}")
    return parse_metrics(body.decode())


class Exporter:
    """``python -m exporter`` on real NVML on a loopback port, once ready (first poll done)."""

    def __init__(self, log_dir: Path, *args: str) -> None:
        self.child, self.base = start_exporter(log_dir, "--docker", "off", *args)
        wait_for(self.base + "/readyz", self.child)

    def stop(self) -> None:
        self.child.stop()


# ---------------------------------------------------------------------------------------- checks
def check_nvml_vs_smi(exp: Exporter) -> dict[str, Any]:
    """Compare the exporter's values with nvidia-smi's, GPU by GPU (matched by UUID)."""
    fields = ["uuid", *SMI_FIELDS]
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    series = scrape(exp.base)
    index_by_uuid = {lab["uuid"]: lab["gpu"] for lab, _ in series.get("gpu_info", [])}
    rows, failures = [], []
    for line in out.strip().splitlines():
        values = [v.strip() for v in line.split(",")]
        uuid = values[0]
        gpu = index_by_uuid.get(uuid)
        if gpu is None:
            failures.append(f"{uuid}: nvidia-smi lists it, the exporter does not")
            continue
        for field, raw in zip(SMI_FIELDS, values[1:], strict=True):
            metric, extra, scale, abs_tol, rel_tol = SMI_FIELDS[field]
            ours = find(series, metric, uuid=uuid, **extra)
            if raw in ("[N/A]", "[Not Supported]", "N/A", ""):
                rows.append({"gpu": gpu, "field": field, "smi": raw, "exporter": ours[0] if ours else None, "ok": not ours})
                if ours:
                    failures.append(f"gpu {gpu} {field}: nvidia-smi says {raw}, exporter has {ours[0]}")
                continue
            smi = float(raw.lstrip("P")) * scale
            ok = len(ours) == 1 and abs(ours[0] - smi) <= max(abs_tol, rel_tol * abs(smi))
            rows.append({"gpu": gpu, "field": field, "smi": smi, "exporter": ours[0] if ours else None, "ok": ok})
            if not ok:
                failures.append(f"gpu {gpu} {field}: nvidia-smi {smi:g}, exporter {ours}")
    status = json.loads(http_get(exp.base + "/status")[1])
    unsupported = {str(g["index"]): g["unsupported"] for g in status.get("gpus", [])}
    names = sorted(n for n in series if n.startswith("gpu_") and not n.startswith("gpu_exporter_"))
    return {"rows": rows, "failures": failures, "unsupported_fields": unsupported, "gpu_metric_names": names,
            "driver_version": status.get("driver_version"), "cuda_driver_version": status.get("cuda_driver_version")}


def _sync_free_loop(steps: int, with_hook: bool, exporter_url: str) -> tuple[float, int]:
    """A CUDA loop that never synchronises by itself; returns (steps/s, sync warnings seen)."""
    import torch

    import exporter.hook as gpu_hook

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = torch.nn.Sequential(
        torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)
    ).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(256, 1024, device=dev)
    mon = gpu_hook.start(job="gpu-check-sync", url=exporter_url, loss_every=10) if with_hook else None
    for _ in range(20):  # warm-up outside the measured, checked region
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        t0 = time.perf_counter()
        try:
            for _ in range(steps):
                if mon is not None:
                    with mon.step(samples=256):
                        loss = model(x).square().mean()
                        loss.backward()
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    mon.observe_loss(loss)
                else:
                    loss = model(x).square().mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    if with_hook:
        gpu_hook.stop()
    syncs = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    return steps / elapsed, syncs


def check_hook_sync_and_speed(exp: Exporter, steps: int, repeats: int) -> dict[str, Any]:
    """Hook on/off alternately in one process: sync warnings added by the hook, and steps/s."""
    rates: dict[str, list[float]] = {"without": [], "with": []}
    syncs: dict[str, int] = {"without": 0, "with": 0}
    for _ in range(repeats):
        for mode in ("without", "with"):
            rate, n = _sync_free_loop(steps, mode == "with", exp.base)
            rates[mode].append(rate)
            syncs[mode] += n
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "steps_per_second_median": med,
        "with_over_without_ratio": med["with"] / med["without"],
        "sync_warnings": syncs,
        "failures": [] if syncs["with"] == syncs["without"] else [
            f"the hook added {syncs['with'] - syncs['without']} synchronising CUDA operations"
        ],
    }


def check_real_oom(exp: Exporter, log_dir: Path) -> dict[str, Any]:
    """The sample workload on CUDA, a real over-allocation caught by its loop: counted with its size."""
    job = "gpu-check-oom"
    cmd = [sys.executable, "-m", "workload.train", "--device", "cuda", "--steps", "60", "--step-delay", "0.05",
           "--job", job, "--exporter-url", exp.base, "--push-interval", "0.5", "--fault", "oom@20"]
    with (log_dir / "workload-oom.log").open("wb") as logf:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT)
        joined: list[float] = []
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            series = scrape(exp.base)
            joined = joined or find(series, "gpu_process_memory_used_bytes", pid=str(proc.pid), training_job=job)
            time.sleep(0.5)
        if proc.poll() is None:
            proc.kill()
    time.sleep(1.0)  # the hook's final push happens at exit; one more poll of the exporter's store
    series = scrape(exp.base)
    ooms = find(series, "training_cuda_oom_total", training_job=job)
    requested = find(series, "training_cuda_oom_last_requested_bytes", training_job=job)
    steps = find(series, "training_steps_total", training_job=job)
    failures = []
    if proc.returncode != 0:
        failures.append(f"workload exited {proc.returncode} (see workload-oom.log)")
    if not ooms or ooms[0] < 1:
        failures.append(f"training_cuda_oom_total for {job}: {ooms}")
    if not requested or requested[0] <= 0:
        failures.append(f"training_cuda_oom_last_requested_bytes for {job}: {requested}")
    if not joined:
        failures.append("NVML per-process memory never carried the workload's training_job label")
    return {"oom_total": ooms, "oom_last_requested_bytes": requested, "steps_total": steps,
            "process_memory_joined_bytes": joined[:1], "workload_exit": proc.returncode, "failures": failures}


def _latencies(url: str, n: int) -> dict[str, float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        status, _ = http_get(url)
        times.append(time.perf_counter() - t0)
        if status != 200:
            raise RuntimeError(f"{url} answered {status}")
    times.sort()
    return {"p50_ms": 1e3 * times[len(times) // 2], "p99_ms": 1e3 * times[int(len(times) * 0.99) - 1]}


def check_side_by_side(exp: Exporter, log_dir: Path, n: int) -> dict[str, Any]:
    """nvitop-exporter on the same card: scrape latency and memory-used values next to ours."""
    binary = shutil.which("nvitop-exporter")
    if binary is None:
        return {"skipped": "nvitop-exporter is not installed", "failures": []}
    port = free_port()
    child = Child("nvitop-exporter", [binary, "--bind-address", "127.0.0.1", "--port", str(port), "--interval", "1"],
                  log_dir)
    try:
        wait_for(f"http://127.0.0.1:{port}/metrics", child)
        theirs = _latencies(f"http://127.0.0.1:{port}/metrics", n)
        ours = _latencies(exp.base + "/metrics", n)
        _, body = http_get(f"http://127.0.0.1:{port}/metrics")
        their_mem = [(lab, v) for name, rows in parse_metrics(body.decode()).items() if "memory_used" in name
                     for lab, v in rows][:8]
    finally:
        child.stop()
    our_mem = [(lab.get("gpu"), v) for lab, v in scrape(exp.base).get("gpu_memory_used_bytes", [])]
    return {"ours": ours, "nvitop_exporter": theirs,
            "p99_ratio_nvitop_over_ours": theirs["p99_ms"] / ours["p99_ms"] if ours["p99_ms"] else None,
            "memory_used_ours": our_mem, "memory_used_nvitop_sample": [(str(lab), v) for lab, v in their_mem],
            "failures": []}


def _ddp_loop(steps: int, watch: bool, exporter_url: str) -> int:
    """1-rank NCCL DDP steps that never sync by themselves; returns the sync warnings seen."""
    import torch

    import exporter.hook as gpu_hook

    dev = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)).to(dev)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
    mon = gpu_hook.start(job="gpu-check-ddp", url=exporter_url, interval=0.2)
    if watch:
        assert mon.watch_ddp(ddp), "watch_ddp could not register"
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    x = torch.randn(256, 1024, device=dev)
    for _ in range(10):  # warm-up (DDP rebuilds its buckets after the first step)
        ddp(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                with mon.step(samples=256):
                    ddp(x).square().mean().backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                mon.build_payload()  # the sender's work (reads the CUDA events) on this thread too
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    time.sleep(0.5)  # a push after the events completed
    gpu_hook.stop()
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def check_ddp_wait_timing(exp: Exporter, steps: int) -> dict[str, Any]:
    """Issue 16 on a GPU: watch_ddp adds no sync; the device-timed wait and the device UUID arrive."""
    import torch.distributed as dist

    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        without = _ddp_loop(steps, False, exp.base)
        with_watch = _ddp_loop(steps, True, exp.base)
    finally:
        dist.destroy_process_group()
    series = scrape(exp.base)
    waits = find(series, "training_collective_wait_seconds_total", training_job="gpu-check-ddp")
    uuids = [lab.get("uuid") for lab, _ in series.get("training_process_gpu_info", [])
             if lab.get("training_job") == "gpu-check-ddp"]
    smi = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False).stdout.split()
    failures = []
    if with_watch > without:
        failures.append(f"watch_ddp added {with_watch - without} synchronising CUDA operations")
    if not waits or max(waits) <= 0:
        failures.append(f"no device-timed collective wait reached the exporter: {waits}")
    if not uuids or not set(uuids) <= set(smi):
        failures.append(f"hook device UUID {uuids} not among nvidia-smi's {smi}")
    return {"sync_warnings": {"without": without, "with_watch_ddp": with_watch},
            "collective_wait_seconds": waits, "gpu_uuids": uuids, "failures": failures}


def run_hook_overhead_benchmark() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.hook_overhead", "--cuda"], cwd=REPO, capture_output=True, text=True, timeout=600)
    return {"exit": proc.returncode, "output": proc.stdout[-6000:] + proc.stderr[-2000:],
            "failures": [] if proc.returncode == 0 else ["hook_overhead.py --cuda failed"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/gpu-check/gpu_check.json"))
    parser.add_argument("--steps", type=int, default=300, help="steps per sync/speed run")
    parser.add_argument("--repeats", type=int, default=5, help="alternating with/without-hook runs")
    parser.add_argument("--scrapes", type=int, default=500, help="scrapes per latency measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_dir = args.out.parent
    log_dir.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = {}
    exp = Exporter(log_dir, "--interval", "1")
    try:
        for name, fn in (
            ("nvml_vs_nvidia_smi", lambda: check_nvml_vs_smi(exp)),
            ("links_throttle_recovery_mig_vs_nvidia_smi", lambda: check_links_vs_smi(lambda: scrape(exp.base))),
            ("hook_sync_and_speed", lambda: check_hook_sync_and_speed(exp, args.steps, args.repeats)),
            ("real_oom", lambda: check_real_oom(exp, log_dir)),
            ("ddp_wait_timing", lambda: check_ddp_wait_timing(exp, args.steps)),
            ("side_by_side_nvitop_exporter", lambda: check_side_by_side(exp, log_dir, args.scrapes)),
            ("hook_overhead_benchmark", run_hook_overhead_benchmark),
        ):
            log.info("== %s", name)
            try:
                report[name] = fn()
            except Exception as exc:  # one broken check must not hide the others' figures
                log.exception("%s failed", name)
                report[name] = {"failures": [f"{type(exc).__name__}: {exc}"]}
    finally:
        exp.stop()
    args.out.write_text(json.dumps(report, indent=2, default=str))
    failures = [f"{k}: {f}" for k, v in report.items() for f in v.get("failures", [])]
    print(json.dumps(report, indent=2, default=str))
    print(f"\nGPU checks: {len(failures)} failure(s)")
    for f in failures:
        print("  FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
