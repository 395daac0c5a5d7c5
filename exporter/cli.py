"""``gpu-exporter`` / ``python -m exporter``: settings → reader, poller, collectors, app → uvicorn.

``build()`` is the one place where the parts are wired together: a list of ``Feature``s (GPU, container
attribution, training ingest), each bringing its enricher, metric source, router, closer and /status
section; a new feature is one more function and one more entry in that list. ``main()`` owns the process: validated
settings (exit 2 with a message on bad input), logging, graceful shutdown on SIGTERM/SIGINT (the server
drains, then the poller stops and NVML is closed) and exit status 0.
"""

from __future__ import annotations

import importlib.metadata
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from exporter.config import ConfigError, Settings, load_settings, log_level_number

log = logging.getLogger("exporter")


@dataclass
class Runtime:
    """Everything ``build()`` made; ``close()`` undoes it (in reverse order)."""

    settings: Settings
    poller: Any  # exporter.poller.Poller (imported lazily so --help stays fast)
    app: Any  # fastapi.FastAPI
    simulator: Any | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)
    reader_close: Callable[[], None] | None = None
    uvicorn_options: dict[str, Any] = field(default_factory=dict)  # TLS, connection limits, proxies
    tls: bool = False

    def close(self) -> None:
        closers = self.closers
        if not self.poller.stop():
            # Shutting NVML down under a call that is still running in it is asking for a crash.
            log.warning("leaving NVML open: a poll is still stuck in it")
            closers = [c for c in closers if c != self.reader_close]
        for closer in reversed(closers):
            try:
                closer()
            except Exception:
                log.exception("error while shutting down %s", getattr(closer, "__qualname__", closer))


def _nvml_library_version() -> str:
    try:
        return f"nvidia-ml-py {importlib.metadata.version('nvidia-ml-py')}"
    except importlib.metadata.PackageNotFoundError:
        return "nvidia-ml-py unknown"


@dataclass
class Feature:
    """What one feature adds to the exporter (node_exporter's collector registry, in this code): a
    poller enricher, a metric source, an HTTP router, a closer run at shutdown, a /status section.
    ``build`` collects them in order; a new feature is one more function returning one of these."""

    name: str
    enricher: Callable[[Any], Any] | None = None  # exporter.poller.Enricher
    source: Any | None = None  # exporter.exposition.Source
    router: Any | None = None  # fastapi.APIRouter
    closer: Callable[[], None] | None = None
    status: Callable[[], Any] | None = None


def _gpu_feature(settings: Settings, reader: Any, poller: Any) -> Feature:
    """NVML → the gpu_* families; XID events are pushed, not polled (status: GPUs listening)."""
    from exporter.collectors.gpu import GpuCollector
    from exporter.exposition import Source

    return Feature(
        "xid_listener",
        source=Source("gpu", GpuCollector(lambda: poller.latest), generation=lambda: poller.generation),
        closer=reader.close,
        status=lambda: {"gpus": len(reader.xid_listening)},
    )


def _container_feature(settings: Settings, poller: Any, procfs: Any) -> tuple[Feature | None, Any]:
    """Container names from the Docker engine (optional) and the gpu_exporter_docker_* self-metrics.
    Returns the feature and the attributor the attribution engine asks (None: ``--docker off``)."""
    from exporter.attribution.containers import build_attributor

    attributor = build_attributor(settings.docker, settings.docker_host, procfs)
    if attributor is None:
        return None, None
    from exporter.collectors.docker import DockerCollector
    from exporter.exposition import Source

    source = Source(
        "docker", DockerCollector(attributor.stats, settings.host_label), generation=lambda: poller.generation
    )
    return Feature("docker", source=source), attributor  # the engine closes it


def _attribution_feature(settings: Settings, poller: Any, procfs: Any, attributor: Any) -> Feature:
    """One engine: PID → cgroup → container / pod UID / Slurm job / unit, with Docker's and the kubelet's
    names; GPU allocations → gpu_allocation_info; gpu_exporter_attribution_*{source}."""
    from exporter.attribution.engine import AttributionEngine
    from exporter.attribution.kubelet import build_kubelet_source
    from exporter.collectors.attribution import AttributionCollector
    from exporter.exposition import Source

    kubelet = build_kubelet_source(settings.kubelet, settings.kubelet_socket)
    engine = AttributionEngine(procfs, attributor, kubelet)
    collector = AttributionCollector(lambda: poller.latest, engine.stats, settings.host_label)
    return Feature(
        "attribution",
        enricher=engine,
        source=Source("attribution", collector, generation=lambda: poller.generation),
        closer=engine.close,
        status=lambda: {source: stats.up for source, stats in engine.stats().items()},
    )


