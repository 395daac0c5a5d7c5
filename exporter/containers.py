"""PID → container attribution: which container holds a GPU process.

NVML reports host PIDs. The kernel knows each process's control group, and every container runtime
names its cgroup after the container id, so ``/proc/<pid>/cgroup`` gives the id without asking anyone.
The Docker engine then turns the id into a name, an image and the few labels people filter on
(compose project/service, Kubernetes pod/namespace/container). Engine answers are cached with a TTL so
a poll costs one small file read per process and, in the steady state, no API call at all.

Failure policy: the engine is optional. No socket, a permission error or a daemon that went away means
the exporter keeps serving with the container id alone (from the cgroup), logs the problem once,
reports ``gpu_exporter_docker_up 0`` and counts ``gpu_exporter_docker_errors_total{kind}``. Lookups are
retried after ``retry_seconds``, so labels come back when the daemon does. The ``docker`` package is
imported only when attribution is enabled, so installs without the ``docker`` extra still work.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import re
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.snapshot import ContainerInfo, GpuProcess, GpuSample, NodeSnapshot

log = logging.getLogger(__name__)

# Labels copied from the engine onto ContainerInfo.labels (the rest are ignored: unbounded values).
SELECTED_LABELS: tuple[str, ...] = (
    "com.docker.compose.project",
    "com.docker.compose.service",
    "io.kubernetes.pod.name",
    "io.kubernetes.pod.namespace",
    "io.kubernetes.container.name",
)

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"

# One path component that names a container: a 64-hex id, optionally behind a runtime prefix
# (docker-, cri-containerd-, crio-, libpod-, "...:cri-containerd:") and before a systemd ".scope".
_ID_COMPONENT = re.compile(r"(?:^|[-:])([0-9a-f]{64})(?:\.scope)?$")
# Helper processes that live in cgroups named after a container but are not the container.
_NOT_A_CONTAINER = ("conmon",)


def container_id_from_cgroup(text: str) -> str | None:
    """The container id in the contents of a ``/proc/<pid>/cgroup`` file, or None (a host process).

    Handles cgroup v2 (``0::/path``), v1 (``N:controller:/path``) and hybrid files, and the layouts of
    Docker (cgroupfs ``/docker/<id>`` and systemd ``docker-<id>.scope``), containerd / CRI
    (``cri-containerd-<id>.scope``, ``/kubepods/.../pod<uid>/<id>``, ``...:cri-containerd:<id>``),
    CRI-O (``crio-<id>.scope``) and Podman (``libpod-<id>.scope``, ``/libpod_parent/libpod-<id>``).
    Paths seen from a private cgroup namespace (``/../docker-<id>.scope``) work too. The unified (v2)
    line is consulted first because on hybrid hosts it is the one systemd keeps accurate.
    """
    unified: list[str] = []
    legacy: list[str] = []
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        (unified if hierarchy == "0" and controllers == "" else legacy).append(path)
    for path in (*unified, *legacy):
        found = _id_from_path(path)
        if found is not None:
            return found
    return None


def _id_from_path(path: str) -> str | None:
    # Deepest component first: a container running systemd has ".../docker-<id>.scope/init.scope".
    for component in reversed(path.split("/")):
        if any(marker in component for marker in _NOT_A_CONTAINER):
            continue
        match = _ID_COMPONENT.search(component)
        if match is not None:
            return match.group(1)
    return None


class DockerUnavailable(Exception):
    """The engine could not be asked (no socket, permission, timeout, daemon gone). ``kind`` says which."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class DockerEngine:
    """The Docker Engine API, reduced to the one question asked: "what is container <id>?".

    The client is created lazily (and again after a failure) with API version negotiation, so a
    daemon that is down at start-up or restarted later is picked up without restarting the exporter.
    """

    def __init__(self, base_url: str | None = None, timeout_seconds: float = 3.0) -> None:
        self.base_url = base_url or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
        self.timeout_seconds = timeout_seconds
        self._client: Any = None

    def inspect(self, container_id: str) -> Mapping[str, Any] | None:
        """The engine's inspect document for a container, or None when the engine does not know it."""
        return self._call(lambda api: dict(api.inspect_container(container_id)))

    def ping(self) -> None:
        """Ask the engine whether it is there (``GET /_ping``); raises DockerUnavailable if not."""
        self._call(lambda api: api.ping())

    def _call(self, request: Callable[[Any], Any]) -> Any:
        try:
            import docker  # the optional `docker` extra: only needed when attribution is enabled
            import docker.errors
        except ImportError as exc:
            raise DockerUnavailable(
                "not_installed", f"the docker package is missing (pip install 'gpu-exporter[docker]'): {exc}"
            ) from exc
        try:
            if self._client is None:
                self._client = docker.APIClient(
                    base_url=self.base_url, version="auto", timeout=self.timeout_seconds
                )
            return request(self._client)
        except docker.errors.NotFound:
            return None
        except Exception as exc:
            self.close()
            raise DockerUnavailable(classify_error(exc), f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken client must not mask the original error
                log.debug("closing the docker client failed", exc_info=True)


def classify_error(exc: BaseException) -> str:
    """A short, bounded ``kind`` label for a failed engine call (the errors_total label value)."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e) for e in chain).lower()
    for e in chain:
        if isinstance(e, PermissionError) or getattr(e, "errno", None) in (errno.EACCES, errno.EPERM):
            return "permission"
    if "permission denied" in text:
        return "permission"
    names = " ".join(type(e).__name__ for e in chain).lower()
    if "timeout" in names or "timed out" in text:
        return "timeout"
    if any(isinstance(e, (FileNotFoundError, ConnectionError)) for e in chain) or "connection" in names:
        return "unavailable"
    if "connection" in text or "no such file" in text or "fetching server api version" in text:
        return "unavailable"
    if "apierror" in names or "server error" in text:
        return "api"
    return "unknown"


def container_info_from_inspect(container_id: str, doc: Mapping[str, Any]) -> ContainerInfo:
    """Name, image and selected labels out of an engine inspect document."""
    config = doc.get("Config") or {}
    labels = config.get("Labels") or {}
    return ContainerInfo(
        id=container_id,
        name=str(doc.get("Name") or "").lstrip("/"),
        image=str(config.get("Image") or doc.get("Image") or ""),
        labels={k: str(labels[k]) for k in SELECTED_LABELS if k in labels},
    )


@dataclass(frozen=True, slots=True)
class AttributionStats:
    """What the self-metrics show: None for ``up`` until the engine was first asked."""

    up: bool | None
    errors: dict[str, int]
    cache_entries: int


class ContainerAttributor:
    """The Poller enricher that fills ``GpuProcess.container`` (call it with a NodeSnapshot).

    ``engine`` is anything with ``inspect(id) -> dict | None`` and ``ping()``, both raising
    DockerUnavailable (tests pass fakes), or None for container ids alone; ``proc_root`` is where host ``/proc`` is visible (``/host/proc`` when mounted there).
    """

    def __init__(
        self,
        engine: DockerEngine | Any | None = None,
        proc_root: str | os.PathLike[str] = "/proc",
        cache_ttl_seconds: float = 60.0,
        negative_ttl_seconds: float = 10.0,
        retry_seconds: float = 5.0,
        health_seconds: float = 30.0,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # None: id-only attribution from the cgroup (no engine to ask, e.g. a containerd-only node).
        self.engine = engine
        self.proc_root = Path(proc_root)
        self.cache_ttl_seconds = cache_ttl_seconds
        self.negative_ttl_seconds = negative_ttl_seconds
        self.retry_seconds = retry_seconds
        self.health_seconds = health_seconds
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        # container id -> (expires_at, info or None when the engine does not know the id)
        self._cache: OrderedDict[str, tuple[float, ContainerInfo | None]] = OrderedDict()
        self._up: bool | None = None
        self._down_until = 0.0
        self._last_contact = 0.0
        self._errors: dict[str, int] = {}
        self._warned_proc = False

    # -- the enricher -------------------------------------------------------------------------------

    def __call__(self, snapshot: NodeSnapshot) -> NodeSnapshot:
        self._check_engine()
        if not any(gpu.processes for gpu in snapshot.gpus):
            return snapshot
        resolved: dict[int, ContainerInfo | None] = {}
        gpus: list[GpuSample] = []
        for gpu in snapshot.gpus:
            procs: list[GpuProcess] = []
            for proc in gpu.processes:
                if proc.pid not in resolved:
                    resolved[proc.pid] = self.container_for_pid(proc.pid)
                info = resolved[proc.pid]
                procs.append(proc if info == proc.container else dataclasses.replace(proc, container=info))
            gpus.append(dataclasses.replace(gpu, processes=tuple(procs)))
        return dataclasses.replace(snapshot, gpus=tuple(gpus))

    def container_for_pid(self, pid: int) -> ContainerInfo | None:
        """The container of a host PID; id-only when the engine cannot be asked; None for host processes."""
        container_id = self.container_id_for_pid(pid)
        if container_id is None:
            return None
        return self.lookup(container_id)

    def container_id_for_pid(self, pid: int) -> str | None:
        try:
            text = (self.proc_root / str(pid) / "cgroup").read_text()
        except FileNotFoundError:
            return None  # the process exited between NVML's answer and now, or another PID namespace
        except OSError as exc:
            if not self._warned_proc:
                self._warned_proc = True
                log.warning(
                    "cannot read %s/%d/cgroup (%s): GPU processes get no container labels; the exporter "
                    "needs the host PID namespace (or host /proc mounted and --proc-root)",
                    self.proc_root, pid, exc,
                )
            return None
        return container_id_from_cgroup(text)

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

    def _check_engine(self) -> None:
        """Ping the engine when its state is unknown, down (after retry_seconds) or not heard from for
        ``health_seconds``: docker_up must tell the truth even when every lookup is a cache hit."""
        if self.engine is None:
            return
        now = self._clock()
        with self._lock:
            due = (
                self._up is None
                or (self._up is False and now >= self._down_until)
                or (self._up is True and now - self._last_contact >= self.health_seconds)
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
            self._errors[exc.kind] = self._errors.get(exc.kind, 0) + 1
            self._down_until = self._clock() + self.retry_seconds
            was_up, self._up = self._up, False
        if was_up is not False:
            log.warning(
                "Docker engine at %s unavailable (%s: %s); GPU processes keep only their container id "
                "until it answers again (retry every %.0fs)",
                getattr(self.engine, "base_url", "?"), exc.kind, exc, self.retry_seconds,
            )

    def _record_success_locked(self) -> None:
        if self._up is False:
            log.info("Docker engine at %s answers again", getattr(self.engine, "base_url", "?"))
        self._up = True
        self._down_until = 0.0
        self._last_contact = self._clock()

    def stats(self) -> AttributionStats:
        with self._lock:
            return AttributionStats(up=self._up, errors=dict(self._errors), cache_entries=len(self._cache))

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if callable(close):
            close()


# -- configuration ------------------------------------------------------------------------------------

DOCKER_MODES = ("auto", "on", "off")


def engine_wanted(mode: str, docker_host: str | None, importable: Iterable[str] = ("docker",)) -> bool:
    """Whether to ask the Docker engine. ``auto``: when the SDK is installed and the engine's socket
    exists (or a non-unix DOCKER_HOST is given), so hosts without Docker (containerd-only Kubernetes
    nodes) see no errors; ``on``: always (a missing engine then shows as docker_up 0); ``off``: never."""
    if mode not in DOCKER_MODES:
        raise ValueError(f"docker mode must be one of {', '.join(DOCKER_MODES)}, not {mode!r}")
    if mode == "off":
        return False
    if mode == "on":
        return True
    import importlib.util

    if any(importlib.util.find_spec(name) is None for name in importable):
        log.info("Docker lookups off: the docker package is not installed (--docker auto)")
        return False
    url = docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
    if url.startswith("unix://"):
        path = url[len("unix://"):]
        try:
            is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            is_socket = False
        if not is_socket:
            # A hostPath mount of a missing socket shows up as an empty directory: not a socket either.
            log.info("Docker lookups off: no Docker socket at %s (--docker auto)", path)
            return False
    return True


def build_attributor(
    mode: str, docker_host: str | None = None, proc_root: str = "/proc"
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
