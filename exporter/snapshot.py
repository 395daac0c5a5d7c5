"""Plain data shared by every part of the exporter: one poll of the node, in base units.

The NVML reader produces these values, the poller swaps a new ``NodeSnapshot`` in atomically, and the
collectors turn the latest one into metric families at scrape time. Nothing here talks to NVML,
Docker or HTTP, and this module imports nothing but the standard library.

Convention: a field that is ``None`` (or missing from a dict) is *absent*: the GPU does not support
it or the driver would not say. Absent fields produce no series; they never produce a zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """The container a process runs in, as the Docker engine describes it."""

    id: str
    name: str
    image: str
    # Selected labels only (compose project/service, Kubernetes pod/namespace/container).
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """One process holding a context on one GPU (host PID namespace)."""

    pid: int
    process_type: str  # "compute" | "graphics"
    used_memory_bytes: int | None = None
    sm_utilization_ratio: float | None = None
    container: ContainerInfo | None = None
    # Filled by the training PID join (exporter.attribution.training): which job and rank own this PID.
    training_job: str | None = None
    rank: str | None = None
    # Filled by exporter.attribution.engine from the cgroup (+ kubelet names; + the hook for Slurm).
    owner: ProcessOwner | None = None
    # MIG: the GPU instance / compute instance the process runs in (None when MIG is off or NVML
    # would not say, e.g. without the privileges to see other users' instances).
    gpu_instance: int | None = None
    compute_instance: int | None = None


@dataclass(frozen=True, slots=True)
class ProcessOwner:
    """Who runs a process beyond its container: Kubernetes pod, Slurm job, or a plain systemd unit."""

    k8s_pod_uid: str = ""
    k8s_namespace: str = ""
    k8s_pod: str = ""
    k8s_container: str = ""
    slurm_job: str = ""
    slurm_step: str = ""
    systemd_unit: str = ""


@dataclass(frozen=True, slots=True)
class GpuAllocation:
    """One holder of one GPU as the workload manager allocated it (kubelet device plugin or DRA).

    ``device_id`` is what the manager calls the device: the GPU's UUID, a MIG device's UUID, a
    time-slicing replica (``GPU-...::2``) or a DRA device name.
    """

    uuid: str
    device_id: str
    resource: str  # e.g. nvidia.com/gpu, or the DRA driver name
    k8s_namespace: str = ""
    k8s_pod: str = ""
    k8s_container: str = ""


@dataclass(frozen=True, slots=True)
class XidCount:
    """How often one XID code was reported for one GPU since the exporter started."""

    count: int
    last_seen_timestamp_seconds: float


@dataclass(frozen=True, slots=True)
class MigInstance:
    """One MIG device (a compute instance inside a GPU instance) of a GPU in MIG mode."""

    gpu_instance: int
    compute_instance: int
    uuid: str  # "MIG-..."
    profile: str | None = None  # e.g. "1g.10gb", from the MIG device's name
    memory_used_bytes: int | None = None  # of the GPU instance (its compute instances share it)
    memory_total_bytes: int | None = None
    # GPM metric ("sm_active", ...) -> ratio 0..1 for the GPU instance (Hopper and newer)
    gpm_ratios: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """Identity and static facts of a GPU: exported once, in the ``gpu_info`` series."""

    name: str
    pci_bus_id: str
    serial: str | None = None
    vbios_version: str | None = None
    mig_mode: str | None = None  # "enabled" | "disabled" | None when not supported
    architecture: str | None = None  # e.g. "hopper"; decides whether GPM is read


@dataclass(frozen=True, slots=True)
class GpuSample:
    """Everything read from one GPU in one poll.

    ``up`` is False when the GPU answered with "GPU is lost" or another error; ``error`` then names the
    kind (e.g. ``gpu_lost``, ``unknown``). A down GPU keeps its identity (index, uuid) so its
    ``gpu_up`` series reads 0 instead of vanishing.
    """

    index: int
    uuid: str
    up: bool = True
    error: str | None = None
    info: GpuInfo | None = None

    utilization_gpu_ratio: float | None = None
    utilization_memory_ratio: float | None = None

    memory_used_bytes: int | None = None
    memory_free_bytes: int | None = None
    memory_total_bytes: int | None = None
    memory_reserved_bytes: int | None = None

    temperature_gpu_celsius: float | None = None
    temperature_memory_celsius: float | None = None
    # threshold name ("slowdown", "shutdown", "gpu_max", "memory_max") -> degrees Celsius
    temperature_thresholds_celsius: dict[str, float] = field(default_factory=dict)

    power_usage_watts: float | None = None
    power_limit_watts: float | None = None
    energy_consumed_joules: float | None = None

    # clock name ("graphics", "sm", "memory") -> Hz
    clocks_hertz: dict[str, float] = field(default_factory=dict)
    clocks_max_hertz: dict[str, float] = field(default_factory=dict)
    # clock-event (throttle) reason, snake_case (e.g. "sw_thermal_slowdown") -> currently active
    clock_event_reasons: dict[str, bool] = field(default_factory=dict)

    fan_speed_ratio: float | None = None
    performance_state: int | None = None

    pcie_tx_bytes_per_second: float | None = None
    pcie_rx_bytes_per_second: float | None = None
    pcie_replay_errors: int | None = None
    # PCIe link: generation and width now, the most this GPU can reach in this slot ("max"), and the
    # card's own maximum generation (a Gen5 card in a Gen4 slot: max 4, device max 5).
    pcie_link_generation: int | None = None
    pcie_link_generation_max: int | None = None
    pcie_link_generation_device_max: int | None = None
    pcie_link_width_lanes: int | None = None
    pcie_link_width_max_lanes: int | None = None
    # PCIe error counter ("correctable", "non_fatal", "fatal", "replay_rollover", ...) -> count
    pcie_errors: dict[str, int] = field(default_factory=dict)

    # NVLink, per link index that exists: up (active) or not; error counters by (link, error
    # "crc_flit"|"crc_data"|"replay"|"recovery"); data bytes by (link, "tx"|"rx").
    nvlink_up: dict[int, bool] = field(default_factory=dict)
    nvlink_errors: dict[tuple[int, str], int] = field(default_factory=dict)
    nvlink_bytes: dict[tuple[int, str], int] = field(default_factory=dict)

    # Cumulative time the clocks were held down, by reason ("power", "thermal", "sync_boost", ...).
    throttle_seconds: dict[str, float] = field(default_factory=dict)

    # What the driver asks to be done to bring the GPU back to health ("none", "gpu_reset",
    # "node_reboot", "drain_p2p", "drain_and_reset", ...); None when the driver cannot say.
    recovery_action: str | None = None

    # MIG devices when the GPU is in MIG mode; empty otherwise.
    mig_instances: tuple[MigInstance, ...] = ()

    # (error_type "corrected"|"uncorrected", counter "volatile"|"aggregate") -> count
    ecc_errors: dict[tuple[str, str], int] = field(default_factory=dict)
    # cause ("single_bit_ecc", "double_bit_ecc") -> retired page count
    retired_pages: dict[str, int] = field(default_factory=dict)
    retired_pages_pending: bool | None = None
    # kind ("correctable", "uncorrectable") -> remapped row count
    remapped_rows: dict[str, int] = field(default_factory=dict)
    remapped_rows_pending: bool | None = None
    remapped_rows_failure: bool | None = None

    # GPM metric ("sm_active", "tensor_active", "dram_bandwidth") -> ratio 0..1 (Hopper and newer)
    gpm_ratios: dict[str, float] = field(default_factory=dict)

    # xid code -> count since start (filled from the NVML event listener, not polled)
    xid_errors: dict[int, XidCount] = field(default_factory=dict)

    processes: tuple[GpuProcess, ...] = ()

    # Names of the fields NVML answered "not supported" for (status page, GPU checks).
    unsupported: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    """One consistent view of the node, replaced as a whole after every poll."""

    host: str
    timestamp_seconds: float  # wall clock (time.time()) when the poll finished
    nvml_up: bool
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # e.g. "12.4"
    nvml_version: str | None = None
    gpus: tuple[GpuSample, ...] = ()
    # Holders of GPUs by allocation (exporter.attribution.engine), also of GPUs with no process on them.
    allocations: tuple[GpuAllocation, ...] = ()
