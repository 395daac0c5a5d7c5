"""Ingest benchmark: sustained training-push rate (snapshots/s) the exporter accepts, and /metrics
latency (p50/p99) with and without that load, on the same run.

Starts the real exporter (simulated 8-GPU fleet), measures scrape latency idle, then runs pusher
processes (each with one keep-alive connection, cycling over its own training processes with rising
``seq``, the way the hook pushes cumulative snapshots) while the scraper keeps measuring. Prints the
figures; asserts nothing.

    python -m benchmarks.ingest_bench                       # 2 pushers x 16 processes, 15 s
    python -m benchmarks.ingest_bench --pushers 4 --duration 30
    python -m benchmarks.ingest_bench --rate 64                # a busy node: 64 ranks pushing every second
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from exporter.hook.schema import COUNTERS, GAUGES, INGEST_PATH
from harness.process import percentile, start_exporter


def push_body(pid: int, seq: int, job: str) -> bytes:
    """A full-size push like the hook's: every counter and gauge, one auth/quota service."""
    return json.dumps({
        "schema": 1,
        "seq": seq,
        "process_start_time": 1_700_000_000.0,
        "sent_at": time.time(),
        "identity": {
            "hostname": "bench", "training_job": job, "rank": str(pid % 64), "local_rank": str(pid % 8),
            "world_size": "64", "pid": pid, "pid_namespace_inode": 4026531836, "device": "cuda:0",
            "torch_version": "2.13.0", "framework": "plain",
        },
        "counters": {k: float(seq * 10) for k in COUNTERS},
        "gauges": {k: 1.5 for k in GAUGES},
        "auth_failures": [{"service": "hf", "status_code": "401", "count": 1}],
        "token_expiry": {"hf": 1_800_000_000.0},
        "api_quota": {"hf": {"remaining": 10, "limit": 100}},
    }).encode()


def pusher(addr: tuple[str, int], worker: int, processes: int, until: float, out: Any, rate: float) -> None:
    """Push until ``until`` (monotonic), as fast as the exporter answers or at ``rate`` per second;
    report counts by status."""
    conn = http.client.HTTPConnection(*addr, timeout=10)
    counts: dict[int, int] = {}
    seq = 0
    headers = {"Content-Type": "application/json"}
    start = time.monotonic()
    while time.monotonic() < until:
        if rate > 0:
            time.sleep(max(0.0, start + seq / rate - time.monotonic()))
        seq += 1
        pid = 100_000 + worker * 1000 + seq % processes
        try:
            conn.request("POST", INGEST_PATH, body=push_body(pid, seq, f"bench-{worker}"), headers=headers)
            resp = conn.getresponse()
            resp.read()
            counts[resp.status] = counts.get(resp.status, 0) + 1
        except (OSError, http.client.HTTPException):
            counts[0] = counts.get(0, 0) + 1
            conn.close()
            conn = http.client.HTTPConnection(*addr, timeout=10)
    conn.close()
    out.put(counts)


def scrape_latencies(addr: tuple[str, int], seconds: float, period: float) -> list[float]:
    """Scrape /metrics every ``period`` seconds for ``seconds`` on a keep-alive connection."""
    conn = http.client.HTTPConnection(*addr, timeout=10)
    lat: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        resp.read()
        if resp.status == 200:
            lat.append(time.perf_counter() - t0)
        time.sleep(max(0.0, period - (time.perf_counter() - t0)))
    conn.close()
    return lat


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fmt_ms(values: list[float]) -> str:
    if not values:
        return "no samples"
    return f"p50 {percentile(values, 50) * 1000:.2f} ms, p99 {percentile(values, 99) * 1000:.2f} ms (n={len(values)})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=15.0, help="seconds of ingest load (default 15)")
    p.add_argument("--idle", type=float, default=5.0, help="seconds of scraping without load first")
    p.add_argument("--pushers", type=int, default=2, help="pusher processes (default 2)")
    p.add_argument("--processes", type=int, default=16, help="training processes each pusher plays")
    p.add_argument("--rate", type=float, default=0.0,
                   help="total pushes per second to offer (default 0: as fast as the exporter takes them)")
    p.add_argument("--scrape-period", type=float, default=0.05, help="seconds between scrapes")
    args = p.parse_args(argv)

    log_dir = Path(tempfile.mkdtemp(prefix="gpu-exporter-ingest-bench-"))
    exporter, base = start_exporter(
        log_dir, "--simulate", "healthy-8gpu", "--interval", "1", "--log-level", "warning",
        "--ingest-rate-limit", "0", "--training-max-processes", str(max(1024, args.pushers * args.processes)),
    )
    host, _, port = base.removeprefix("http://").partition(":")
    addr = (host, int(port))
    try:
        time.sleep(1.0)  # first poll done, caches warm
        idle = scrape_latencies(addr, args.idle, args.scrape_period)
        ctx = mp.get_context("fork")
        out = ctx.Queue()
        until = time.monotonic() + args.duration
        cpu0 = cpu_seconds(exporter.pid)
        t0 = time.monotonic()
        procs = [ctx.Process(target=pusher, args=(addr, w, args.processes, until, out, args.rate / args.pushers)) for w in range(args.pushers)]
        for proc in procs:
            proc.start()
        loaded: list[float] = []
        scraper = threading.Thread(
            target=lambda: loaded.extend(scrape_latencies(addr, args.duration, args.scrape_period))
        )
        scraper.start()
        totals: dict[int, int] = {}
        for _ in procs:
            for status, n in out.get(timeout=args.duration + 60).items():
                totals[status] = totals.get(status, 0) + n
        for proc in procs:
            proc.join(10)
        scraper.join(args.duration + 30)
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(exporter.pid) - cpu0
    finally:
        exporter.stop()

    accepted = totals.get(202, 0)
    print(f"machine: {os.cpu_count()} CPUs; exporter on {base}; {args.pushers} pushers x {args.processes} "
          f"processes, {args.duration:.0f} s, offered rate {args.rate or 'unlimited'}/s")
    print(f"sustained ingest: {accepted / elapsed:.0f} snapshots/s accepted ({accepted} in {elapsed:.1f} s); "
          f"other statuses: { {k: v for k, v in totals.items() if k != 202} or 'none'}")
    print(f"exporter CPU: {cpu:.1f} s over the load, {cpu / max(accepted, 1) * 1e6:.0f} us per accepted snapshot")
    print(f"scrape latency idle:        {fmt_ms(idle)}")
    print(f"scrape latency under load:  {fmt_ms(loaded)}")
    if idle and loaded:
        print(f"p99 under load / idle: {percentile(loaded, 99) / percentile(idle, 99):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
