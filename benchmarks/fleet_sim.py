"""Many simulated GPU nodes in one process, each on its own loopback port, each serving the /metrics body
the real exporter would serve for that node: for fleet benchmarks where one exporter process per node
would not fit on the machine (64 nodes x ~60 MB of Python each, on 2 cores).

How the bodies stay exporter-identical: the production NVML reader reads each scenario through the NVML
simulator once (exporter.simulate, beneath nvidia-ml-py); each node then owns a copy of that snapshot
with its own host label and GPU UUIDs, moves its utilization, temperature, power and energy a little
every poll, and is served through the production pieces: a Poller (so poll counters and snapshot age
are real), the GPU, training and self-metrics collectors, and the Exposition renderer with its cache.
What is not the exporter: the HTTP server (a small asyncio one instead of uvicorn/FastAPI: a scrape
costs the same bytes, not the same CPU) and the fault path: ``POST /-/simulate/events`` with
``{"gpu": 3, "xid": 79}`` records the XID in the node's snapshot directly (the real exporter receives
it through NVML's event API). Other simulator events are refused with 400.

``python -m benchmarks.fleet_sim --nodes 64 --targets-file /tmp/targets.json`` writes a Prometheus
file_sd file listing every node's address once all listen, and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from exporter.collectors.exporter_health import ExporterHealthCollector
from exporter.collectors.gpu import GpuCollector
from exporter.collectors.training import TrainingCollector
from exporter.exposition import CONTENT_TYPES, TEXT, Exposition, Source
from exporter.ingest.store import IngestStore
from exporter.poller import Poller
from exporter.snapshot import GpuSample, NodeSnapshot, XidCount

log = logging.getLogger("fleet_sim")
MAX_REQUEST_HEAD = 16384


def read_scenario(name: str) -> NodeSnapshot:
    """One snapshot of ``name`` read by the production NVML reader on the simulator."""
    from exporter.nvml import NvmlReader
    from exporter.simulate import install, load_scenario

    sim = install(load_scenario(name))
    try:
        reader = NvmlReader("template")
        try:
            return reader.read()
        finally:
            reader.close()
    finally:
        sim.uninstall()


class SimulatedNode:
    """One node: its snapshot (the poller's reader), poller and exposition."""

    def __init__(self, host: str, template: NodeSnapshot, idle: bool, seed: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self._rng = random.Random(seed)
        self._clock = clock
        self._last = clock()
        self._lock = threading.Lock()
        suffix = f"{seed:012x}"[-12:]
        self._gpus = [
            dataclasses.replace(g, uuid=g.uuid[:-12] + suffix[:-2] + f"{g.index:02x}",
                                utilization_gpu_ratio=0.0 if idle else g.utilization_gpu_ratio)
            for g in template.gpus
        ]
        self._template = dataclasses.replace(template, host=host, gpus=())
        self.poller = Poller(self, interval_seconds=1.0, clock=clock)
        store = IngestStore()
        self.exposition = Exposition([
            Source("gpu", GpuCollector(lambda: self.poller.latest), generation=lambda: self.poller.generation),
            Source("training", TrainingCollector(store, host), generation=lambda: store.generation),
        ])
        health = ExporterHealthCollector(self.poller, host, "simulated", sources=lambda: self.exposition.sources)
        self.exposition.add(Source("exporter", health))

    def read(self) -> NodeSnapshot:
        """The Reader protocol: the next snapshot, each gauge moved a little (realistic for storage:
        constant series compress unrealistically well), energy integrated over the elapsed time."""
        now = self._clock()
        with self._lock:
            dt, self._last = now - self._last, now
            self._gpus = [self._step(g, dt) for g in self._gpus]
            gpus = tuple(self._gpus)
        return dataclasses.replace(self._template, timestamp_seconds=now, gpus=gpus)

    def _step(self, g: GpuSample, dt: float) -> GpuSample:
        def jitter(value: float | None, spread: float, low: float, high: float) -> float | None:
            return None if value is None else min(high, max(low, value + self._rng.uniform(-spread, spread)))

        power = jitter(g.power_usage_watts, 5.0, 50.0, g.power_limit_watts or 1000.0)
        busy = g.utilization_gpu_ratio is not None and g.utilization_gpu_ratio > 0.05
        energy = g.energy_consumed_joules
        return dataclasses.replace(
            g,
            utilization_gpu_ratio=jitter(g.utilization_gpu_ratio, 0.03, 0.06, 1.0) if busy else g.utilization_gpu_ratio,
            temperature_gpu_celsius=jitter(g.temperature_gpu_celsius, 0.5, 25.0, 95.0),
            power_usage_watts=power,
            energy_consumed_joules=None if energy is None else energy + (power or 0.0) * dt,
        )

    def xid(self, gpu: int, code: int) -> None:
        """Record an XID on slot ``gpu`` (as the exporter's XID listener would) and publish it now."""
        now = self._clock()
        with self._lock:
            g = self._gpus[gpu]
            seen = g.xid_errors.get(code)
            count = XidCount(count=(seen.count if seen else 0) + 1, last_seen_timestamp_seconds=now)
            self._gpus[gpu] = dataclasses.replace(g, xid_errors={**g.xid_errors, code: count})
        self.poll()

    def poll(self) -> None:
        self.poller.poll_once()
        self.exposition.warm()


class Fleet:
    """Every node, their pollers (one thread for all) and their HTTP servers (one event loop)."""

    def __init__(self, nodes: int, scenarios: list[str], idle_every: int, interval: float, seed: int) -> None:
        templates = {name: read_scenario(name) for name in dict.fromkeys(scenarios)}
        self.nodes = [
            SimulatedNode(f"sim-node-{i:04d}", templates[scenarios[i % len(scenarios)]],
                          idle=idle_every > 0 and i % idle_every == idle_every - 1, seed=seed * 100003 + i)
            for i in range(nodes)
        ]
        self.interval = interval
        self._stop = threading.Event()

    def poll_forever(self) -> None:
        """Poll every node once per interval, spread over the interval like independent exporters."""
        while not self._stop.is_set():
            started = time.monotonic()
            for i, node in enumerate(self.nodes):
                node.poll()
                due = started + self.interval * (i + 1) / len(self.nodes)
                if self._stop.wait(max(0.0, due - time.monotonic())):
                    return

    def stop(self) -> None:
        self._stop.set()

    async def handle(self, node: SimulatedNode, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, asyncio.CancelledError):
                    return
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = [*request_line.split(" "), "", ""][:3]
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
                body = b""
                length = int(headers.get("content-length") or 0)
                if 0 < length <= MAX_REQUEST_HEAD:
                    body = await reader.readexactly(length)
                status, ctype, payload = self._answer(node, method, path, body)
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        finally:
            writer.close()

    def _answer(self, node: SimulatedNode, method: str, path: str, body: bytes) -> tuple[str, str, bytes]:
        if method == "GET" and path.split("?")[0] == "/metrics":
            return "200 OK", CONTENT_TYPES[TEXT], node.exposition.render(TEXT)
        if method == "GET" and path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if method == "POST" and path == "/-/simulate/events":
            try:
                event = json.loads(body)
                node.xid(int(event["gpu"]), int(event["xid"]))
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                msg = f"the fleet simulator takes only {{'gpu': N, 'xid': CODE}} events: {exc!r}\n"
                return "400 Bad Request", "text/plain", msg.encode()
            return "200 OK", "application/json", b'{"applied": 1}\n'
        return "404 Not Found", "text/plain", b"not found\n"


async def serve(fleet: Fleet, targets_file: Path | None, host: str) -> None:
    servers = []
    for node in fleet.nodes:
        handler = functools.partial(fleet.handle, node)
        servers.append(await asyncio.start_server(handler, host, 0, limit=MAX_REQUEST_HEAD))
    addresses = [f"{host}:{s.sockets[0].getsockname()[1]}" for s in servers]
    if targets_file is not None:
        tmp = targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": addresses, "labels": {}}]))
        tmp.replace(targets_file)
    log.info("%d simulated nodes listening (%s ... %s)", len(addresses), addresses[0], addresses[-1])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--nodes", type=int, default=64)
    p.add_argument("--scenario", action="append", default=None,
                   help="scenario(s) nodes cycle through (default: healthy-8gpu)")
    p.add_argument("--idle-every", type=int, default=8, help="every Nth node's GPUs idle (0: none)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls of each node")
    p.add_argument("--targets-file", type=Path, default=None, help="write a file_sd JSON here once listening")
    p.add_argument("--listen-host", default="127.0.0.1")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    fleet = Fleet(args.nodes, args.scenario or ["healthy-8gpu"], args.idle_every, args.interval, args.seed)
    for node in fleet.nodes:  # a first snapshot before anyone can scrape
        node.poll()
    poller = threading.Thread(target=fleet.poll_forever, name="fleet-poller", daemon=True)
    poller.start()
    try:
        asyncio.run(serve(fleet, args.targets_file, args.listen_host))
    finally:
        fleet.stop()
        with contextlib.suppress(RuntimeError):
            poller.join(5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