def _training_feature(settings: Settings, procfs: Any) -> tuple[Feature, Any]:
    """Training hook ingest: POST /api/v1/training → store → training_* series, and the PID join that
    labels GPU processes with job and rank. Returns the feature and the store (the ingest guard counts
    its refusals there)."""
    from exporter.attribution.training import TrainingJoin
    from exporter.attribution.training_diagnosis import TrainingDiagnosis
    from exporter.collectors.training import TrainingCollector
    from exporter.exposition import Source
    from exporter.ingest.router import make_ingest_router
    from exporter.ingest.store import IngestStore

    store = IngestStore(
        settings.training_ttl,
        settings.training_max_processes,
        max_jobs=settings.training_max_jobs,
        max_series=settings.training_max_series,
        max_series_per_process=settings.training_max_series_per_process,
    )

    def training_generation() -> int:
        store.expire()  # a process past its TTL must change the output even with no new push
        return store.generation

    join = TrainingJoin(lambda: [p.report for p in store.processes()], procfs)
    diagnosis = TrainingDiagnosis(store, procfs, join.namespace_of)  # issue 16: GPU, OOM co-tenants, vanished

    feature = Feature(
        "training",
        enricher=lambda snapshot: diagnosis(join(snapshot)),
        source=Source("training", TrainingCollector(store, settings.host_label), generation=training_generation),
        router=make_ingest_router(store),
        status=lambda: {"processes": store.stats()[2], "series": store.series},
    )
    return feature, store


def build(settings: Settings) -> Runtime:
    """Wire reader → poller (+ enrichers) → collectors → app. Raises ConfigError on a bad scenario."""
    from exporter.attribution.procfs import ProcFS
    from exporter.poller import Poller
    from exporter.web.app import create_app

    simulator = None
    nvml_library = _nvml_library_version()
    if settings.simulate:
        # Before the reader: the simulator replaces the NVML library beneath pynvml's wrappers.
        from exporter.simulate import ScenarioError, install, load_scenario

        try:
            scenario = load_scenario(settings.simulate)
        except ScenarioError as exc:
            raise ConfigError(f"--simulate {settings.simulate!r}: {exc}") from None
        simulator = install(scenario)
        nvml_library = "simulated"

    from exporter.nvml import NvmlReader

    reader = NvmlReader(settings.host_label)
    poller = Poller(reader, settings.interval, [])
    procfs = ProcFS(settings.proc_root)  # every /proc read of every feature goes through this root
    training, store = _training_feature(settings, procfs)
    # -- The feature list: enrichers run, sources render and closers are registered in this order.
    docker, attributor = _container_feature(settings, poller, procfs)
    # The attribution engine runs before the training join: the join adds the hook's Slurm job to the
    # owner the engine found.
    attribution = _attribution_feature(settings, poller, procfs, attributor)
    features = [
        f for f in (_gpu_feature(settings, reader, poller), docker, attribution, training) if f is not None
    ]
    poller.enrichers.extend(f.enricher for f in features if f.enricher is not None)
    # Read at request time, so the access-control section added below shows too.
    status_sections = {f.name: f.status for f in features if f.status is not None}
    app = create_app(
        poller,
        host=settings.host_label,
        collectors=[f.source for f in features if f.source is not None],
        routers=[f.router for f in features if f.router is not None],
        simulator=simulator,
        settings_summary=settings.summary(),
        status_sections=status_sections,
        nvml_library=nvml_library,
    )
    uvicorn_options, tls = _add_access_control(app, settings, store.count_rejected, status_sections)
    return Runtime(
        settings=settings,
        poller=poller,
        app=app,
        simulator=simulator,
        closers=[f.closer for f in features if f.closer is not None],
        reader_close=reader.close,
        uvicorn_options=uvicorn_options,
        tls=tls,
    )


