"""A kubelet stand-in: the kubelet's own PodResources v1 gRPC service, served on a unix socket.

No kubelet can run on these machines, so tests serve the API from the same vendored .proto the
exporter's client uses (exporter/attribution/kubelet_api). What it answers is set by the test
(``pods``); ``fail_with`` makes every call fail with a gRPC status, ``stop()`` / ``start()`` remove and
re-create the socket like a restarting kubelet, ``hang_seconds`` holds every answer back that long.
"""

from __future__ import annotations

import os
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from exporter.attribution.kubelet_api import podresources_v1_pb2 as pb
from exporter.attribution.kubelet_api import podresources_v1_pb2_grpc as pb_grpc


@dataclass
class Container:
    name: str
    device_ids: dict[str, list[str]] = field(default_factory=dict)  # resource name -> device ids
    # DRA: (claim name, driver, pool, device name, [CDI device names])
    dra: list[tuple[str, str, str, str, list[str]]] = field(default_factory=list)


@dataclass
class Pod:
    namespace: str
    name: str
    containers: list[Container]


def to_message(pod: Pod) -> Any:
    return pb.PodResources(
        name=pod.name,
        namespace=pod.namespace,
        containers=[
            pb.ContainerResources(
                name=c.name,
                devices=[pb.ContainerDevices(resource_name=r, device_ids=ids) for r, ids in c.device_ids.items()],
                dynamic_resources=[
                    pb.DynamicResource(
                        claim_name=claim,
                        claim_namespace=pod.namespace,
                        claim_resources=[
                            pb.ClaimResource(
                                driver_name=driver, pool_name=pool, device_name=device,
                                cdi_devices=[pb.CDIDevice(name=n) for n in cdi],
                            )
                        ],
                    )
                    for claim, driver, pool, device, cdi in c.dra
                ],
            )
            for c in pod.containers
        ],
    )


class _Servicer(pb_grpc.PodResourcesListerServicer):
    def __init__(self, owner: KubeletStandIn) -> None:
        self.owner = owner

    def List(self, request: Any, context: Any) -> Any:
        self.owner.calls += 1
        self.owner.check(context)
        return pb.ListPodResourcesResponse(pod_resources=[to_message(p) for p in self.owner.pods])

    def Get(self, request: Any, context: Any) -> Any:
        self.owner.calls += 1
        self.owner.check(context)
        for p in self.owner.pods:
            if (p.name, p.namespace) == (request.pod_name, request.pod_namespace):
                return pb.GetPodResourcesResponse(pod_resources=to_message(p))
        context.abort(grpc.StatusCode.NOT_FOUND, f"pod {request.pod_namespace}/{request.pod_name} not found")

    def GetAllocatableResources(self, request: Any, context: Any) -> Any:
        self.owner.calls += 1
        self.owner.check(context)
        ids = sorted({i for p in self.owner.pods for c in p.containers for v in c.device_ids.values() for i in v})
        return pb.AllocatableResourcesResponse(devices=[pb.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=ids)])


class KubeletStandIn:
    """Serve ``v1.PodResourcesLister`` on ``socket_path`` until ``stop()``; a context manager."""

    def __init__(self, socket_path: str | os.PathLike[str], pods: list[Pod] | None = None) -> None:
        self.socket_path = str(socket_path)
        self.pods: list[Pod] = list(pods or [])
        self.fail_with: grpc.StatusCode | None = None
        self.hang_seconds = 0.0
        self._release = threading.Event()
        self.calls = 0
        self._server: Any = None
        self._lock = threading.Lock()

    def check(self, context: Any) -> None:
        if self.hang_seconds:
            self._release.wait(self.hang_seconds)  # a kubelet that accepts but does not answer
        code = self.fail_with
        if code is not None:
            context.abort(code, f"stand-in told to fail with {code.name}")

    def start(self) -> KubeletStandIn:
        self._release.clear()
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        pb_grpc.add_PodResourcesListerServicer_to_server(_Servicer(self), server)
        server.add_insecure_port(f"unix://{os.path.abspath(self.socket_path)}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        self._release.set()
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=None).wait()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)

    def __enter__(self) -> KubeletStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
