"""The NVML side: the only package that calls pynvml. ``reader`` polls the node into a
``NodeSnapshot``, ``xid`` listens for XID events, ``errors`` knows NVML's return codes, ``fields``
what each reading means and in which unit, ``field_values`` reads the batched field values (NVLink,
PCIe counters, throttle time, recovery action), ``gpm`` the GPM sample pairs and ``mig`` the MIG
devices."""

from exporter.nvml.errors import error_kind
from exporter.nvml.fields import CLOCK_EVENT_REASONS
from exporter.nvml.reader import NvmlReader

__all__ = ["CLOCK_EVENT_REASONS", "NvmlReader", "error_kind"]