def _add_access_control(
    app: Any, settings: Settings, on_reject: Callable[[str], None], status_sections: dict[str, Callable[[], Any]]
) -> tuple[dict[str, Any], bool]:
    """Web-config (TLS, basic auth) and the ingest guard (token, rate limit, body limits).

    Returns uvicorn keyword arguments (the connection limits and TLS of exporter.web.http_limits, proxy
    headers) and whether TLS is on. Raises ConfigError on an unusable web-config file or token, so the
    exporter never serves with less protection than configured.
    """
    from exporter.hook.schema import MAX_BODY_BYTES
    from exporter.ingest.auth import IngestAuthenticator, IngestTokenError, load_ingest_token
    from exporter.ingest.guard import IngestGuardMiddleware, RateLimiter
    from exporter.web.basic_auth import BasicAuth, BasicAuthMiddleware
    from exporter.web.webconfig import WebConfig, WebConfigError, load_web_config

    try:
        web = load_web_config(settings.web_config_file) if settings.web_config_file else WebConfig()
        token = load_ingest_token(settings.ingest_token_file)
    except (WebConfigError, IngestTokenError) as exc:
        raise ConfigError(str(exc)) from None
    authenticator = IngestAuthenticator(token)
    rate = settings.ingest_rate_limit
    app.add_middleware(
        IngestGuardMiddleware,
        authenticator=authenticator,
        limiter=RateLimiter(rate) if rate > 0 else None,
        max_body_bytes=MAX_BODY_BYTES,
        on_reject=on_reject,
    )
    if web.basic_auth_users:  # added last: the outermost layer, before anything else runs
        app.add_middleware(BasicAuthMiddleware, auth=BasicAuth(web.basic_auth_users))
    status_sections["security"] = lambda: {
        "tls": web.tls is not None,
        "basic_auth_users": len(web.basic_auth_users),
        "ingest_token_required": authenticator.token_required,
        "ingest_rate_limit_per_second": rate,
        "trusted_proxies": list(settings.trusted_proxies),
    }
    if not web.basic_auth_users and settings.listen[0] not in ("127.0.0.1", "::1", "localhost"):
        log.info("/metrics is served without authentication on %s (see --web-config-file)", settings.listen[0])
    from exporter.web.http_limits import uvicorn_limits

    # Bounded connections (TLS handshakes included), request heads (size and read time) and bodies.
    options = uvicorn_limits(settings.max_connections, web.tls.ssl_context() if web.tls is not None else None)
    # X-Forwarded-For names the client only behind a proxy the operator listed: uvicorn would otherwise
    # believe it from loopback (or from anyone with FORWARDED_ALLOW_IPS=*), letting a client pick the
    # address that the loopback-only ingest policy and the per-client rate limit go by.
    options["proxy_headers"] = bool(settings.trusted_proxies)
    options["forwarded_allow_ips"] = list(settings.trusted_proxies)
    return options, web.tls is not None


def serve(runtime: Runtime) -> int:
    """Run the poller and the HTTP server until SIGTERM/SIGINT; return the exit status."""
    import uvicorn

    settings = runtime.settings
    host, port = settings.listen
    config = uvicorn.Config(
        runtime.app,
        host=host,
        port=port,
        log_config=None,  # our logging.basicConfig applies
        access_log=False,  # a line per scrape is noise and CPU
        server_header=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
        **runtime.uvicorn_options,
    )
    server = uvicorn.Server(config)
    from exporter.web.http_limits import OncePerMinute

    logging.getLogger("uvicorn.error").addFilter(OncePerMinute())  # a line per bad request: any client's to flood
    stopped_by: list[int] = []
    # uvicorn re-raises the signal it shut down on after restoring these handlers: record it instead
    # of dying from it, so cleanup below runs and the exit status is 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopped_by.append(signum))
    runtime.poller.start()
    log.info(
        "serving on %s (interval %.3gs%s); scrape %s/metrics",
        settings.summary()["listen"],
        settings.interval,
        f", simulating {settings.simulate}" if settings.simulate else "",
        settings.listen_url.replace("http://", "https://") if runtime.tls else settings.listen_url,
    )
    try:
        server.run()
    finally:
        runtime.close()
    if not server.started:
        log.error("could not serve on %s", settings.summary()["listen"])
        return 1
    log.info("stopped%s", f" on signal {signal.Signals(stopped_by[0]).name}" if stopped_by else "")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"gpu-exporter: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=log_level_number(settings.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        runtime = build(settings)
    except ConfigError as exc:
        print(f"gpu-exporter: error: {exc}", file=sys.stderr)
        return 2
    try:
        return serve(runtime)
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind
        return int(exc.code) if isinstance(exc.code, int) else 1
