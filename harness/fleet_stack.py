"""The fleet reference setup of deploy/fleet/, started on loopback for tests and benchmarks/fleet_bench.py:
N Prometheus agents (hashmod shards) → VictoriaMetrics ← vmalert (shipped rules + fleet roll-ups) →
a two-member Alertmanager cluster (gossip) → a webhook receiver standing in for on-call.

Why shared: the fleet test and the fleet benchmark must run the shipped files (deploy/fleet/agent.yml,
*.args, alerts/*.rules.yml, alerts/alertmanager*.yml) with only addresses filled in and the fast
profile's timings applied, so what they check and measure is what the README tells users to deploy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.alert_stack import WebhookReceiver, alertmanager_config, labels_match
from harness.support import REPO_ROOT, ManagedProcess, free_port, http_get, require_binary, wait_until

FLEET_DIR = REPO_ROOT / "deploy" / "fleet"
ALERTS_DIR = REPO_ROOT / "alerts"

# Fast profile: what the tests and the benchmark change from the shipped (production) values, and
# nothing else. Flags given twice: the last one wins (Go's flag package, kingpin for Alertmanager).
FAST_SCRAPE = "1s"
FAST_VM_ARGS = ("-search.latencyOffset=1s", "-search.disableCache")
FAST_EVAL = "1s"
FAST_VMALERT_ARGS = ("-remoteWrite.flushInterval=1s",)
# Member 1 waits this long for member 0's notification to be gossiped before sending its own.
FAST_PEER_TIMEOUT = "3s"
FAST_AM_ARGS = (f"--cluster.peer-timeout={FAST_PEER_TIMEOUT}", "--cluster.gossip-interval=100ms",
                "--cluster.pushpull-interval=5s")


def read_args(name: str, values: Mapping[str, str]) -> list[str]:
    """The flags in deploy/fleet/``name`` (one per line, ``#`` comments), placeholders filled in."""
    out = []
    for raw in (FLEET_DIR / name).read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for key, value in values.items():
            line = line.replace(f"__{key}__", value)
        if re.search(r"__[A-Z0-9_]+__", line):
            raise AssertionError(f"{name}: unfilled placeholder in {line!r}")
        out.append(line)
    return out


def with_overrides(args: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """``args`` with each flag named in ``overrides`` replaced by the override (Alertmanager's flag
    parser refuses a repeated flag, so an override cannot simply be appended)."""
    names = {o.split("=", 1)[0] for o in overrides}
    return [a for a in args if a.split("=", 1)[0] not in names] + list(overrides)


def agent_config(shard: int, shards: int, targets_file: Path, remote_write: str, own: str,
                 fast: bool = True, scrape_interval: str = FAST_SCRAPE) -> str:
    """deploy/fleet/agent.yml for one shard; the fast profile scrapes every ``scrape_interval`` and
    flushes every second."""
    text = (FLEET_DIR / "agent.yml").read_text()
    for key, value in {"SHARDS": str(shards), "SHARD": str(shard), "TARGETS_FILE": str(targets_file),
                       "REMOTE_WRITE": remote_write, "AGENT_ADDRESS": own}.items():
        text = text.replace(f"__{key}__", value)
    config = yaml.safe_load(text)
    if fast:
        config["global"].update(scrape_interval=scrape_interval, scrape_timeout=scrape_interval)
        for rw in config["remote_write"]:
            rw["queue_config"]["batch_send_deadline"] = "1s"
    return yaml.safe_dump(config, sort_keys=False)


def shard_of(address: str, shards: int) -> int:
    """The agent that scrapes ``address``: Prometheus's hashmod (last 8 bytes of the MD5, big-endian,
    modulo the shard count), so tests can place exporters on chosen shards."""
    return int.from_bytes(hashlib.md5(address.encode(), usedforsecurity=False).digest()[8:], "big") % shards


def write_targets(path: Path, targets: Sequence[str]) -> None:
    """A file_sd file listing every exporter (``host:port``); agents pick it up on change."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"targets": list(targets), "labels": {}}]))
    tmp.replace(path)


def _ready(proc: ManagedProcess, url: str, what: str, timeout: float = 60) -> None:
    def ok() -> bool:
        if not proc.alive():
            raise AssertionError(f"{what} exited early:\n{proc.log()[-3000:]}")
        return http_get(url, timeout=2)[0] == 200

    wait_until(ok, timeout=timeout, interval=0.2, message=f"{what} ready")


@dataclass
class AlertmanagerMember:
    proc: ManagedProcess
    url: str
    cluster: str


@dataclass
class FleetStack:
    """A running fleet stack; ``processes`` are stopped (reverse order) when the context exits."""

    log_dir: Path
    targets_file: Path
    vm_url: str
    vmalert_url: str
    agents: list[tuple[ManagedProcess, str]]
    alertmanagers: list[AlertmanagerMember]
    webhook: WebhookReceiver
    processes: list[ManagedProcess] = field(default_factory=list)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query on the central store (Prometheus query API)."""
        from dashboards.live import prom_api

        return list(prom_api(self.vm_url, "query", {"query": promql}, timeout=30)["result"])

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def agent_targets(self) -> list[set[str]]:
        """Per agent, the exporter addresses it scrapes (after hashmod), from its targets API."""
        out = []
        for _, url in self.agents:
            status, body = http_get(url + "/api/v1/targets?state=active", timeout=5)
            assert status == 200, body
            active = json.loads(body)["data"]["activeTargets"]
            out.append({t["labels"]["instance"] for t in active if t["labels"].get("job") == "gpu-exporter"})
        return out

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} (last 2000 chars)\n{p.log()[-2000:]}" for p in self.processes)


def start_victoria_metrics(log_dir: Path, fast: bool = True) -> tuple[ManagedProcess, str]:
    port = free_port()
    data = log_dir / "vm-data"
    data.mkdir(exist_ok=True)
    args = read_args("victoria-metrics.args", {"DATA_DIR": str(data), "LISTEN": f"127.0.0.1:{port}"})
    proc = ManagedProcess("victoria-metrics", [require_binary("victoria-metrics"),
                                               *with_overrides(args, FAST_VM_ARGS if fast else ())], log_dir)
    url = f"http://127.0.0.1:{port}"
    _ready(proc, url + "/health", "victoria-metrics")
    return proc, url


def start_alertmanager_cluster(log_dir: Path, webhook_url: str, members: int = 2,
                               fast: bool = True) -> list[AlertmanagerMember]:
    """``members`` Alertmanagers on loopback, each peering with all the others; returned once every
    member sees the whole cluster (alertmanager_cluster_members), so gossip is known to work."""
    binary = shutil.which("prometheus-alertmanager") or require_binary("alertmanager")
    config = log_dir / "alertmanager.yml"
    config.write_text(alertmanager_config(webhook_url, "fast" if fast else "production"))
    ports = [(free_port(), free_port()) for _ in range(members)]
    out: list[AlertmanagerMember] = []
    try:
        for i, (web, gossip) in enumerate(ports):
            data = log_dir / f"am{i}-data"
            data.mkdir(exist_ok=True)
            peers = [f"127.0.0.1:{g}" for j, (_, g) in enumerate(ports) if j != i]
            args = read_args("alertmanager-cluster.args", {
                "CONFIG": str(config), "DATA_DIR": str(data), "LISTEN": f"127.0.0.1:{web}",
                "CLUSTER_LISTEN": f"127.0.0.1:{gossip}", "PEER": peers[0],
            })
            args += [f"--cluster.peer={p}" for p in peers[1:]]
            proc = ManagedProcess(f"alertmanager{i}", [binary, *with_overrides(args, FAST_AM_ARGS if fast else ())], log_dir)
            out.append(AlertmanagerMember(proc, f"http://127.0.0.1:{web}", f"127.0.0.1:{gossip}"))
        for member in out:
            _ready(member.proc, member.url + "/-/ready", member.proc.name)

        def clustered() -> bool:
            return all(cluster_size(m.url) == members for m in out)

        wait_until(clustered, timeout=60, interval=0.2, message=f"{members} Alertmanagers gossiping")
    except BaseException:
        for member in out:
            member.proc.stop()
        raise
    return out


def cluster_size(am_url: str) -> int:
    status, body = http_get(am_url + "/api/v2/status", timeout=2)
    if status != 200:
        return 0
    return sum(1 for p in json.loads(body)["cluster"].get("peers") or [] if p.get("address"))


def start_agent(log_dir: Path, shard: int, shards: int, targets_file: Path, vm_url: str,
                fast: bool = True, scrape_interval: str = FAST_SCRAPE) -> tuple[ManagedProcess, str]:
    port = free_port()
    data = log_dir / f"agent{shard}-data"
    data.mkdir(exist_ok=True)
    cfg = log_dir / f"agent{shard}.yml"
    cfg.write_text(agent_config(shard, shards, targets_file, vm_url + "/api/v1/write", f"127.0.0.1:{port}", fast,
                                scrape_interval))
    proc = ManagedProcess(f"agent{shard}", [
        require_binary("prometheus"), "--enable-feature=agent", f"--config.file={cfg}",
        f"--storage.agent.path={data}", f"--web.listen-address=127.0.0.1:{port}",
    ], log_dir)
    url = f"http://127.0.0.1:{port}"
    _ready(proc, url + "/-/ready", f"agent {shard}")
    return proc, url


def start_vmalert(log_dir: Path, vm_url: str, alertmanagers: Sequence[str], fast: bool = True,
                  eval_interval: str = FAST_EVAL) -> tuple[ManagedProcess, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    alerts = ALERTS_DIR / "fast" if fast else ALERTS_DIR
    args = read_args("vmalert.args", {
        "LISTEN": f"127.0.0.1:{port}", "VM_URL": vm_url, "ALERTS_DIR": str(alerts), "EXTERNAL_URL": url,
        "ALERTMANAGER_1": alertmanagers[0], "ALERTMANAGER_2": alertmanagers[-1],
    })
    # The fleet roll-ups have one profile and live next to the production rules.
    args = [a.replace(f"{alerts}/fleet.rules.yml", str(ALERTS_DIR / "fleet.rules.yml")) for a in args]
    args += [f"-notifier.url={u}" for u in alertmanagers[1:-1]]
    overrides = (f"-evaluationInterval={eval_interval}", *FAST_VMALERT_ARGS) if fast else ()
    proc = ManagedProcess("vmalert", [require_binary("vmalert"), *with_overrides(args, overrides)], log_dir)
    _ready(proc, url + "/health", "vmalert")
    return proc, url


@contextlib.contextmanager
def fleet_stack(log_dir: Path, targets: Sequence[str], shards: int = 2, fast: bool = True,
                wait_watchdog: bool = True, scrape_interval: str = FAST_SCRAPE,
                eval_interval: str = FAST_EVAL) -> Iterator[FleetStack]:
    """Start the whole fleet chain for the exporters at ``targets`` (``host:port``); stop it on exit.

    Returns once the always-firing GpuWatchdog reached the webhook through every hop (unless
    ``wait_watchdog`` is false)."""
    webhook = WebhookReceiver().start()
    started: list[ManagedProcess] = []
    try:
        vm, vm_url = start_victoria_metrics(log_dir, fast)
        started.append(vm)
        members = start_alertmanager_cluster(log_dir, webhook.url, fast=fast)
        started.extend(m.proc for m in members)
        targets_file = log_dir / "targets.json"
        write_targets(targets_file, targets)
        agents = []
        for shard in range(shards):
            agent = start_agent(log_dir, shard, shards, targets_file, vm_url, fast, scrape_interval)
            started.append(agent[0])
            agents.append(agent)
        vmalert, vmalert_url = start_vmalert(log_dir, vm_url, [m.url for m in members], fast, eval_interval)
        started.append(vmalert)
        stack = FleetStack(log_dir, targets_file, vm_url, vmalert_url, agents, members, webhook, started)
        try:
            # Every exporter scraped by some agent, and its samples queryable in the central store.
            want = float(len(targets))
            wait_until(lambda: stack.value('count(up{job="gpu-exporter"} == 1)') == want, timeout=120,
                       interval=0.5, message=f"{len(targets)} exporters up in the central store")
            if wait_watchdog:
                webhook.wait_for_alert(labels_match(alertname="GpuWatchdog"), timeout=90)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{stack.logs()}") from None
        yield stack
    finally:
        for proc in reversed(started):
            proc.stop()
        webhook.stop()


def scrape_text(url: str) -> str:
    status, body = http_get(url + "/metrics", timeout=10)
    assert status == 200, body
    return body


def wait_query(stack: FleetStack, promql: str, timeout: float = 60.0,
               check: Any = None, message: str | None = None) -> list[dict[str, Any]]:
    """Poll an instant query on the central store until it returns series (and ``check(result)``)."""

    def ready() -> list[dict[str, Any]] | None:
        result = stack.query(promql)
        if result and (check is None or check(result)):
            return result
        return None

    return wait_until(ready, timeout=timeout, interval=0.5, message=message or f"{promql!r} on the store")

