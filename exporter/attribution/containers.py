"""Container names for the attribution engine: which container holds a GPU process.

NVML reports host PIDs. The kernel knows each process's control group, and every container runtime
names its cgroup after the container id, so ``/proc/<pid>/cgroup`` gives the id without asking anyone
(exporter.attribution.cgroups, read once per PID by exporter.attribution.engine). The Docker engine
then turns the id into a name, an image and the few labels people filter on
(compose project/service, Kubernetes pod/namespace/container). Engine answers are cached with a TTL so
a poll costs one small file read per process and, in the steady state, no API call at all.

Failure policy: the engine is optional. No socket, a permission error or a daemon that went away means
the exporter keeps serving with the container id alone (from the cgroup), logs the problem once,
reports ``gpu_exporter_docker_up 0`` and counts ``gpu_exporter_docker_errors_total{kind}``. Lookups are
retried after ``retry_seconds``, so labels come back when the daemon does. The ``docker`` package is
imported only when attribution is enabled, so installs without the ``docker`` extra still work.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exporter.attribution.cgroups import container_id_from_cgroup as container_id_from_cgroup  # re-export
from exporter.attribution.docker import (
    DockerEngine,
    DockerUnavailable,
    container_info_from_inspect,
    engine_wanted,
)
from exporter.attribution.procfs import ProcFS
from exporter.attribution.source_health import SourceHealth
from exporter.config import Settings
from exporter.snapshot import ContainerInfo, NodeSnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AttributionStats:
    """What the self-metrics show: None for ``up`` until the engine was first asked."""

    up: bool | None
    errors: dict[str, int]
    cache_entries: int


class ContainerAttributor:
    """The Poller enricher that fills ``GpuProcess.container`` (call it with a NodeSnapshot).

    ``engine`` is anything with ``inspect(id) -> dict | None`` and ``ping()``, both raising
    DockerUnavailable (tests pass fakes), or None for container ids alone; ``proc_root`` is the host's
    /proc (a ``ProcFS``, or its path: ``/host/proc`` when mounted there).
    """

    def __init__(
        self,
        engine: DockerEngine | Any | None = None,
        proc_root: ProcFS | str | os.PathLike[str] = Settings.proc_root,
        cache_ttl_seconds: float = 60.0,
        negative_ttl_seconds: float = 10.0,
        retry_seconds: float = 5.0,
        health_seconds: float = 30.0,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # None: id-only attribution from the cgroup (no engine to ask, e.g. a containerd-only node).
        self.engine = engine
        self.procfs = proc_root if isinstance(proc_root, ProcFS) else ProcFS(proc_root)
        self.cache_ttl_seconds = cache_ttl_seconds
        self.negative_ttl_seconds = negative_ttl_seconds
        self.retry_seconds = retry_seconds
        self.health_seconds = health_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        # container id -> (expires_at, info or None when the engine does not know the id)
        self._cache: OrderedDict[str, tuple[float, ContainerInfo | None]] = OrderedDict()
        self.health = SourceHealth(
            log,
            f"Docker engine at {getattr(engine, 'base_url', '?')}",
            f"GPU processes keep only their container id until it answers again (retry every {retry_seconds:.0f}s)",
        )
        self._down_until = 0.0
        self._last_contact = 0.0
        self._engine: Any = None  # the AttributionEngine __call__ goes through

    # -- as an enricher on its own (tests, Docker-only use) --------------------------------------------

    def __call__(self, snapshot: NodeSnapshot) -> NodeSnapshot:
        """Container labels for every GPU process, through the one attribution engine (PID -> cgroup)."""
        from exporter.attribution.engine import AttributionEngine

        if self._engine is None:
            self._engine = AttributionEngine(self.procfs, docker=self)
        return self._engine(snapshot)

    # -- the engine, behind the cache ---------------------------------------------------------------

    def lookup(self, container_id: str) -> ContainerInfo:
        if self.engine is None:
            return ContainerInfo(id=container_id, name="", image="")
        now = self._clock()
        with self._lock:
            cached = self._cache.get(container_id)
            if cached is not None and cached[0] > now:
                self._cache.move_to_end(container_id)
                return cached[1] or ContainerInfo(id=container_id, name="", image="")
            if now < self._down_until:
                # The engine failed recently: serve what we knew (stale beats blank), retry later.
                return (cached[1] if cached else None) or ContainerInfo(id=container_id, name="", image="")
        try:
            doc = self.engine.inspect(container_id)
        except DockerUnavailable as exc:
            self._record_failure(exc)
            return (cached[1] if cached else None) or ContainerInfo(id=container_id, name="", image="")
        info = container_info_from_inspect(container_id, doc) if doc is not None else None
        ttl = self.cache_ttl_seconds if info is not None else self.negative_ttl_seconds
        with self._lock:
            self._record_success_locked()
            self._cache[container_id] = (now + ttl, info)
            self._cache.move_to_end(container_id)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return info or ContainerInfo(id=container_id, name="", image="")

    def check_engine(self) -> None:
        """Ping the engine when its state is unknown, down (after retry_seconds) or not heard from for
        ``health_seconds``: docker_up must tell the truth even when every lookup is a cache hit."""
        if self.engine is None:
            return
        now = self._clock()
        up = self.health.up
        with self._lock:
            due = (
                up is None
                or (up is False and now >= self._down_until)
                or (up is True and now - self._last_contact >= self.health_seconds)
            )
        if not due:
            return
        try:
            self.engine.ping()
        except DockerUnavailable as exc:
            self._record_failure(exc)
            return
        with self._lock:
            self._record_success_locked()

    def _record_failure(self, exc: DockerUnavailable) -> None:
        with self._lock:
            self._down_until = self._clock() + self.retry_seconds
        self.health.failed(exc)

    def _record_success_locked(self) -> None:
        self.health.answered()
        self._down_until = 0.0
        self._last_contact = self._clock()

    def stats(self) -> AttributionStats:
        health = self.health.stats()
        with self._lock:
            return AttributionStats(up=health.up, errors=health.errors, cache_entries=len(self._cache))

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if callable(close):
            close()


def build_attributor(
    mode: str, docker_host: str | None = None, proc_root: ProcFS | str = Settings.proc_root
) -> ContainerAttributor | None:
    """The enricher for the given settings, or None when attribution is off (``--docker off``).

    Without an engine to ask (auto, and no socket) processes still get their container id from the
    cgroup: on containerd nodes it joins with kube-state-metrics' ``kube_pod_container_info``.
    """
    if mode == "off":
        return None
    engine = DockerEngine(docker_host) if engine_wanted(mode, docker_host) else None
    if engine is not None:
        log.info("container attribution on (Docker engine at %s)", engine.base_url)
    else:
        log.info("container attribution on, container ids only (no Docker engine)")
    return ContainerAttributor(engine=engine, proc_root=proc_root)
