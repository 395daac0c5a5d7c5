"""Fleet benchmark: N simulated nodes x 8 GPUs through the deploy/fleet/ stack, measured.

benchmarks/fleet_sim.py serves N nodes' exporter bodies (production collectors and renderer) from one
process; S Prometheus agents scrape them sharded by hashmod and remote-write to VictoriaMetrics; vmalert
evaluates the shipped rules (fast profile: 1 s evaluation, short `for:`) plus the fleet roll-ups; a
two-member Alertmanager cluster notifies a webhook. Prints, from one run: series per GPU, samples/s
ingested, RSS and CPU of the store, the agents, vmalert and the simulator, rule evaluation time per
round, and fault-to-notification time for an XID on one node (median and max of several).

    python -m benchmarks.fleet_bench                  # 64 nodes x 8 GPUs = 512 GPUs, 2 agents
    python -m benchmarks.fleet_bench --nodes 8 --window 30 --xids 3   # a quick look

docs/scaling.md extrapolates from these figures; rerun this after changing what the exporter serves.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.alert_stack import labels_match
from harness.fleet_stack import FleetStack, fleet_stack
from harness.process import REPO_ROOT, Child, parse_metrics, post_event, rss_bytes

GPUS_PER_NODE = 8
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    from harness.support import http_get

    status, body = http_get(url + "/metrics", timeout=10)
    if status != 200:
        raise RuntimeError(f"{url}/metrics answered {status}")
    return parse_metrics(body)


def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    return sum(v for lbl, v in samples.get(name, []) if all(lbl.get(k) == w for k, w in labels.items()))


def vmalert_rounds(samples: dict[str, list[tuple[dict[str, str], float]]]) -> dict[str, tuple[float, float]]:
    """Per rule group: (sum of evaluation seconds, number of evaluations) so far."""
    out: dict[str, tuple[float, float]] = {}
    for lbl, v in samples.get("vmalert_iteration_duration_seconds_sum", []):
        out[lbl["group"]] = (v, out.get(lbl["group"], (0.0, 0.0))[1])
    for lbl, v in samples.get("vmalert_iteration_duration_seconds_count", []):
        out[lbl["group"]] = (out.get(lbl["group"], (0.0, 0.0))[0], v)
    return out


def top_queries(vm_url: str, window: float, n: int = 8) -> list[tuple[float, float, str]]:
    """The store's costliest queries (sum of seconds, count, query) of the last ``window`` seconds:
    which rule of a slow group costs what (vmalert only times whole groups)."""
    from harness.support import http_get

    status, text = http_get(f"{vm_url}/api/v1/status/top_queries?topN={n}&maxLifetime={int(window)}s", timeout=30)
    if status != 200:
        raise RuntimeError(f"{vm_url}/api/v1/status/top_queries answered {status}")
    body = json.loads(text)
    return [(float(q["sumDurationSeconds"]), float(q["count"]), str(q["query"]))
            for q in body.get("topBySumDuration", [])]


def processes(stack: FleetStack, sim: Child) -> dict[str, int]:
    pids = {"victoria-metrics": stack.processes[0].pid, "vmalert": stack.processes[-1].pid, "fleet_sim": sim.pid}
    for i, (agent, _) in enumerate(stack.agents):
        pids[f"agent{i}"] = agent.pid
    for i, member in enumerate(stack.alertmanagers):
        pids[f"alertmanager{i}"] = member.proc.pid
    return pids


def measure(stack: FleetStack, sim: Child, window: float) -> dict[str, Any]:
    pids = processes(stack, sim)
    vm0, va0 = scrape(stack.vm_url), scrape(stack.vmalert_url)
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    t0 = time.monotonic()
    rss: dict[str, list[int]] = {name: [] for name in pids}
    while time.monotonic() - t0 < window:
        for name, pid in pids.items():
            rss[name].append(rss_bytes(pid))
        time.sleep(min(5.0, max(0.0, window - (time.monotonic() - t0))))
    elapsed = time.monotonic() - t0
    vm1, va1 = scrape(stack.vm_url), scrape(stack.vmalert_url)
    cpu1 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    for name, pid in pids.items():
        rss[name].append(rss_bytes(pid))
    rows = total(vm1, "vm_rows_inserted_total") - total(vm0, "vm_rows_inserted_total")
    before, after = vmalert_rounds(va0), vmalert_rounds(va1)
    per_group = {}
    for group, (s1, n1) in after.items():
        s0, n0 = before.get(group, (0.0, 0.0))
        if n1 > n0:
            per_group[group] = (s1 - s0) / (n1 - n0)
    return {
        "elapsed": elapsed,
        "samples_per_second": rows / elapsed,
        "cpu_cores": {name: (cpu1[name] - cpu0[name]) / elapsed for name in pids},
        "rss_median": {name: statistics.median(v) for name, v in rss.items()},
        "rule_group_seconds": per_group,
        "top_queries": top_queries(stack.vm_url, elapsed),
    }


def xid_to_notification(stack: FleetStack, nodes: list[str], hosts: list[str], runs: int) -> list[float]:
    """Seconds from an XID 79 on one node's GPU to its page at the webhook, one node per run."""
    out = []
    order = random.Random(7).sample(range(len(nodes)), k=min(runs, len(nodes)))
    for i in order:
        time.sleep(random.uniform(0.0, 1.0))  # not always at the same phase of the 1 s evaluation
        gpu = random.randrange(GPUS_PER_NODE)
        t0 = time.monotonic()
        if post_event(f"http://{nodes[i]}", {"gpu": gpu, "xid": 79}) != 200:
            raise RuntimeError(f"the simulator refused the XID on {nodes[i]}")
        note, _ = stack.webhook.wait_for_alert(
            labels_match(alertname="GpuXidHardwareError", host=hosts[i], gpu=str(gpu)), timeout=120, since=t0)
        out.append(note.received_monotonic - t0)
    return out


