"""The only module that talks to NVML (through nvidia-ml-py): one poll of the node → ``NodeSnapshot``.

Modelled on nvitop's wrapper: every NVML call goes through one helper that knows NVML's error codes,
so the code above it deals in plain values with units in their names. Three outcomes per call:

- a field-level refusal (``NOT_SUPPORTED``, ``FUNCTION_NOT_FOUND``, ...) makes that field *absent*
  (and recorded in ``GpuSample.unsupported``), never a zero and never a failed poll;
- anything else (``GPU_IS_LOST``, timeouts, unknown errors) marks that GPU down with an error kind, the
  other GPUs keep reporting, and the GPU is read again from scratch on the next poll;
- NVML itself failing (init, device count) gives ``NodeSnapshot(nvml_up=False)``; init is retried on
  the next read.

XID errors are not polled: ``XidListener`` (exporter.nvml.xid) blocks in NVML's event API on its own thread and counts
them per GPU UUID, which the reader copies into each ``GpuSample``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pynvml

from exporter.nvml.errors import FieldReader, error_kind
from exporter.nvml.field_values import DeviceFieldReader
from exporter.nvml.fields import (
    ARCHITECTURES,
    NO_INSTANCE,
    PRE_GPM_ARCHITECTURES,
    PSTATE_UNKNOWN,
    Board,
    Process,
    ProcessList,
    ProcessSamples,
    compute_processes,
    device_address,
    graphics_processes,
    read_board,
    read_clock_event_reasons,
    read_clocks,
    read_ecc,
    read_memory,
    read_retired_pages,
    scaled,
)
from exporter.nvml.gpm import GpmSampler
from exporter.nvml.mig import MigReader
from exporter.nvml.xid import XidListener
from exporter.snapshot import GpuInfo, GpuProcess, GpuSample, MigInstance, NodeSnapshot

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Device:
    """What one NVML session knows about one GPU handle; dropped as a whole when the GPU fails, so a
    recovered GPU is read from scratch: identity, board constants, the field-value plan, the GPM
    sample pair, the per-process utilization cursor, the process-list buffers and the MIG devices."""

    uuid: str
    info: GpuInfo | None = None
    board: Board | None = None
    fields: DeviceFieldReader = field(default_factory=DeviceFieldReader)
    gpm_supported: bool | None = None
    gpm: GpmSampler = field(default_factory=GpmSampler)
    process_samples_since: int = 0  # timestamp of the newest per-process utilization sample seen
    process_samples: ProcessSamples = field(default_factory=ProcessSamples)
    compute: ProcessList = field(default_factory=compute_processes)
    graphics: ProcessList = field(default_factory=graphics_processes)
    mig: MigReader | None = None

    def release(self) -> None:
        self.gpm.free()
        if self.mig is not None:
            self.mig.close()


class NvmlReader:
    """Polls every GPU NVML enumerates; ``read()`` never raises.

    Per NVML session it caches what cannot change (identity, GPM support, the UUID of each handle so a
    GPU that stops answering keeps its identity) and the previous GPM sample of each GPU (GPM metrics
    are rates between two samples, so they appear from the second poll on).
    """

    def __init__(self, host: str, *, xid_retry_seconds: float = 1.0,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self._wall_clock = wall_clock
        self._initialized = False
        self._lock = threading.Lock()  # read() and close() from different threads
        self._xid = XidListener(xid_retry_seconds, wall_clock)
        self._closed = False
        self._system: dict[str, str | None] = {}
        self._devices: dict[int, _Device] = {}  # by handle address, this NVML session only
        self._uuid_by_index: dict[int, str] = {}  # outlives sessions: names a GPU that never answers again
        self._down: set[str] = set()  # UUIDs of GPUs currently down (for logging transitions)
        self._last_info: dict[str, GpuInfo] = {}  # by UUID, outlives NVML sessions
        self._nvml_failing = False

    # --- public -----------------------------------------------------------------------------------

    def read(self) -> NodeSnapshot:
        """One poll of the node. NVML failing → ``nvml_up=False``; a failing GPU → its ``up=False``."""
        with self._lock:
            if self._closed:
                return NodeSnapshot(host=self.host, timestamp_seconds=self._wall_clock(), nvml_up=False)
            self._xid.start()
            try:
                snapshot = self._read()
                self._nvml_failing = False
                return snapshot
            except pynvml.NVMLError as exc:
                # Once per outage: without a driver this would otherwise repeat every poll.
                log.log(logging.DEBUG if self._nvml_failing else logging.WARNING, "NVML unavailable: %s", exc)
            except Exception:
                log.exception("unexpected error reading NVML")
            self._nvml_failing = True
            self._shutdown()
            return NodeSnapshot(host=self.host, timestamp_seconds=self._wall_clock(), nvml_up=False)

    @property
    def xid_listening(self) -> frozenset[str]:
        """UUIDs of the GPUs whose XID events are being received right now (status page, tests)."""
        return self._xid.registered

    def close(self) -> None:
        """Stop the XID listener and release NVML (idempotent)."""
        self._xid.stop()
        # A read stuck in a hung driver call holds the lock: then leave NVML alone rather than hang.
        if not self._lock.acquire(timeout=5.0):
            log.warning("NVML reader busy in a driver call; not shutting NVML down")
            self._closed = True
            return
        try:
            self._closed = True
            self._shutdown()
        finally:
            self._lock.release()

    # --- node -------------------------------------------------------------------------------------

    def _read(self) -> NodeSnapshot:
        if not self._initialized:
            pynvml.nvmlInit()
            self._initialized = True
            self._system = self._read_system()
            log.info("NVML initialised: driver %s, CUDA %s", self._system["driver_version"],
                     self._system["cuda_driver_version"])
        count = pynvml.nvmlDeviceGetCount()
        gpus = tuple(self._read_gpu(index) for index in range(count))
        self._xid.want(frozenset(g.uuid for g in gpus if g.up))
        return NodeSnapshot(
            host=self.host,
            timestamp_seconds=self._wall_clock(),
            nvml_up=True,
            driver_version=self._system.get("driver_version"),
            cuda_driver_version=self._system.get("cuda_driver_version"),
            nvml_version=self._system.get("nvml_version"),
            gpus=gpus,
        )

    @staticmethod
    def _read_system() -> dict[str, str | None]:
        def optional(fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except pynvml.NVMLError:
                return None

        cuda = optional(pynvml.nvmlSystemGetCudaDriverVersion)
        return {
            "driver_version": optional(pynvml.nvmlSystemGetDriverVersion),
            "cuda_driver_version": f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None,
            "nvml_version": optional(pynvml.nvmlSystemGetNVMLVersion),
        }

    def _shutdown(self) -> None:
        """Forget the NVML session (handles die with it) so the next read starts afresh."""
        for device in self._devices.values():
            device.release()
        self._devices.clear()
        if self._initialized:
            self._initialized = False
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()

    # --- one GPU ----------------------------------------------------------------------------------

    def _read_gpu(self, index: int) -> GpuSample:
        handle = None
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return self._read_device(index, handle)
        except Exception as exc:  # NVML errors, and anything unexpected: only this GPU is marked down
            kind = error_kind(exc)
            if not isinstance(exc, pynvml.NVMLError):
                log.exception("unexpected error reading GPU %d", index)
            # Forget this GPU's session state, so a recovered GPU is read from scratch.
            device = self._devices.pop(device_address(handle), None) if handle is not None else None
            if device is not None:
                device.release()
            uuid = device.uuid if device is not None else self._uuid_by_index.get(index, "unknown")
            if uuid not in self._down:  # once per outage, not once per poll
                log.warning("GPU %d (%s) down: %s", index, uuid, exc)
                self._down.add(uuid)
            # Last known identity stays, so gpu_info still names the GPU whose gpu_up is 0.
            return GpuSample(index=index, uuid=uuid, up=False, error=kind, info=self._last_info.get(uuid),
                             xid_errors=self._xid.counts(uuid))

    def _read_device(self, index: int, handle: Any) -> GpuSample:
        r = FieldReader(handle)
        uuid = pynvml.nvmlDeviceGetUUID(handle)  # also the liveness probe: raises for a lost GPU
        key = device_address(handle)
        device = self._devices.get(key)
        if device is None or device.uuid != uuid:
            device = self._devices[key] = _Device(uuid)
        self._uuid_by_index[index] = uuid
        if uuid in self._down:
            log.warning("GPU %d (%s) answers again", index, uuid)
            self._down.discard(uuid)
        info = device.info
        if info is None:
            info = device.info = self._read_info(r)
        board = device.board
        if board is None:
            board = device.board = read_board(r)
        r.unsupported |= board.unsupported
        mig = r.get("mig_mode", pynvml.nvmlDeviceGetMigMode)
        mig_mode = None if mig is None else "enabled" if mig[0] == pynvml.NVML_DEVICE_MIG_ENABLE else "disabled"
        if info.mig_mode != mig_mode:  # the only identity fact that changes (after a GPU reset)
            info = device.info = replace(info, mig_mode=mig_mode)
        self._last_info[uuid] = info

        util = r.get("utilization_gpu_ratio", pynvml.nvmlDeviceGetUtilizationRates)
        if util is None and "utilization_gpu_ratio" in r.unsupported:
            r.unsupported.add("utilization_memory_ratio")  # one NVML call answers both
        mem = read_memory(r)
        fan = r.get("fan_speed_ratio", pynvml.nvmlDeviceGetFanSpeed)
        pstate = r.get("performance_state", pynvml.nvmlDeviceGetPerformanceState)
        power = r.get("power_usage_watts", pynvml.nvmlDeviceGetPowerUsage)
        limit = r.get("power_limit_watts", pynvml.nvmlDeviceGetEnforcedPowerLimit)
        energy = r.get("energy_consumed_joules", pynvml.nvmlDeviceGetTotalEnergyConsumption)
        temp = r.get("temperature_gpu_celsius", pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU)
        tx = r.get("pcie_tx_bytes_per_second", pynvml.nvmlDeviceGetPcieThroughput, pynvml.NVML_PCIE_UTIL_TX_BYTES)
        rx = r.get("pcie_rx_bytes_per_second", pynvml.nvmlDeviceGetPcieThroughput, pynvml.NVML_PCIE_UTIL_RX_BYTES)
        pcie_gen = r.get("pcie_link_generation", pynvml.nvmlDeviceGetCurrPcieLinkGeneration)
        pcie_width = r.get("pcie_link_width_lanes", pynvml.nvmlDeviceGetCurrPcieLinkWidth)
        fields = device.fields.read(r)  # NVLink, PCIe counters, throttle time, recovery action, ...
        pending_pages = r.get("retired_pages_pending", pynvml.nvmlDeviceGetRetiredPagesPendingStatus)
        remapped = r.get("remapped_rows", pynvml.nvmlDeviceGetRemappedRows)
        if remapped is None and "remapped_rows" in r.unsupported:
            r.unsupported |= {"remapped_rows_pending", "remapped_rows_failure"}

        gpu_util, memory_util = (util.gpu, util.memory) if util is not None else (None, None)
        sample = GpuSample(
            index=index,
            uuid=uuid,
            info=info,
            utilization_gpu_ratio=scaled(gpu_util, per=100),
            utilization_memory_ratio=scaled(memory_util, per=100),
            memory_used_bytes=mem[0],
            memory_free_bytes=mem[1],
            memory_total_bytes=mem[2],
            memory_reserved_bytes=mem[3],
            temperature_gpu_celsius=scaled(temp),
            temperature_memory_celsius=fields.memory_temperature,
            temperature_thresholds_celsius=board.thresholds,
            power_usage_watts=scaled(power, per=1000),
            power_limit_watts=scaled(limit, per=1000),
            energy_consumed_joules=scaled(energy, per=1000),
            clocks_hertz=read_clocks(r, "clocks_hertz", pynvml.nvmlDeviceGetClockInfo),
            clocks_max_hertz=board.clocks_max,
            clock_event_reasons=read_clock_event_reasons(r, board.supported_reasons),
            fan_speed_ratio=scaled(fan, per=100),
            performance_state=pstate if pstate is not None and pstate != PSTATE_UNKNOWN else None,
            pcie_tx_bytes_per_second=scaled(tx, times=1000),
            pcie_rx_bytes_per_second=scaled(rx, times=1000),
            pcie_replay_errors=fields.pcie_replay_errors,
            pcie_link_generation=pcie_gen,
            pcie_link_generation_max=board.pcie_generation_max,
            pcie_link_generation_device_max=board.pcie_generation_device_max,
            pcie_link_width_lanes=pcie_width,
            pcie_link_width_max_lanes=board.pcie_width_max,
            pcie_errors=fields.pcie_errors,
            nvlink_up=fields.nvlink_up,
            nvlink_errors=fields.nvlink_errors,
            nvlink_bytes=fields.nvlink_bytes,
            throttle_seconds=fields.throttle_seconds,
            recovery_action=fields.recovery_action,
            ecc_errors=read_ecc(r),
            retired_pages=read_retired_pages(r),
            retired_pages_pending=bool(pending_pages) if pending_pages is not None else None,
            remapped_rows=({"correctable": remapped[0], "uncorrectable": remapped[1]} if remapped else {}),
            remapped_rows_pending=bool(remapped[2]) if remapped else None,
            remapped_rows_failure=bool(remapped[3]) if remapped else None,
            gpm_ratios=self._gpm(r, device),
            mig_instances=self._mig(r, device, mig_mode),
            xid_errors=self._xid.counts(uuid),
            processes=self._processes(r, device, mig_mode == "enabled"),
        )
        return replace(sample, unsupported=frozenset(r.unsupported)) if r.unsupported else sample

    def _read_info(self, r: FieldReader) -> GpuInfo:
        handle = r.handle
        arch = r.get("architecture", pynvml.nvmlDeviceGetArchitecture)
        return GpuInfo(
            name=pynvml.nvmlDeviceGetName(handle),
            pci_bus_id=pynvml.nvmlDeviceGetPciInfo(handle).busId,
            serial=r.get("serial", pynvml.nvmlDeviceGetSerial),
            vbios_version=r.get("vbios_version", pynvml.nvmlDeviceGetVbiosVersion),
            architecture=ARCHITECTURES.get(arch) if arch is not None else None,
        )

    @staticmethod
    def _gpm(r: FieldReader, device: _Device) -> dict[str, float]:
        """GPM metrics are rates between two samples: the device's sampler pair keeps the previous one."""
        if device.gpm_supported is None:
            if device.info is not None and device.info.architecture in PRE_GPM_ARCHITECTURES:
                device.gpm_supported = False
            else:
                support = r.get("gpm_ratios", pynvml.nvmlGpmQueryDeviceSupport)
                device.gpm_supported = bool(support and support.isSupportedDevice)
        if not device.gpm_supported:
            r.unsupported.add("gpm_ratios")
            return {}
        return device.gpm.read(lambda buffer: r.get("gpm_ratios", pynvml.nvmlGpmSampleGet, buffer)) or {}

    @staticmethod
    def _mig(r: FieldReader, device: _Device, mig_mode: str | None) -> tuple[MigInstance, ...]:
        """MIG devices while the GPU is in MIG mode; nothing otherwise."""
        if mig_mode != "enabled":
            if device.mig is not None:
                device.mig.close()
                device.mig = None
            return ()
        if device.mig is None:
            device.mig = MigReader()
        return device.mig.read(r.handle, bool(device.gpm_supported))

    def _processes(self, r: FieldReader, device: _Device, mig: bool) -> tuple[GpuProcess, ...]:
        """Compute and graphics processes, one entry per PID (a process with both kinds of context is
        listed by NVML twice; it counts as compute), with SM utilization where NVML samples it and,
        on a MIG GPU, the GPU / compute instance NVML names for it."""
        by_pid: dict[int, tuple[str, Process]] = {}
        for ptype, plist in (("compute", device.compute), ("graphics", device.graphics)):
            for p in r.get("processes", plist.read) or ():
                if p.pid not in by_pid:
                    by_pid[p.pid] = (ptype, p)
        if not by_pid:
            return ()
        sm: dict[int, tuple[int, float]] = {}  # pid -> (timestamp, ratio) of its newest sample
        since = device.process_samples_since
        for pid, ts, sm_percent in r.get("process_sm_utilization_ratio", device.process_samples.read, since) or ():
            if pid not in sm or ts >= sm[pid][0]:
                sm[pid] = (ts, min(1.0, sm_percent / 100.0))
        if sm:
            device.process_samples_since = max(ts for ts, _ in sm.values())
        return tuple(
            GpuProcess(
                pid=pid,
                process_type=ptype,
                used_memory_bytes=p.used_memory_bytes,
                sm_utilization_ratio=sm[pid][1] if pid in sm else None,
                gpu_instance=_instance(p.gpu_instance, mig),
                compute_instance=_instance(p.compute_instance, mig),
            )
            for pid, (ptype, p) in sorted(by_pid.items())
        )


def _instance(value: int, mig: bool) -> int | None:
    return int(value) if mig and value != NO_INSTANCE else None
