"""Kubernetes names for GPUs: the kubelet's PodResources API (gRPC on a unix socket).

The kubelet answers ``List`` with every pod on the node, its containers and the device IDs the
device plugins (``devices``) and DRA drivers (``dynamic_resources``) allocated to each. For the NVIDIA
device plugin those IDs are GPU UUIDs (``GPU-…``), MIG device UUIDs (``MIG-…``) or, with time-slicing,
``GPU-…::<replica>``. That names the pod/namespace/container of every allocated GPU, including GPUs
whose processes the exporter cannot see (another PID namespace) or that hold no process at all.

Failure policy: the socket missing (no kubelet, not mounted), permission denied, an API error or a
kubelet restarting never stops the exporter. The source logs once per outage, reports ``up`` False and
counts the error by kind, keeps serving the last good answer for ``stale_seconds`` (a kubelet restart
takes seconds; the pods did not go away), and retries after ``retry_seconds``.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from exporter.attribution.source_health import SourceHealth, SourceStats, SourceUnavailable
from exporter.snapshot import GpuAllocation

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
# The kubelet's own server limit for PodResources messages (16 MiB); a big node's List fits.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_UUID = re.compile(r"\b((?:GPU|MIG)-[0-9A-Za-z-]+(?:/\d+/\d+)?)")
# NVIDIA's DRA driver (gpu.nvidia.com) names whole GPUs "gpu-<index>" in its resource pool.
_DRA_GPU_INDEX = re.compile(r"^gpu-(\d+)$")


def gpu_uuid_of(device_id: str) -> str | None:
    """The GPU or MIG UUID a device-plugin ID or CDI device name carries, or None.

    ``GPU-x::3`` (time-slicing replica) → ``GPU-x``; old-style ``MIG-GPU-x/1/0`` is kept whole (the
    engine maps it to its parent ``GPU-x``).
    """
    match = _UUID.search(device_id)
    return match.group(1) if match else None


def allocations_from_list(response: Any, gpu_index_uuid: dict[int, str] | None = None) -> list[GpuAllocation]:
    """Every GPU device in a ``ListPodResourcesResponse``, one GpuAllocation per (device, container).

    ``gpu_index_uuid`` resolves DRA devices named by index (``gpu-0``) to the GPU's UUID.
    """
    out: list[GpuAllocation] = []
    for pod in response.pod_resources:
        for container in pod.containers:
            names = {"k8s_namespace": pod.namespace, "k8s_pod": pod.name, "k8s_container": container.name}
            for devices in container.devices:
                for device_id in devices.device_ids:
                    uuid = gpu_uuid_of(device_id)
                    if uuid is not None:
                        out.append(GpuAllocation(uuid, device_id, devices.resource_name, **names))
            for claim in container.dynamic_resources:
                for res in claim.claim_resources:
                    uuid = _dra_uuid(res, gpu_index_uuid or {})
                    if uuid is not None:
                        device_id = res.device_name or (res.cdi_devices[0].name if res.cdi_devices else uuid)
                        out.append(GpuAllocation(uuid, device_id, res.driver_name, **names))
    return out


def _dra_uuid(res: Any, gpu_index_uuid: dict[int, str]) -> str | None:
    for candidate in (res.device_name, *(cdi.name for cdi in res.cdi_devices)):
        uuid = gpu_uuid_of(candidate)
        if uuid is not None:
            return uuid
    match = _DRA_GPU_INDEX.match(res.device_name)
    if match and res.driver_name == "gpu.nvidia.com":
        return gpu_index_uuid.get(int(match.group(1)))
    return None


class PodResourcesClient:
    """The kubelet's ``v1.PodResourcesLister`` over its unix socket, reduced to ``List``.

    The channel is created lazily and again after any failure, so a kubelet that restarts (and
    re-creates its socket) is picked up without restarting the exporter.
    """

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout_seconds: float = 2.0) -> None:
        self.socket_path = socket_path
        self.timeout_seconds = timeout_seconds
        self._channel: Any = None
        self._stub: Any = None

    def list(self) -> Any:
        """The kubelet's ``ListPodResourcesResponse``; raises SourceUnavailable."""
        self._check_socket()
        try:
            import grpc

            from exporter.attribution.kubelet_api import podresources_v1_pb2 as pb
            from exporter.attribution.kubelet_api import podresources_v1_pb2_grpc as pb_grpc
        except ImportError as exc:  # the server extra without grpcio: say so once, never crash
            raise SourceUnavailable("not_installed", f"grpcio/protobuf missing ({exc})") from exc
        if self._stub is None:
            self._channel = grpc.insecure_channel(
                f"unix://{os.path.abspath(self.socket_path)}",
                options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
            )
            self._stub = pb_grpc.PodResourcesListerStub(self._channel)
        try:
            return self._stub.List(pb.ListPodResourcesRequest(), timeout=self.timeout_seconds)
        except grpc.RpcError as exc:
            self.close()
            raise SourceUnavailable(_rpc_kind(exc), f"{exc.code().name}: {exc.details()}") from exc

    def _check_socket(self) -> None:
        """A clear kind before gRPC's generic UNAVAILABLE: no socket, not a socket, or not allowed."""
        try:
            mode = os.stat(self.socket_path).st_mode
        except FileNotFoundError:
            raise SourceUnavailable("missing", f"no kubelet socket at {self.socket_path}") from None
        except PermissionError as exc:
            raise SourceUnavailable("permission", f"{self.socket_path}: {exc}") from None
        if not stat.S_ISSOCK(mode):  # a hostPath mount of a missing socket is an empty directory
            raise SourceUnavailable("missing", f"{self.socket_path} is not a socket")
        if not os.access(self.socket_path, os.R_OK | os.W_OK):
            raise SourceUnavailable("permission", f"{self.socket_path}: permission denied")

    def close(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()


def _rpc_kind(exc: Any) -> str:
    code = exc.code().name if callable(getattr(exc, "code", None)) else ""
    details = (exc.details() or "").lower() if callable(getattr(exc, "details", None)) else ""
    if code == "PERMISSION_DENIED" or "permission denied" in details:
        return "permission"
    if code == "DEADLINE_EXCEEDED":
        return "timeout"
    if code == "UNAVAILABLE":
        return "unavailable"
    return "api"


class KubeletSource:
    """GPU allocations from the kubelet, refreshed at most every ``refresh_seconds`` (a poll asks ``get``)."""

    def __init__(
        self,
        client: PodResourcesClient | Any,
        refresh_seconds: float = 10.0,
        retry_seconds: float = 10.0,
        stale_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.refresh_seconds = refresh_seconds
        self.retry_seconds = retry_seconds
        self.stale_seconds = stale_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._response: Any = None
        self._good_at = float("-inf")
        self._next_at = float("-inf")
        self.health = SourceHealth(
            log,
            f"kubelet PodResources API at {_where(client)}",
            f"GPUs keep the labels the cgroup gives (pod UID, container id); last names kept for "
            f"{stale_seconds:.0f}s; retry every {retry_seconds:.0f}s",
        )

    def get(self, gpu_index_uuid: dict[int, str]) -> list[GpuAllocation]:
        """The current allocations (the last good answer while the kubelet is away, up to stale_seconds)."""
        now = self._clock()
        if now >= self._next_at:
            self._refresh(now)
        with self._lock:
            response = self._response if now - self._good_at <= self.stale_seconds else None
        return allocations_from_list(response, gpu_index_uuid) if response is not None else []

    def _refresh(self, now: float) -> None:
        try:
            response = self.client.list()
        except SourceUnavailable as exc:
            self._failed(exc, now)
            return
        except Exception as exc:  # never let a surprise from the client end the poller
            self._failed(SourceUnavailable("unknown", f"{type(exc).__name__}: {exc}"), now)
            return
        self.health.answered()
        with self._lock:
            self._response = response
            self._good_at = now
            self._next_at = now + self.refresh_seconds

    def _failed(self, exc: SourceUnavailable, now: float) -> None:
        with self._lock:
            self._next_at = now + self.retry_seconds
        self.health.failed(exc)

    def stats(self) -> SourceStats:
        return self.health.stats()

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if callable(close):
            close()


def _where(client: Any) -> str:
    return str(getattr(client, "socket_path", "?"))


def unique(items: Iterable[GpuAllocation]) -> tuple[GpuAllocation, ...]:
    """Allocations in a stable order without duplicates (a device listed twice renders once)."""
    return tuple(sorted(set(items), key=lambda a: (a.uuid, a.device_id, a.k8s_namespace, a.k8s_pod, a.k8s_container)))


def build_kubelet_source(mode: str, socket_path: str = DEFAULT_SOCKET) -> KubeletSource | None:
    """The kubelet source for the settings, or None. ``auto`` turns it on when the socket's directory
    exists (a Kubernetes node, or the DaemonSet's mount), so a kubelet restarting at our start-up is not
    mistaken for "no kubelet"; ``on`` always (a missing socket then shows as attribution_up 0)."""
    if mode == "off":
        return None
    if mode == "auto" and not os.path.isdir(os.path.dirname(os.path.abspath(socket_path))):
        log.info("kubelet attribution off: no %s (--kubelet auto)", os.path.dirname(socket_path))
        return None
    log.info("kubelet attribution on (PodResources API at %s)", socket_path)
    return KubeletSource(PodResourcesClient(socket_path))
