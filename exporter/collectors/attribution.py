"""Who holds each GPU (``gpu_allocation_info``) and whether each attribution source answers.

The cardinality contract: holder labels (pod, namespace, container, Slurm job) live on per-process and
per-container series and on this one info series per (GPU, holder), never on every GPU series. Join
them onto any per-GPU series with ``* on (host, gpu) group_left (k8s_namespace, k8s_pod, ...)``.

Holders come from two places: the kubelet's allocations (``NodeSnapshot.allocations``, also GPUs with
no process) and the Slurm jobs whose processes hold a context on the GPU (from their cgroup, or the
training hook's SLURM_JOB_ID).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.snapshot import NodeSnapshot


class SourceStats(Protocol):
    """What the attribution and Docker self-metrics read per source (exporter.attribution.source_health.SourceStats
    has it; collectors do not import attribution/)."""

    @property
    def up(self) -> bool | None: ...
    @property
    def errors(self) -> Mapping[str, int]: ...


ALLOCATION_LABELS = [
    "host", "gpu", "uuid", "device_id", "resource", "k8s_namespace", "k8s_pod", "k8s_container", "slurm_job",
]


class AttributionCollector(Collector):
    """``gpu_allocation_info`` from the snapshot; ``gpu_exporter_attribution_*`` from the engine's stats."""

    def __init__(
        self,
        get_snapshot: Callable[[], NodeSnapshot | None],
        stats: Callable[[], Mapping[str, SourceStats]],
        host: str,
    ) -> None:
        self._get_snapshot = get_snapshot
        self._stats = stats
        self._host = host

    def collect(self) -> Iterator[Metric]:
        snapshot = self._get_snapshot()
        if snapshot is not None:
            info = InfoMetricFamily(
                "gpu_allocation",
                "1 per holder of a GPU: the Kubernetes container it is allocated to (kubelet PodResources) "
                "or the Slurm job running on it; join with * on (host, gpu) group_left(...)",
                labels=ALLOCATION_LABELS,
            )
            for labels in sorted(_holders(snapshot)):
                info.add_metric(list(labels), {})
            if info.samples:
                yield info
        up = GaugeMetricFamily(
            "gpu_exporter_attribution_up",
            "1 when the attribution source (cgroup, kubelet) answered its last question, 0 when it did not",
            labels=["host", "source"],
        )
        errors = CounterMetricFamily(
            "gpu_exporter_attribution_errors_total",
            "Attribution source questions that failed, by kind (missing, permission, unavailable, timeout, api, ...)",
            labels=["host", "source", "kind"],
        )
        for source, stats in sorted(self._stats().items()):
            if stats.up is not None:  # not asked yet: no series rather than a made-up value
                up.add_metric([self._host, source], 1.0 if stats.up else 0.0)
            for kind, count in sorted(stats.errors.items()):
                errors.add_metric([self._host, source, kind], float(count))
        yield up
        yield errors

    def describe(self) -> list[Metric]:
        return []


def _holders(snapshot: NodeSnapshot) -> set[tuple[str, ...]]:
    index = {g.uuid: str(g.index) for g in snapshot.gpus}
    host = snapshot.host
    out: set[tuple[str, ...]] = set()
    for a in snapshot.allocations:
        # A MIG device whose parent the exporter cannot place keeps gpu="" (its uuid still names it).
        out.add((host, index.get(a.uuid, ""), a.uuid, a.device_id, a.resource,
                 a.k8s_namespace, a.k8s_pod, a.k8s_container, ""))
    for g in snapshot.gpus:
        for p in g.processes:
            if p.owner is not None and p.owner.slurm_job:
                out.add((host, str(g.index), g.uuid, g.uuid, "slurm", "", "", "", p.owner.slurm_job))
    return out
