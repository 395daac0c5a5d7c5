"""The Docker Engine API, reduced to the one question container attribution asks ("what is container
<id>?"), and when to ask it at all (``--docker auto|on|off``).

The ``docker`` package is imported only when a lookup runs, so installs without the ``docker`` extra
still work; every failure becomes ``DockerUnavailable`` with a bounded ``kind`` for the self-metrics.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from exporter.attribution.source_health import SourceUnavailable
from exporter.config import DEFAULT_DOCKER_HOST, SOURCE_MODES
from exporter.snapshot import ContainerInfo

log = logging.getLogger(__name__)

# Labels copied from the engine onto ContainerInfo.labels (the rest are ignored: unbounded values).
SELECTED_LABELS: tuple[str, ...] = (
    "com.docker.compose.project",
    "com.docker.compose.service",
    "io.kubernetes.pod.name",
    "io.kubernetes.pod.namespace",
    "io.kubernetes.container.name",
)


class DockerUnavailable(SourceUnavailable):
    """The engine could not be asked (no socket, permission, timeout, daemon gone). ``kind`` says which."""


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


def engine_wanted(mode: str, docker_host: str | None, importable: Iterable[str] = ("docker",)) -> bool:
    """Whether to ask the Docker engine. ``auto``: when the SDK is installed and the engine's socket
    exists (or a non-unix DOCKER_HOST is given), so hosts without Docker (containerd-only Kubernetes
    nodes) see no errors; ``on``: always (a missing engine then shows as docker_up 0); ``off``: never."""
    if mode not in SOURCE_MODES:
        raise ValueError(f"docker mode must be one of {', '.join(SOURCE_MODES)}, not {mode!r}")
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
