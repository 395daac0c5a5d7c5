"""/metrics at the most training data the ingest limits let clients push: render time and memory.

Starts the real exporter (simulated 8-GPU fleet, default limits unless ``--exporter-arg`` says
otherwise), then plays a hostile-but-valid client: new training processes, each with the largest push
the schema allows (every counter and gauge, 128-character labels, 32 services in every per-service
section), until the exporter refuses new ones (series budget, process or job limit) or ``--processes``
is reached. Then, ``--renders`` times per format, one tracked process pushes an update (so the training
families must be rendered again) and /metrics is scraped: the scrape time is what Prometheus sees for
a fresh render. Prints figures; asserts nothing.

    python -m benchmarks.series_budget                      # defaults: until the exporter refuses
    python -m benchmarks.series_budget --processes 1024 --renders 5   # cap the push phase (old builds)

Goal (issue 13): at the maximum the defaults allow, scrape p99 <= 1 s and RSS <= 256 MB.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
from pathlib import Path

from exporter.hook.schema import INGEST_PATH
from harness.payloads import largest_push
from harness.process import parse_metrics, percentile, rss_bytes, start_exporter, vm_hwm_bytes

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
PUSHES_PER_SOURCE = 80  # below the default per-address burst (2 x 50): no rate-limit waits


def post(port: int, body: bytes, source: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120, source_address=(source, 0))
    try:
        conn.request("POST", INGEST_PATH, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
        reason = json.loads(text).get("reason", "") if resp.status != 202 and text.startswith("{") else ""
        return resp.status, reason
    finally:
        conn.close()


def scrape(port: int, accept: str | None) -> tuple[float, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        t0 = time.perf_counter()
        conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        resp = conn.getresponse()
        body = resp.read()
        took = time.perf_counter() - t0
        if resp.status != 200:
            raise RuntimeError(f"/metrics answered {resp.status}")
        return took, body
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=4096, help="stop pushing new processes after this many")
    p.add_argument("--renders", type=int, default=20, help="fresh renders measured per format")
    p.add_argument("--exporter-arg", action="append", default=[], help="extra exporter flag (repeatable)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start_exporter(Path(tmp), "--simulate", "healthy-8gpu", *args.exporter_arg)
        port = int(base.rsplit(":", 1)[1])
        try:
            rss_start = rss_bytes(proc.pid)
            accepted: list[int] = []
            refused: dict[str, int] = {}
            t0 = time.monotonic()
            refusals_in_row = 0
            for i in range(args.processes):
                pid = 10_000 + i
                source = f"127.0.{1 + i // PUSHES_PER_SOURCE // 250}.{2 + i // PUSHES_PER_SOURCE % 250}"
                body = json.dumps(largest_push(pid, 1, job=f"j{i % 64}")).encode()
                status, reason = post(port, body, source)
                if status == 202:
                    accepted.append(pid)
                    refusals_in_row = 0
                else:
                    refused[f"{status} {reason}"] = refused.get(f"{status} {reason}", 0) + 1
                    refusals_in_row += 1
                    if refusals_in_row >= 10:
                        break
            push_seconds = time.monotonic() - t0
            print(f"push phase: {len(accepted)} processes accepted, refused {refused or 'none'} "
                  f"({push_seconds:.1f} s)")
            if not accepted:
                print("nothing accepted; no render to measure")
                return 0
            seq = 1
            results: dict[str, list[float]] = {"text 0.0.4": [], "openmetrics 1.0.0": []}
            sizes: dict[str, int] = {}
            samples = 0
            for r in range(args.renders):
                for name, accept in (("text 0.0.4", None), ("openmetrics 1.0.0", OPENMETRICS)):
                    seq += 1
                    pid = accepted[(r * 2 + seq) % len(accepted)]
                    i = pid - 10_000
                    status, reason = post(port, json.dumps(largest_push(pid, seq, job=f"j{i % 64}")).encode(), "127.0.0.1")
                    if status != 202:
                        time.sleep(1.0)  # rate limited: the next round pushes again
                    took, body = scrape(port, accept)
                    results[name].append(took)
                    sizes[name] = len(body)
                    if name == "text 0.0.4" and not samples:
                        m = parse_metrics(body.decode())
                        samples = sum(len(v) for k, v in m.items() if k.startswith("training_"))
                        own = m.get("gpu_exporter_training_series")
                        if own:
                            print(f"gpu_exporter_training_series: {own[0][1]:.0f}")
            print(f"training samples on /metrics: {samples}")
            for name, values in results.items():
                print(f"fresh render + scrape, {name}: p50 {percentile(values, 50):.3f} s, "
                      f"p99 {percentile(values, 99):.3f} s, max {max(values):.3f} s (n={len(values)}), "
                      f"body {sizes[name] / 2**20:.1f} MiB")
            print(f"exporter RSS: start {rss_start / 2**20:.0f} MiB, now {rss_bytes(proc.pid) / 2**20:.0f} MiB, "
                  f"peak (VmHWM) {vm_hwm_bytes(proc.pid) / 2**20:.0f} MiB")
        finally:
            proc.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
