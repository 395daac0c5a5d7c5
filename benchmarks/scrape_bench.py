"""Scrape benchmark: our exporter vs nvitop-exporter on the same simulated fleets, figures and ratios.

For 1, 8 and 64 simulated GPUs with 32 processes each (scenarios generated in a temp dir), both
exporters poll at 1 s and are measured the same way, one after the other:

- idle: RSS and CPU share of one core over ``--idle`` seconds before any scrape (polling only);
- latency: sequential GET /metrics on one keep-alive connection for ``--latency`` seconds, p50 / p99;
- sustained: scrapes/s of that sequential client over ``--sustained`` seconds, and the exporter's CPU
  time per scrape from /proc/PID/stat (utime+stime), net of the background rate below;
- after scrapes: the CPU share over another ``--idle`` seconds with no scrapes, once it has been
  scraped (ours pre-renders after every poll while it is being scraped, so this is its cost of polling
  at 1 s under a Prometheus that scrapes it).

Ours is ``python -m exporter --simulate FILE --interval 1 --docker off``; nvitop-exporter runs unchanged
under ``python -m exporter.simulate.run FILE -- nvitop-exporter --interval 1``. No Accept-Encoding (no
gzip) for either. The client is this process, so on a 2-core machine client and exporter each get about
one core. Prints figures; asserts nothing. Total runtime is bounded (about 2 minutes by default).

    python -m benchmarks.scrape_bench                   # 1, 8, 64 GPUs; ours and nvitop-exporter
    python -m benchmarks.scrape_bench --gpus 8 --no-nvitop
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness.process import Child, free_port, percentile, request, rss_bytes

PROCESSES_PER_GPU = 32
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIN_SAMPLES = 10  # per window, even when one scrape takes longer than the window (slow exporters)


def write_scenario(directory: Path, gpus: int, processes: int = PROCESSES_PER_GPU) -> Path:
    """A fleet of ``gpus`` H100s, each with ``processes`` compute processes (distinct PIDs)."""
    spec = {
        "name": f"bench-{gpus}gpu",
        "description": f"{gpus} x H100, {processes} processes each (benchmark)",
        "gpus": [
            {
                "name": "NVIDIA H100 80GB HBM3", "architecture": "hopper", "power_usage_watts": 500,
                "temperature_gpu_celsius": 60, "utilization_gpu_ratio": 0.9, "utilization_memory_ratio": 0.4,
                "gpm_ratios": {"sm_active": 0.8, "tensor_active": 0.5, "dram_bandwidth": 0.3},
                "unsupported": ["fan_speed_ratio"],
                "processes": [
                    {"pid": 100_000 + slot * 100 + j, "type": "compute", "name": "python",
                     "used_memory_bytes": 2 * 2**30, "sm_utilization_ratio": 0.02}
                    for j in range(processes)
                ],
            }
            for slot in range(gpus)
        ],
    }
    path = directory / f"bench-{gpus}gpu.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


@dataclass
class Figures:
    rss_mb: float
    idle_cpu_share: float
    scraped_idle_cpu_share: float
    p50_ms: float
    p99_ms: float
    scrapes_per_s: float
    cpu_ms_per_scrape: float
    body_kb: float
    gpus_seen: int
    latency_samples: int


def start(name: str, argv: list[str], port: int, log_dir: Path, ready: str, timeout: float = 60) -> Child:
    """Start an exporter and wait until /metrics mentions ``ready`` (its first poll is in)."""
    child = Child(name, argv, log_dir)
    deadline = time.monotonic() + timeout
    while True:
        if not child.alive():
            raise RuntimeError(f"{name} exited early:\n{child.log()}")
        with contextlib.suppress(OSError):
            status, body = request(f"http://127.0.0.1:{port}", "GET", "/metrics", timeout=5)
            if status == 200 and ready.encode() in body:
                return child
        if time.monotonic() > deadline:
            child.stop()
            raise RuntimeError(f"{name} not ready within {timeout:.0f} s:\n{child.log()}")
        time.sleep(0.2)


def measure(child: Child, port: int, gpu_metric: str, idle_s: float, latency_s: float, sustained_s: float) -> Figures:
    time.sleep(1.5)  # let start-up settle (imports, first polls) before the idle window
    c0, t0 = cpu_seconds(child.pid), time.monotonic()
    time.sleep(idle_s)
    idle_rate = (cpu_seconds(child.pid) - c0) / (time.monotonic() - t0)
    rss = rss_bytes(child.pid)

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def scrape() -> bytes:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"/metrics answered {resp.status}")
        return body

    body = scrape()  # warm-up, and the body for the GPU count
    gpus_seen = len({line.split(b"uuid=\"", 1)[1].split(b"\"", 1)[0]
                     for line in body.splitlines() if line.startswith(gpu_metric.encode()) and b"uuid=\"" in line})
    latencies: list[float] = []
    end = time.monotonic() + latency_s
    while time.monotonic() < end or len(latencies) < MIN_SAMPLES:
        s = time.perf_counter()
        scrape()
        latencies.append(time.perf_counter() - s)

    n = 0
    c0, t0 = cpu_seconds(child.pid), time.monotonic()
    end = t0 + sustained_s
    while time.monotonic() < end or n < MIN_SAMPLES:
        scrape()
        n += 1
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(child.pid) - c0
    conn.close()
    # Background CPU between scrapes once it is being scraped (ours then pre-renders after every poll).
    c1, t1 = cpu_seconds(child.pid), time.monotonic()
    time.sleep(idle_s)
    scraped_idle_rate = (cpu_seconds(child.pid) - c1) / (time.monotonic() - t1)
    return Figures(
        rss_mb=rss / 2**20,
        idle_cpu_share=idle_rate,
        scraped_idle_cpu_share=scraped_idle_rate,
        p50_ms=percentile(latencies, 50) * 1e3,
        p99_ms=percentile(latencies, 99) * 1e3,
        scrapes_per_s=n / elapsed,
        cpu_ms_per_scrape=max(0.0, cpu - scraped_idle_rate * elapsed) / n * 1e3,
        body_kb=len(body) / 1024,
        gpus_seen=gpus_seen,
        latency_samples=len(latencies),
    )


def run_ours(scenario: Path, log_dir: Path, args: argparse.Namespace) -> Figures:
    port = free_port()
    argv = [sys.executable, "-m", "exporter", "--listen", f"127.0.0.1:{port}", "--simulate", str(scenario),
            "--interval", "1", "--docker", "off", "--log-level", "warning", "--host-label", "bench"]
    child = start("ours", argv, port, log_dir, ready="gpu_info{")
    try:
        return measure(child, port, "gpu_info{", args.idle, args.latency, args.sustained)
    finally:
        child.stop()


def run_nvitop(scenario: Path, log_dir: Path, args: argparse.Namespace) -> Figures:
    port = free_port()
    argv = [sys.executable, "-m", "exporter.simulate.run", str(scenario), "--", "nvitop-exporter",
            "--bind-address", "127.0.0.1", "--port", str(port), "--interval", "1", "--hostname", "bench"]
    child = start("nvitop", argv, port, log_dir, ready="gpu_utilization_Percentage{")
    try:
        return measure(child, port, "gpu_utilization_Percentage{", args.idle, args.latency, args.sustained)
    finally:
        child.stop()


ROWS = [
    ("p50 latency", "p50_ms", "ms", "{:.2f}"),
    ("p99 latency", "p99_ms", "ms", "{:.2f}"),
    ("sustained scrapes/s", "scrapes_per_s", "/s", "{:.3g}"),
    ("CPU per scrape", "cpu_ms_per_scrape", "ms", "{:.2f}"),
    ("RSS", "rss_mb", "MB", "{:.1f}"),
    ("idle CPU (1 s poll)", "idle_cpu_share", "core", "{:.2%}"),
    ("... after scrapes", "scraped_idle_cpu_share", "core", "{:.2%}"),
    ("/metrics body", "body_kb", "KiB", "{:.0f}"),
    ("latency samples", "latency_samples", "n", "{}"),
]


def report(gpus: int, ours: Figures, theirs: Figures | None) -> None:
    print(f"\n== {gpus} simulated GPU(s) x {PROCESSES_PER_GPU} processes "
          f"(GPUs seen: ours {ours.gpus_seen}" + (f", nvitop {theirs.gpus_seen})" if theirs else ")"))
    print(f"{'':22} {'ours':>10} {'nvitop-exporter':>16} {'nvitop/ours':>12}")
    for label, attr, unit, fmt in ROWS:
        a = getattr(ours, attr)
        line = f"{label + ' (' + unit + ')':22} {fmt.format(a):>10}"
        if theirs is not None:
            b = getattr(theirs, attr)
            ratio = f"{b / a:.3g}x" if a > 0 and attr != "latency_samples" else ""
            line += f" {fmt.format(b):>16} {ratio:>12}"
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64], help="fleet sizes (default 1 8 64)")
    parser.add_argument("--idle", type=float, default=4.0, help="idle window, seconds (default 4)")
    parser.add_argument("--latency", type=float, default=2.0, help="latency window, seconds (default 2)")
    parser.add_argument("--sustained", type=float, default=3.0, help="sustained window, seconds (default 3)")
    parser.add_argument("--no-nvitop", action="store_true", help="measure only our exporter")
    args = parser.parse_args()
    print(f"scrape_bench: {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}: other work skews p99), "
          f"Python {sys.version.split()[0]}, poll interval 1 s, windows idle {args.idle:g} s / "
          f"latency {args.latency:g} s / sustained {args.sustained:g} s; simulated NVML runs inside each "
          "exporter, so its cost is in both columns")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="scrape-bench-") as tmp:
        tmpdir = Path(tmp)
        for gpus in args.gpus:
            scenario = write_scenario(tmpdir, gpus)
            ours = run_ours(scenario, tmpdir, args)
            theirs = None if args.no_nvitop else run_nvitop(scenario, tmpdir, args)
            report(gpus, ours, theirs)
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
