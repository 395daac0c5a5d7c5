"""GPU metric families from the latest ``NodeSnapshot``, exactly as docs/metrics.md names them.

A custom collector (prometheus_client's pattern for proxied data): nothing is kept between scrapes,
so a GPU, process or container that went away simply has no series in the next render, and an absent
field (None, or a missing dict key) yields no series rather than a zero. Every GPU series carries
``host``, ``gpu`` (index) and ``uuid``; identity details live only in ``gpu_info``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from exporter.snapshot import GpuProcess, GpuSample, NodeSnapshot, ProcessOwner

GPU_LABELS = ["host", "gpu", "uuid"]
PROCESS_LABELS = [
    *GPU_LABELS, "pid", "process_type", "container_id", "container_name", "container_image",
    "compose_service", "k8s_namespace", "k8s_pod", "training_job", "rank",
    # exporter.attribution: the cgroup's pod UID / Slurm job / systemd unit, the kubelet's names.
    "k8s_container", "k8s_pod_uid", "slurm_job", "slurm_step", "systemd_unit",
    # exporter.nvml: the MIG GPU / compute instance (empty when MIG is off).
    "gpu_instance", "compute_instance",
]
# The holder labels of a container's GPU memory series (a subset of the process labels).
CONTAINER_LABELS = [*GPU_LABELS, "container_id", "container_name", "k8s_namespace", "k8s_pod", "k8s_container"]
_COMPOSE_SERVICE = "com.docker.compose.service"
_K8S_NAMESPACE = "io.kubernetes.pod.namespace"
_K8S_POD = "io.kubernetes.pod.name"
_NO_OWNER = ProcessOwner()

# Plain per-GPU gauges: (snapshot field, metric name, help).
_GAUGES = (
    ("utilization_gpu_ratio", "gpu_utilization_ratio", "SM (kernel) busy share of the last sample period, 0..1"),
    ("utilization_memory_ratio", "gpu_memory_utilization_ratio", "Memory-controller busy share, 0..1"),
    ("memory_used_bytes", "gpu_memory_used_bytes", "Framebuffer memory in use"),
    ("memory_free_bytes", "gpu_memory_free_bytes", "Framebuffer memory free"),
    ("memory_total_bytes", "gpu_memory_total_bytes", "Framebuffer memory installed"),
    ("memory_reserved_bytes", "gpu_memory_reserved_bytes", "Framebuffer memory reserved by the driver"),
    ("temperature_gpu_celsius", "gpu_temperature_celsius", "GPU core temperature"),
    ("temperature_memory_celsius", "gpu_memory_temperature_celsius", "HBM memory temperature"),
    ("power_usage_watts", "gpu_power_usage_watts", "Power draw"),
    ("power_limit_watts", "gpu_power_limit_watts", "Enforced power limit"),
    ("fan_speed_ratio", "gpu_fan_speed_ratio", "Fan speed as a share of its maximum, 0..1"),
    ("performance_state", "gpu_performance_state", "Performance state, 0 (max) .. 15 (min)"),
    ("pcie_tx_bytes_per_second", "gpu_pcie_tx_bytes_per_second", "PCIe transmit throughput (sampled by NVML)"),
    ("pcie_rx_bytes_per_second", "gpu_pcie_rx_bytes_per_second", "PCIe receive throughput (sampled by NVML)"),
    ("pcie_link_generation", "gpu_pcie_link_generation", "PCIe link generation now (may drop at idle to save power)"),
    ("pcie_link_generation_max", "gpu_pcie_link_generation_max", "Highest PCIe generation this GPU can reach in its slot"),
    ("pcie_link_generation_device_max", "gpu_pcie_link_generation_device_max", "Highest PCIe generation the card supports"),
    ("pcie_link_width_lanes", "gpu_pcie_link_width_lanes", "PCIe link width now, lanes"),
    ("pcie_link_width_max_lanes", "gpu_pcie_link_width_max_lanes", "Widest PCIe link this GPU can reach in its slot, lanes"),
)
_COUNTERS = (
    ("energy_consumed_joules", "gpu_energy_consumed_joules", "Energy consumed since the driver was loaded"),
    ("pcie_replay_errors", "gpu_pcie_replay_errors", "PCIe replay counter"),
)
_FLAGS = (
    ("retired_pages_pending", "gpu_retired_pages_pending", "1 when a page retirement waits for a reboot"),
    ("remapped_rows_pending", "gpu_remapped_rows_pending", "1 when a row remap waits for a GPU reset"),
    ("remapped_rows_failure", "gpu_remapped_rows_failure", "1 when a row remap failed: the GPU needs service"),
)
_GPM = (
    ("sm_active", "gpu_gpm_sm_active_ratio", "GPM: share of SMs busy, 0..1 (Hopper and newer)"),
    ("tensor_active", "gpu_gpm_tensor_active_ratio", "GPM: share of time tensor cores were busy, 0..1"),
    ("dram_bandwidth", "gpu_gpm_dram_bandwidth_ratio", "GPM: DRAM bandwidth used vs. peak, 0..1"),
)


class GpuCollector(Collector):
    """Renders the snapshot ``get_snapshot()`` returns (None before the first poll: no GPU series)."""

    def __init__(self, get_snapshot: Callable[[], NodeSnapshot | None]) -> None:
        self._get_snapshot = get_snapshot

    def describe(self) -> list[Metric]:
        return []  # families depend on the snapshot; don't let the registry call collect() at register

    def collect(self) -> Iterator[Metric]:
        snapshot = self._get_snapshot()
        if snapshot is None:
            return
        yield from _render(snapshot)


def _render(snapshot: NodeSnapshot) -> Iterator[Metric]:
    host = snapshot.host
    if snapshot.nvml_up:
        # Not "gpu_count": promtool's lint reserves the _count suffix for histograms and summaries.
        count = GaugeMetricFamily("gpu_devices", "GPUs NVML enumerates now", labels=["host"])
        count.add_metric([host], float(len(snapshot.gpus)))
        yield count
    gpus = snapshot.gpus
    if not gpus:
        return
    ids = {g.index: [host, str(g.index), g.uuid] for g in gpus}

    up = GaugeMetricFamily("gpu_up", "1 when the GPU answered the last poll, 0 when lost or erroring",
                           labels=GPU_LABELS)
    for g in gpus:
        up.add_metric(ids[g.index], 1.0 if g.up else 0.0)
    yield up

    info = InfoMetricFamily("gpu", "GPU identity; join with * on(host, gpu, uuid) group_left(name) gpu_info",
                            labels=GPU_LABELS)
    for g in gpus:
        if g.info is not None:
            info.add_metric(ids[g.index], {
                "name": g.info.name,
                "pci_bus_id": g.info.pci_bus_id,
                "serial": g.info.serial or "",
                "vbios_version": g.info.vbios_version or "",
                "driver_version": snapshot.driver_version or "",
                "cuda_driver_version": snapshot.cuda_driver_version or "",
                "mig_mode": g.info.mig_mode or "",
            })
    yield from _nonempty(info)

    # One series per GPU per plain field; flags (bools) render as 0/1, which float() already does.
    for fields, family_type in ((_GAUGES, GaugeMetricFamily), (_COUNTERS, CounterMetricFamily),
                                (_FLAGS, GaugeMetricFamily)):
        for field, name, doc in fields:
            family = family_type(name, doc, labels=GPU_LABELS)
            for g in gpus:
                value = getattr(g, field)
                if value is not None:
                    family.add_metric(ids[g.index], float(value))
            yield from _nonempty(family)

    yield from _labelled(gpus, ids, "gpu_temperature_threshold_celsius", "Driver temperature thresholds",
                         "threshold", lambda g: g.temperature_thresholds_celsius)
    yield from _labelled(gpus, ids, "gpu_clock_hertz", "Current clock", "clock", lambda g: g.clocks_hertz)
    yield from _labelled(gpus, ids, "gpu_clock_max_hertz", "Maximum clock", "clock", lambda g: g.clocks_max_hertz)
    yield from _labelled(gpus, ids, "gpu_clock_event_active",
                         "1 while this clock-event (throttle) reason holds the clocks down",
                         "reason", lambda g: {k: 1.0 if v else 0.0 for k, v in g.clock_event_reasons.items()})
    yield from _labelled(gpus, ids, "gpu_clock_throttle_seconds", "Time the clocks were held down, by reason "
                         "(NVML violation counters)", "reason", lambda g: g.throttle_seconds, CounterMetricFamily)
    yield from _labelled(gpus, ids, "gpu_pcie_errors", "PCIe error counters", "error", lambda g: g.pcie_errors,
                         CounterMetricFamily)
    yield from _labelled(gpus, ids, "gpu_recovery_action", "1 for the action the driver asks for to bring the GPU "
                         "back (none, gpu_reset, node_reboot, drain_p2p, drain_and_reset, ...)", "action",
                         lambda g: {g.recovery_action: 1.0} if g.recovery_action is not None else {})
    yield from _nvlink(gpus, ids)
    yield from _labelled(gpus, ids, "gpu_retired_pages", "Retired framebuffer pages (pre-Ampere)",
                         "cause", lambda g: g.retired_pages)
    yield from _labelled(gpus, ids, "gpu_remapped_rows", "Remapped memory rows (Ampere and newer)",
                         "kind", lambda g: g.remapped_rows)

    ecc = CounterMetricFamily("gpu_ecc_errors", "ECC error counts (volatile resets on driver reload)",
                              labels=[*GPU_LABELS, "error_type", "counter"])
    for g in gpus:
        for (error_type, counter_name), n in sorted(g.ecc_errors.items()):
            ecc.add_metric([*ids[g.index], error_type, counter_name], float(n))
    yield from _nonempty(ecc)

    xid = CounterMetricFamily("gpu_xid_errors", "XID events received from NVML's event API since the exporter "
                              "started", labels=[*GPU_LABELS, "xid"])
    xid_seen = GaugeMetricFamily("gpu_xid_last_seen_timestamp_seconds", "When that XID was last received "
                                 "(Unix time)", labels=[*GPU_LABELS, "xid"])
    for g in gpus:
        for code, xc in sorted(g.xid_errors.items()):
            xid.add_metric([*ids[g.index], str(code)], float(xc.count))
            xid_seen.add_metric([*ids[g.index], str(code)], xc.last_seen_timestamp_seconds)
    yield from _nonempty(xid)
    yield from _nonempty(xid_seen)

    for key, name, doc in _GPM:
        gauge = GaugeMetricFamily(name, doc, labels=GPU_LABELS)
        for g in gpus:
            value = g.gpm_ratios.get(key)
            if value is not None:
                gauge.add_metric(ids[g.index], value)
        yield from _nonempty(gauge)

    yield from _mig(gpus, ids)
    yield from _processes(gpus, ids)


def _labelled(
    gpus: tuple[GpuSample, ...],
    ids: dict[int, list[str]],
    name: str,
    doc: str,
    label: str,
    values: Callable[[GpuSample], Mapping[str, float]],
    family_type: type[GaugeMetricFamily] | type[CounterMetricFamily] = GaugeMetricFamily,
) -> Iterator[Metric]:
    """One family with an extra label from a per-GPU dict (thresholds, clocks, reasons, ...)."""
    family = family_type(name, doc, labels=[*GPU_LABELS, label])
    for g in gpus:
        for key, value in values(g).items():
            family.add_metric([*ids[g.index], key], float(value))
    yield from _nonempty(family)


def _nvlink(gpus: tuple[GpuSample, ...], ids: dict[int, list[str]]) -> Iterator[Metric]:
    """Per NVLink link: up, error counters, data bytes."""
    up = GaugeMetricFamily("gpu_nvlink_up", "1 when the NVLink link is active (or idle in low power), 0 when "
                           "down", labels=[*GPU_LABELS, "link"])
    errors = CounterMetricFamily("gpu_nvlink_errors", "NVLink error counters (crc_flit, crc_data, replay, "
                                 "recovery)", labels=[*GPU_LABELS, "link", "error"])
    tx = CounterMetricFamily("gpu_nvlink_tx_bytes", "NVLink data bytes sent", labels=[*GPU_LABELS, "link"])
    rx = CounterMetricFamily("gpu_nvlink_rx_bytes", "NVLink data bytes received", labels=[*GPU_LABELS, "link"])
    for g in gpus:
        for link, is_up in sorted(g.nvlink_up.items()):
            up.add_metric([*ids[g.index], str(link)], 1.0 if is_up else 0.0)
        for (link, error), n in sorted(g.nvlink_errors.items()):
            errors.add_metric([*ids[g.index], str(link), error], float(n))
        for (link, direction), n in sorted(g.nvlink_bytes.items()):
            (tx if direction == "tx" else rx).add_metric([*ids[g.index], str(link)], float(n))
    for family in (up, errors, tx, rx):
        yield from _nonempty(family)


def _mig(gpus: tuple[GpuSample, ...], ids: dict[int, list[str]]) -> Iterator[Metric]:
    """Per MIG device (identity) and per GPU instance (memory, GPM): nothing when MIG is off."""
    info = GaugeMetricFamily("gpu_mig_info", "A MIG device: GPU instance, compute instance, its UUID and profile",
                             labels=[*GPU_LABELS, "gpu_instance", "compute_instance", "mig_uuid", "profile"])
    instance_labels = [*GPU_LABELS, "gpu_instance"]
    used = GaugeMetricFamily("gpu_mig_memory_used_bytes", "Memory in use in a MIG GPU instance", labels=instance_labels)
    total = GaugeMetricFamily("gpu_mig_memory_total_bytes", "Memory of a MIG GPU instance", labels=instance_labels)
    gpm = {key: GaugeMetricFamily(name.replace("gpu_gpm_", "gpu_mig_gpm_"), doc + ", per MIG GPU instance",
                                  labels=instance_labels) for key, name, doc in _GPM}
    for g in gpus:
        seen: set[int] = set()
        for m in g.mig_instances:
            gi = str(m.gpu_instance)
            info.add_metric([*ids[g.index], gi, str(m.compute_instance), m.uuid, m.profile or ""], 1.0)
            if m.gpu_instance in seen:
                continue  # compute instances of one GPU instance share its memory and GPM figures
            seen.add(m.gpu_instance)
            if m.memory_used_bytes is not None:
                used.add_metric([*ids[g.index], gi], float(m.memory_used_bytes))
            if m.memory_total_bytes is not None:
                total.add_metric([*ids[g.index], gi], float(m.memory_total_bytes))
            for key, value in m.gpm_ratios.items():
                if key in gpm:
                    gpm[key].add_metric([*ids[g.index], gi], value)
    for family in (info, used, total, *gpm.values()):
        yield from _nonempty(family)


def _process_labels(gpu_ids: list[str], p: GpuProcess) -> list[str]:
    c = p.container
    labels = c.labels if c is not None else {}
    o = p.owner or _NO_OWNER
    return [
        *gpu_ids, str(p.pid), p.process_type,
        c.id if c else "", c.name if c else "", c.image if c else "",
        labels.get(_COMPOSE_SERVICE, ""), o.k8s_namespace or labels.get(_K8S_NAMESPACE, ""),
        o.k8s_pod or labels.get(_K8S_POD, ""), p.training_job or "", p.rank or "",
        o.k8s_container, o.k8s_pod_uid, o.slurm_job, o.slurm_step, o.systemd_unit,
        "" if p.gpu_instance is None else str(p.gpu_instance),
        "" if p.compute_instance is None else str(p.compute_instance),
    ]


def _processes(gpus: tuple[GpuSample, ...], ids: dict[int, list[str]]) -> Iterator[Metric]:
    memory = GaugeMetricFamily("gpu_process_memory_used_bytes", "GPU memory held by one process; attribution "
                               "labels are empty when unknown", labels=PROCESS_LABELS)
    sm = GaugeMetricFamily("gpu_process_sm_utilization_ratio", "Per-process SM utilization where NVML "
                           "samples it, 0..1", labels=PROCESS_LABELS)
    per_container = GaugeMetricFamily("gpu_container_memory_used_bytes", "GPU memory held by a container's "
                                      "processes on this GPU", labels=CONTAINER_LABELS)
    # Where each container label sits in a process's label values.
    picks = [PROCESS_LABELS.index(name) for name in CONTAINER_LABELS[len(GPU_LABELS):]]
    for g in gpus:
        totals: dict[tuple[str, ...], int] = {}
        for p in g.processes:
            labels = _process_labels(ids[g.index], p)
            if p.used_memory_bytes is not None:
                memory.add_metric(labels, float(p.used_memory_bytes))
                if p.container is not None:
                    key = tuple(labels[i] for i in picks)
                    totals[key] = totals.get(key, 0) + p.used_memory_bytes
            if p.sm_utilization_ratio is not None:
                sm.add_metric(labels, p.sm_utilization_ratio)
        for key, total in sorted(totals.items()):
            per_container.add_metric([*ids[g.index], *key], float(total))
    yield from _nonempty(memory)
    yield from _nonempty(sm)
    yield from _nonempty(per_container)


def _nonempty(family: Metric) -> Iterator[Metric]:
    """Families without samples are left out: an absent field has no series, not even HELP/TYPE."""
    if family.samples:
        yield family
