"""The HTTP side: /metrics, /healthz, /readyz, /status and (simulation only) POST /-/simulate/events.

/metrics is a plain Starlette route registered before everything else (no FastAPI validation or
dependency injection on the hot path); it only concatenates cached bytes from ``Exposition`` and never
calls NVML, so it answers in well under a millisecond whatever the driver does. Other owners plug in
with ``create_app(collectors=[Source(...)], routers=[APIRouter(...)])``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from exporter import __version__
from exporter.collectors.exporter_health import ExporterHealthCollector
from exporter.exposition import CONTENT_TYPES, Exposition, Source, negotiate
from exporter.poller import Poller
from exporter.snapshot import NodeSnapshot

log = logging.getLogger(__name__)

# Largest simulated-event body accepted (events are a few hundred bytes).
MAX_EVENT_BYTES = 64 * 1024


def create_app(
    poller: Poller,
    *,
    host: str,
    collectors: Sequence[Source] = (),
    routers: Sequence[APIRouter] = (),
    simulator: Any | None = None,
    settings_summary: Mapping[str, Any] | None = None,
    status_sections: Mapping[str, Callable[[], Any]] | None = None,
    nvml_library: str = "nvidia-ml-py",
) -> FastAPI:
    """Build the app around a (started or not) poller.

    ``collectors``: the metric sources rendered on /metrics, in order (GPU, containers, training...);
    the exporter's own health source is appended here. ``simulator``: the ``SimulatedNvml`` in
    --simulate mode (enables POST /-/simulate/events). ``status_sections``: extra keys for /status.
    """
    exposition = Exposition(collectors)
    health = ExporterHealthCollector(poller, host, nvml_library, sources=lambda: exposition.sources)
    exposition.add(Source("exporter", health))
    # Pre-render new data on the poller thread (while someone scrapes) so a scrape after a poll pays nothing.
    def prerender(_snapshot: Any) -> None:
        exposition.warm()

    poller.add_listener(prerender)

    app = FastAPI(
        title="gpu-exporter", version=__version__, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.poller = poller
    app.state.exposition = exposition
    app.state.simulator = simulator

    async def metrics(request: Request) -> Response:
        fmt = negotiate(request.headers.get("accept"))
        if exposition.is_cached(fmt):  # the usual case: concatenate cached bytes on the event loop
            body = exposition.render(fmt)
        else:  # a real render (e.g. after training pushes) must not stall other requests
            body = await run_in_threadpool(exposition.render, fmt)
        return Response(body, media_type=CONTENT_TYPES[fmt])

    # First in the route table: matched before any other route is tried.
    app.router.routes.insert(0, Route("/metrics", metrics, methods=["GET"]))

    @app.get("/healthz")
    async def healthz() -> Response:
        """Liveness: the process serves HTTP. Deliberately independent of NVML."""
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        """Readiness: the first snapshot exists, so /metrics has GPU series to serve."""
        if poller.latest is None:
            return JSONResponse({"status": "waiting for the first poll"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/status")
    async def status() -> Response:
        """What was found, for a person (or a support ticket): versions, GPUs, last poll, settings."""
        body = status_document(poller, exposition, settings_summary or {}, simulator is not None)
        for key, section in (status_sections or {}).items():
            try:
                body[key] = section()
            except Exception as exc:  # a broken section must not break the page
                body[key] = {"error": repr(exc)}
        return JSONResponse(body)

    @app.post("/-/simulate/events")
    async def simulate_event(request: Request) -> Response:
        """Apply one simulator timeline event now (--simulate mode only), then poll at once."""
        if simulator is None:
            return JSONResponse({"error": "not running in --simulate mode"}, status_code=404)
        too_large = JSONResponse({"error": f"event larger than {MAX_EVENT_BYTES} bytes"}, status_code=413)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_EVENT_BYTES:
            return too_large  # refused before reading: a huge body is never buffered
        raw = bytearray()
        try:
            async for chunk in request.stream():
                raw += chunk
                if len(raw) > MAX_EVENT_BYTES:
                    return too_large
        except ClientDisconnect:  # the client (or the connection's own body limit) hung up mid-body
            return Response(status_code=400)
        try:
            event = json.loads(raw)
        except ValueError as exc:
            return JSONResponse({"error": f"body is not JSON: {exc}"}, status_code=400)
        if not isinstance(event, dict):
            return JSONResponse({"error": "body must be a JSON object (one timeline event)"}, status_code=400)
        from exporter.simulate import ScenarioError, SimulatedOutOfMemory

        try:
            # In a worker thread: the simulator may hold its lock while a poll sleeps in a "hung" call.
            await run_in_threadpool(simulator.apply, event)
        except SimulatedOutOfMemory as exc:  # the simulated device is full: the caller's "CUDA OOM"
            body = {"error": str(exc), "free_bytes": exc.free_bytes, "total_bytes": exc.total_bytes}
            return JSONResponse(body, status_code=409)
        except ScenarioError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        log.info("applied simulated event %s", event)
        poller.poll_now()
        return JSONResponse({"applied": event})

    for router in routers:
        app.include_router(router)
    return app


def status_document(
    poller: Poller, exposition: Exposition, settings_summary: Mapping[str, Any], simulated: bool
) -> dict[str, Any]:
    snapshot: NodeSnapshot | None = poller.latest
    stats = poller.stats
    now = time.time()
    doc: dict[str, Any] = {
        "version": __version__,
        "simulated": simulated,
        "ready": snapshot is not None,
        "config": dict(settings_summary),
        "last_poll": {
            "polls_total": stats.polls_total,
            "errors_total": dict(stats.errors_total),
            "duration_seconds": stats.last_duration_seconds,
            "last_success_timestamp_seconds": stats.last_success_timestamp_seconds,
            "snapshot_age_seconds": None if snapshot is None else max(0.0, now - snapshot.timestamp_seconds),
            "in_progress_seconds": None
            if stats.in_progress_since is None
            else time.monotonic() - stats.in_progress_since,
        },
        "collectors": {
            s.name: {"success": s.last_success, "duration_seconds": s.last_duration_seconds}
            for s in exposition.sources
        },
    }
    if snapshot is None:
        doc.update(nvml_up=None, gpus=[], processes=0)
        return doc
    gpus = []
    for gpu in snapshot.gpus:
        gpus.append(
            {
                "index": gpu.index,
                "uuid": gpu.uuid,
                "name": gpu.info.name if gpu.info else None,
                "pci_bus_id": gpu.info.pci_bus_id if gpu.info else None,
                "up": gpu.up,
                "error": gpu.error,
                "unsupported": sorted(gpu.unsupported),
                "processes": len(gpu.processes),
            }
        )
    doc.update(
        host=snapshot.host,
        nvml_up=snapshot.nvml_up,
        driver_version=snapshot.driver_version,
        cuda_driver_version=snapshot.cuda_driver_version,
        nvml_version=snapshot.nvml_version,
        gpu_count=len(snapshot.gpus),
        gpus=gpus,
        processes=sum(len(g.processes) for g in snapshot.gpus),
    )
    return doc
