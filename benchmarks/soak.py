"""Soak run: the real exporter on a simulated fleet, a 2-rank training job pushing through the hook,
concurrent scrapers and process churn, for ``--duration`` seconds.

Prints the exporter's RSS and open file descriptors over time (and their trend after a warm-up),
whether any counter went backwards between scrapes, how many ERROR lines the exporter logged, and a
verdict. ``--json PATH`` writes the same as JSON (tests/stack/test_soak.py runs a bounded version and
asserts on it). Exit status 0 when every check passed, 1 otherwise.

    python -m benchmarks.soak --duration 1800          # half an hour
    python -m benchmarks.soak --duration 60 --json /tmp/soak.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness.process import (
    Child,
    counter_samples,
    open_fds,
    parse_metrics,
    percentile,
    post_event,
    rss_bytes,
    start_exporter,
)

ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback \(most recent call last\)")


@dataclass
class Result:
    duration_seconds: float
    warmup_seconds: float
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss bytes, open fds)
    scrapes: int = 0
    scrape_failures: int = 0
    scrape_p50_seconds: float = 0.0
    scrape_p99_seconds: float = 0.0
    counters_checked: int = 0
    counter_regressions: list[str] = field(default_factory=list)
    error_lines: list[str] = field(default_factory=list)
    events_applied: int = 0
    event_failures: int = 0
    ingest_accepted: float = 0.0
    training_ranks: list[str] = field(default_factory=list)
    training_steps: dict[str, float] = field(default_factory=dict)
    rss_growth_bytes: int = 0
    rss_slope_mib_per_minute: float = 0.0
    fd_growth: int = 0
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(self.checks.values())


class Scraper(threading.Thread):
    """Scrapes /metrics over one keep-alive connection until stopped; the checker also parses."""

    def __init__(self, base: str, stop: threading.Event, interval: float, check: bool, result: Result,
                 lock: threading.Lock) -> None:
        super().__init__(name="scraper", daemon=True)
        host, _, port = base.removeprefix("http://").partition(":")
        self.addr = (host, int(port))
        self.stop_event = stop
        self.interval = interval
        self.check = check
        self.result = result
        self.lock = lock
        self.latencies: list[float] = []
        self.last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.last_text = ""

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self.stop_event.is_set():
            started = time.perf_counter()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(*self.addr, timeout=10)
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                body = resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok, body = False, b""
                if conn is not None:
                    conn.close()
                conn = None
            elapsed = time.perf_counter() - started
            with self.lock:
                self.result.scrapes += 1
                self.result.scrape_failures += 0 if ok else 1
            if ok:
                self.latencies.append(elapsed)
                if self.check:
                    self._check(body.decode())
            self.stop_event.wait(self.interval)
        if conn is not None:
            conn.close()

    def _check(self, text: str) -> None:
        self.last_text = text
        now = counter_samples(text)
        for key, value in now.items():
            before = self.last.get(key)
            if before is not None and value < before and len(self.result.counter_regressions) < 20:
                labels = ",".join(f"{k}={v}" for k, v in key[1])
                self.result.counter_regressions.append(f"{key[0]}{{{labels}}}: {before} -> {value}")
        self.last.update(now)
        self.result.counters_checked = len(self.last)


def churn(base: str, stop: threading.Event, result: Result, period: float) -> None:
    """Processes come and go on GPU 0 and temperatures move: label sets churn all the time."""
    pid = 30_000
    while not stop.wait(period):
        events: list[dict[str, Any]] = [
            {"gpu": 0, "add_process": {"pid": pid + 1, "type": "compute", "used_memory_bytes": "1GiB"}},
            {"gpu": 0, "remove_process": pid},
            {"gpu": 1, "set": {"temperature_gpu_celsius": 60 + pid % 20}},
        ]
        pid += 1
        for ev in events:
            try:
                status = post_event(base, ev)
            except OSError:
                status = 0
            result.events_applied += status == 200
            result.event_failures += status != 200


def median(values: list[int]) -> float:
    return float(statistics.median(values)) if values else 0.0


def analyse(result: Result, rss_tolerance_mib: float, fd_tolerance: int, log_text: str, final: str) -> None:
    """Fill in trends and checks from the samples, the exporter log and the last scrape."""
    steady = [s for s in result.samples if s[0] >= result.warmup_seconds]
    third = max(1, len(steady) // 3)
    first, last = steady[:third], steady[-third:]
    if len(steady) >= 3:
        result.rss_growth_bytes = int(median([s[1] for s in last]) - median([s[1] for s in first]))
        result.fd_growth = int(median([s[2] for s in last]) - median([s[2] for s in first]))
        if len(steady) >= 2 and steady[-1][0] > steady[0][0]:
            ts = [s[0] for s in steady]
            rs = [s[1] / 2**20 for s in steady]
            result.rss_slope_mib_per_minute = statistics.linear_regression(ts, rs).slope * 60
    result.error_lines = [line for line in log_text.splitlines() if ERROR_LINE.search(line)][:20]
    samples = parse_metrics(final) if final else {}
    result.ingest_accepted = sum(v for lab, v in samples.get("gpu_exporter_ingest_requests_total", [])
                                 if lab.get("outcome") == "accepted")
    steps = {lab["rank"]: v for lab, v in samples.get("training_steps_total", [])}
    result.training_ranks = sorted(steps)
    result.training_steps = steps
    result.checks = {
        "enough_samples_after_warmup": len(steady) >= 3,
        "rss_flat": result.rss_growth_bytes <= rss_tolerance_mib * 2**20,
        "fds_flat": result.fd_growth <= fd_tolerance,
        "no_counter_went_backwards": not result.counter_regressions and result.counters_checked > 0,
        "no_error_logged": not result.error_lines,
        "scrapes_succeeded": result.scrapes > 0 and result.scrape_failures == 0,
        "training_reported": len(steps) >= 2 and all(v > 0 for v in steps.values()),
        "events_applied": result.event_failures == 0,
    }


def run(args: argparse.Namespace) -> Result:
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="gpu-exporter-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    result = Result(duration_seconds=args.duration, warmup_seconds=args.warmup)
    exporter, base = start_exporter(log_dir, "--simulate", "healthy-8gpu", "--interval", str(args.interval),
                                    "--host-label", "soak")
    print(f"exporter pid {exporter.pid} on {base}; logs in {log_dir}", flush=True)
    trainer = Child("train", [
        sys.executable, "-m", "workload.train", "--ddp", str(args.ranks), "--steps", "0", "--job", "soak",
        "--exporter-url", base, "--push-interval", str(args.push_interval), "--batch-size", "4",
        "--image-size", "16", "--width", "8", "--step-delay", str(args.step_delay), "--log-every", "0",
        "--device", "cpu",
    ], log_dir, env={"OMP_NUM_THREADS": "1"})
    stop = threading.Event()
    lock = threading.Lock()
    scrapers = [Scraper(base, stop, args.scrape_interval, i == 0, result, lock) for i in range(args.scrapers)]
    churner = threading.Thread(target=churn, args=(base, stop, result, args.churn_period), daemon=True)
    started = time.monotonic()
    try:
        for scraper in scrapers:
            scraper.start()
        churner.start()
        print(f"{'t (s)':>7} {'RSS (MiB)':>10} {'FDs':>5} {'scrapes':>8}", flush=True)
        next_sample = started
        while (now := time.monotonic()) - started < args.duration:
            if not exporter.alive():
                raise RuntimeError(f"the exporter died:\n{exporter.log()[-3000:]}")
            if now >= next_sample:
                t = now - started
                sample = (round(t, 1), rss_bytes(exporter.pid), open_fds(exporter.pid))
                result.samples.append(sample)
                print(f"{t:7.1f} {sample[1] / 2**20:10.1f} {sample[2]:5d} {result.scrapes:8d}", flush=True)
                next_sample += args.sample_every
            time.sleep(min(0.5, max(0.0, next_sample - time.monotonic())))
    finally:
        stop.set()
        for scraper in scrapers:
            scraper.join(15)
        churner.join(15)
        trainer.stop(signal.SIGTERM, timeout=20)
    final = scrapers[0].last_text
    exporter_rc = exporter.stop(signal.SIGTERM, timeout=15)
    latencies = [x for s in scrapers for x in s.latencies]
    if latencies:
        result.scrape_p50_seconds = percentile(latencies, 50)
        result.scrape_p99_seconds = percentile(latencies, 99)
    analyse(result, args.rss_tolerance_mib, args.fd_tolerance, exporter.log(), final)
    result.checks["exporter_exited_cleanly"] = exporter_rc == 0
    return result


def report(result: Result) -> None:
    print()
    print(f"scrapes: {result.scrapes} ({result.scrape_failures} failed), "
          f"p50 {result.scrape_p50_seconds * 1000:.2f} ms, p99 {result.scrape_p99_seconds * 1000:.2f} ms")
    print(f"RSS after warm-up ({result.warmup_seconds:.0f} s): growth {result.rss_growth_bytes / 2**20:+.2f} MiB "
          f"(median of last third - first third), slope {result.rss_slope_mib_per_minute:+.3f} MiB/min")
    print(f"open FDs after warm-up: growth {result.fd_growth:+d}")
    print(f"counters checked: {result.counters_checked}, went backwards: {len(result.counter_regressions)}")
    for line in result.counter_regressions[:5]:
        print(f"  {line}")
    print(f"simulated events applied: {result.events_applied} ({result.event_failures} failed)")
    print(f"ingest accepted: {result.ingest_accepted:.0f}; training ranks: {result.training_ranks} "
          f"steps {result.training_steps}")
    print(f"ERROR lines in the exporter log: {len(result.error_lines)}")
    for line in result.error_lines[:5]:
        print(f"  {line}")
    for name, ok in result.checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    print("verdict:", "PASS" if result.ok else "FAIL")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds to run (default 600)")
    p.add_argument("--warmup", type=float, default=None, help="seconds ignored by the trend checks (default: a third, at most 120)")
    p.add_argument("--scrapers", type=int, default=4, help="concurrent scrapers (default 4)")
    p.add_argument("--scrape-interval", type=float, default=0.2, help="seconds between one scraper's scrapes")
    p.add_argument("--interval", type=float, default=0.5, help="exporter poll interval")
    p.add_argument("--ranks", type=int, default=2, help="training ranks (torch.distributed, gloo)")
    p.add_argument("--push-interval", type=float, default=0.5, help="hook push period")
    p.add_argument("--step-delay", type=float, default=0.05, help="training step delay (keeps CPU use low)")
    p.add_argument("--churn-period", type=float, default=1.0, help="seconds between simulated process churn")
    p.add_argument("--sample-every", type=float, default=2.0, help="seconds between RSS/FD samples")
    p.add_argument("--rss-tolerance-mib", type=float, default=8.0, help="allowed RSS growth after warm-up")
    p.add_argument("--fd-tolerance", type=int, default=4, help="allowed open-FD growth after warm-up")
    p.add_argument("--log-dir", default=None, help="where the processes' logs go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the result as JSON to this path")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = min(120.0, args.duration / 3)
    result = run(args)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps({**asdict(result), "ok": result.ok}, indent=1))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
