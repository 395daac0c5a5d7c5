"""The fleet reference setup (deploy/fleet/), live on loopback: three exporters on simulated 8-GPU nodes,
two Prometheus agents sharding them by hashmod and remote-writing to VictoriaMetrics, vmalert running
the shipped fast-profile rules and the fleet roll-ups, a two-member Alertmanager cluster, a webhook.

Asserts, in this order (one stack): every exporter is scraped by exactly one agent (the one hashmod
names); the roll-ups read from the central store; an XID on one node pages once although both
Alertmanagers receive it, and still pages once with one Alertmanager killed; a training job whose two
DDP ranks report to exporters on different nodes is one job (ranks, hosts, progress, straggler, a hang
on one node seen at job level), and the Fleet roll-up dashboard draws from the store.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from dashboards.live import Window, empty_queries, label_values
from dashboards.queries import load_dashboards
from harness.alert_stack import Notification, labels_match
from harness.fleet_stack import FAST_PEER_TIMEOUT, FleetStack, fleet_stack, shard_of, wait_query
from harness.support import (
    WORKLOAD_ENV,
    ManagedProcess,
    free_port,
    http_post_json,
    start_exporter,
    wait_until,
)

pytestmark = pytest.mark.slow

NODES = ("node-a", "node-b", "node-c")
SHARDS = 2
FIRE_TIMEOUT = 60.0  # generous: the fast profile notifies in seconds, the CI machine is busy
JOB = "fleet-ddp"


def _ports_covering_every_shard(count: int) -> list[int]:
    """Free loopback ports whose addresses hash to every shard, so each agent has work to do."""
    while True:
        ports = [free_port() for _ in range(count)]
        if len(set(ports)) == count and {shard_of(f"127.0.0.1:{p}", SHARDS) for p in ports} == set(range(SHARDS)):
            return ports


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FleetStack, dict[str, str]]]:
    log_dir = tmp_path_factory.mktemp("fleet")
    exporters: list[ManagedProcess] = []
    urls: dict[str, str] = {}
    try:
        for node, port in zip(NODES, _ports_covering_every_shard(len(NODES)), strict=True):
            proc, url = start_exporter(
                log_dir, "--simulate", "healthy-8gpu", "--interval", "0.5", "--host-label", node,
                "--docker", "off", "--training-ttl", "5", port=port, name=f"exporter-{node}",
            )  # fmt: skip
            exporters.append(proc)
            urls[node] = url
        with fleet_stack(log_dir, [u.removeprefix("http://") for u in urls.values()], shards=SHARDS) as stack:
            yield stack, urls
    finally:
        for proc in exporters:
            proc.stop()


def test_each_exporter_is_scraped_by_exactly_the_agent_hashmod_names(fleet: tuple[FleetStack, dict[str, str]]) -> None:
    stack, urls = fleet
    addresses = {u.removeprefix("http://") for u in urls.values()}

    def discovered() -> list[set[str]] | None:
        targets = stack.agent_targets()
        return targets if set().union(*targets) == addresses else None

    per_agent = wait_until(discovered, timeout=30, message="agents discovered every exporter")
    assert sum(len(t) for t in per_agent) == len(addresses), per_agent  # none scraped twice
    for shard, targets in enumerate(per_agent):
        assert targets and all(shard_of(a, SHARDS) == shard for a in targets), (shard, per_agent)
    # One `up` series per exporter in the store, none carrying the agent's identity.
    up = stack.query('up{job="gpu-exporter"}')
    assert sorted(s["metric"]["instance"] for s in up) == sorted(addresses)
    assert all(set(s["metric"]) == {"__name__", "instance", "job"} for s in up), up


def test_fleet_rollups_read_from_the_store(fleet: tuple[FleetStack, dict[str, str]]) -> None:
    stack, _ = fleet
    wait_query(stack, "fleet:gpus:count", check=lambda r: float(r[0]["value"][1]) == 8 * len(NODES))
    up = wait_query(stack, "host_model:gpus_up:sum", check=lambda r: len(r) == len(NODES))
    assert {s["metric"]["host"]: float(s["value"][1]) for s in up} == {n: 8.0 for n in NODES}
    assert {s["metric"]["model"] for s in up} == {"NVIDIA H100 80GB HBM3"}
    # Zeros, not gaps (each rule's results reach the store in their own write: wait for them too).
    wait_query(stack, "host_model:gpus_down:sum", check=lambda r: len(r) == len(NODES))
    assert sorted(float(s["value"][1]) for s in stack.query("host_model:gpus_down:sum")) == [0.0] * len(NODES)
    assert float(wait_query(stack, "fleet:gpu_exporters_down:count")[0]["value"][1]) == 0.0


def _pages(stack: FleetStack, host: str, since: float) -> list[Notification]:
    """Firing notifications to the page receiver carrying the XID alert of ``host``."""
    match = labels_match(alertname="GpuXidHardwareError", host=host)
    return [n for n in stack.webhook.notifications()
            if n.received_monotonic >= since and n.path == "/page" and n.status == "firing"
            and any(match(a) for a in n.alerts("firing"))]


def _xid(url: str, gpu: int, xid: int) -> float:
    t = time.monotonic()
    status, body = http_post_json(url + "/-/simulate/events", {"gpu": gpu, "xid": xid})
    assert status == 200, body
    return t


def _assert_paged_once(stack: FleetStack, host: str, since: float) -> None:
    stack.webhook.wait_for_alert(labels_match(alertname="GpuXidHardwareError", host=host),
                                 timeout=FIRE_TIMEOUT, since=since)
    # A duplicate would come from the other member after its peer timeout (plus a group interval):
    # watch for longer than that, then count. Absence cannot be waited on as a condition.
    quiet_until = time.monotonic() + 2 * float(FAST_PEER_TIMEOUT.rstrip("s")) + 3
    while time.monotonic() < quiet_until:
        assert len(_pages(stack, host, since)) <= 1, _pages(stack, host, since)
        time.sleep(0.25)
    assert len(_pages(stack, host, since)) == 1


def test_xid_on_one_node_pages_once_also_with_an_alertmanager_killed(fleet: tuple[FleetStack, dict[str, str]]) -> None:
    stack, urls = fleet
    # Both members receive every alert from vmalert.
    t0 = _xid(urls["node-b"], 3, 48)
    _assert_paged_once(stack, "node-b", t0)
    _, alert = stack.webhook.wait_for_alert(labels_match(alertname="GpuXidHardwareError", host="node-b"), since=t0)
    assert alert["labels"]["gpu"] == "3" and alert["labels"]["xid"] == "48"
    # Kill member 0 (it notifies first while both are up); the survivor still pages, and once.
    first = stack.alertmanagers[0]
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    t1 = _xid(urls["node-c"], 5, 79)
    _assert_paged_once(stack, "node-c", t1)
    assert not _pages(stack, "node-a", t0)  # the healthy node never paged


def _rank(stack: FleetStack, rank: int, exporter_url: str, port: int, *faults: str) -> ManagedProcess:
    """One rank of a two-rank DDP job (torchrun-style environment, gloo), reporting to its node's
    exporter: the ranks of one job live on different (simulated) nodes."""
    argv = [
        sys.executable, "-m", "workload.train", "--device", "cpu", "--job", JOB,
        "--exporter-url", exporter_url, "--push-interval", "0.25", "--log-every", "0",
        "--steps", "0", "--duration", "400", "--batch-size", "4", "--image-size", "16", "--width", "8",
        "--step-delay", "0.05", *[f"--fault={f}" for f in faults],
    ]  # fmt: skip
    env = {**WORKLOAD_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
           "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    proc = ManagedProcess(f"rank{rank}", argv, stack.log_dir, env=env)
    stack.processes.append(proc)
    return proc


def test_a_job_across_two_nodes_is_one_job(fleet: tuple[FleetStack, dict[str, str]]) -> None:
    stack, urls = fleet
    port = free_port()
    # Rank 1 (node-b) is the straggler: 8x slower input pipeline; later it stalls for 30 s.
    ranks = [_rank(stack, 0, urls["node-a"], port),
             _rank(stack, 1, urls["node-b"], port, "slow-rank@1:8", "stall@60:30")]
    try:
        job = f'{{training_job="{JOB}"}}'
        hosts = wait_query(stack, f"training_job:training_hosts:count{job}", timeout=90,
                           check=lambda r: float(r[0]["value"][1]) == 2)
        assert len(hosts) == 1
        assert stack.value(f"training_job:training_ranks:count{job}") == 2
        placed = {s["metric"]["rank"]: s["metric"]["host"] for s in stack.query(f"training_info{job}")}
        assert placed == {"0": "node-a", "1": "node-b"}
        # Job-level progress is one series summed over both nodes.
        steps = wait_query(stack, f"training_job:training_steps:rate5m{job} > 0")
        assert len(steps) == 1
        # The straggler alert compares ranks across nodes and names the slow one, on its node; the
        # rank that only waits for it (node-a) is not named.
        stack.webhook.wait_for_alert(
            labels_match(alertname="GpuTrainingStraggler", training_job=JOB, rank="1", host="node-b"),
            timeout=FIRE_TIMEOUT)
        named = {(a["labels"]["rank"], a["labels"]["host"]) for n in stack.webhook.notifications()
                 for a in n.alerts("firing") if a["labels"].get("alertname") == "GpuTrainingStraggler"}
        assert named == {("1", "node-b")}, named
        # A hang on node-b stops the whole synchronous job: job-level progress age grows, and so does
        # each rank's on both nodes (over the last 5 minutes: the stall may be over by now).
        wait_query(stack, f"max_over_time(training_job:training_last_progress_age_seconds:max{job}[5m]) > 10",
                   timeout=120, message="the stall on node-b seen as the job's progress age")
        stalled = stack.query(f"max_over_time((time() - training_last_progress_timestamp_seconds{job})[5m:1s]) > 10")
        assert {s["metric"]["host"] for s in stalled} == {"node-a", "node-b"}, stalled
        # The Fleet roll-up dashboard, drawn from the store while the job runs and after the XIDs of
        # the test before: every query returns data.
        end = time.time()
        window = Window(start=end - 120, end=end, step=5, rate_interval="4s")
        assert label_values(stack.vm_url, "host_model:gpus:count", "model", window)
        problems = empty_queries(stack.vm_url, load_dashboards()["fleet-rollup.json"], window)
        assert problems == [], "\n".join(problems)
    finally:
        for proc in ranks:
            proc.stop(signal.SIGKILL)