def render(stack: FleetStack, out_dir: Path, since_monotonic: float, rate_interval: str) -> None:
    """PNG previews (scripts/render_dashboards) of the fleet dashboards over the whole run."""
    from dashboards.live import Window
    from dashboards.queries import load_dashboards
    # A script, not a package module (mypy checks it as a file): imported by name at run time.
    render_dashboard = importlib.import_module("scripts.render_dashboards").render_dashboard

    end = time.time()
    start = end - (time.monotonic() - since_monotonic)
    window = Window(start, end, max((end - start) / 200, 1.0), rate_interval)
    dashboards = load_dashboards()
    for name in ("fleet-rollup.json", "fleet.json"):
        print(f"rendered {render_dashboard(stack.vm_url, dashboards[name], window, out_dir, {})}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--nodes", type=int, default=64)
    p.add_argument("--agents", type=int, default=2, help="Prometheus agents (hashmod shards)")
    p.add_argument("--scrape-interval", type=int, default=5, help="seconds (production default: 15)")
    p.add_argument("--eval-interval", type=int, default=5,
                   help="vmalert evaluation, seconds (1 overloads 2 cores from 512 GPUs on; see docs/scaling.md)")
    p.add_argument("--window", type=float, default=60.0, help="seconds of steady state to measure")
    p.add_argument("--xids", type=int, default=5, help="XID faults to time (each on another node)")
    p.add_argument("--render", type=Path, default=None, metavar="DIR",
                   help="also render the Fleet roll-up and the per-GPU Fleet dashboards from the store to PNGs here")
    args = p.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    targets_file = log_dir / "sim-targets.json"
    sim = Child("fleet_sim", [sys.executable, "-m", "benchmarks.fleet_sim", "--nodes", str(args.nodes),
                              "--interval", str(args.scrape_interval), "--targets-file", str(targets_file)],
                log_dir, env={"PYTHONPATH": str(REPO_ROOT)})
    try:
        deadline = time.monotonic() + 120
        while not targets_file.exists():
            if not sim.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"fleet_sim did not start:\n{sim.log()}")
            time.sleep(0.2)
        nodes = json.loads(targets_file.read_text())[0]["targets"]
        hosts = [f"sim-node-{i:04d}" for i in range(len(nodes))]
        gpus = len(nodes) * GPUS_PER_NODE
        started = time.monotonic()
        with fleet_stack(log_dir, nodes, shards=args.agents, scrape_interval=f"{args.scrape_interval}s",
                         eval_interval=f"{args.eval_interval}s") as stack:
            ready = time.monotonic() - started
            # Steady state: every GPU in the roll-ups, so the recording rules have run on full data.
            deadline = time.monotonic() + 180
            while stack.value("fleet:gpus:count") != gpus:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fleet:gpus:count never reached {gpus}\n{stack.logs()}")
                time.sleep(1)
            time.sleep(2 * args.scrape_interval)
            # Cheap to ask at any size: what each scrape returned (one series per target), plus the
            # 5 series Prometheus adds per target (up, scrape_*); the store's own count of active series.
            exporter_series = (stack.value('sum(scrape_samples_scraped{job="gpu-exporter"})') or 0.0) + 5 * len(nodes)
            all_series = total(scrape(stack.vm_url), "vm_cache_entries", type="storage/hour_metric_ids")
            figures = measure(stack, sim, args.window)
            delays = xid_to_notification(stack, nodes, hosts, args.xids)
            if args.render:
                render(stack, args.render, started, f"{4 * args.scrape_interval}s")
    finally:
        sim.stop()

    print(f"fleet: {len(nodes)} nodes x {GPUS_PER_NODE} GPUs = {gpus} GPUs, {args.agents} agents, "
          f"scrape every {args.scrape_interval}s, rules every {args.eval_interval}s (fast-profile rules); "
          f"stack ready in {ready:.0f}s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"series: {exporter_series:.0f} from the exporters = {exporter_series / gpus:.1f} per GPU "
          f"({exporter_series / len(nodes):.0f} per node); {all_series:.0f} in the store with the agents', "
          "recording rules' and alert series")
    print(f"ingest: {figures['samples_per_second']:.0f} samples/s into VictoriaMetrics over {figures['elapsed']:.0f}s "
          f"(exporters alone: {exporter_series / args.scrape_interval:.0f}/s expected)")
    print("process                RSS median     CPU (cores)")
    for name in figures["rss_median"]:
        print(f"  {name:<20} {figures['rss_median'][name] / 2**20:8.1f} MiB   {figures['cpu_cores'][name]:6.3f}")
    groups = figures["rule_group_seconds"]
    cpu = figures["cpu_cores"]
    print(f"rule evaluation: {sum(groups.values()) * 1000:.1f} ms wall per round over {len(groups)} groups "
          f"(mean per group, summed; vmalert + store CPU {cpu['vmalert'] + cpu['victoria-metrics']:.2f} cores "
          "including ingestion); slowest:")
    for group, seconds in sorted(groups.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {group:<32} {seconds * 1000:7.2f} ms")
    print("costliest queries in the store over the window (sum of seconds, evaluations, query):")
    for seconds, count, query in figures["top_queries"]:
        print(f"  {seconds:7.2f} s {count:5.0f}x  {' '.join(query.split())[:140]}")
    if delays:
        print(f"XID 79 on one node -> page at the webhook: median {statistics.median(delays):.2f}s, "
              f"max {max(delays):.2f}s over {len(delays)} faults ({', '.join(f'{d:.2f}' for d in delays)})")
    print(f"logs: {log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
