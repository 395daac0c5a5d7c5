"""The NVML side: the only package that calls pynvml. ``reader`` polls the node into a
``NodeSnapshot``, ``xid`` listens for XID events, ``errors`` knows NVML's return codes and ``fields``
what each reading means and in which unit."""

from exporter.nvml.errors import error_kind
from exporter.nvml.fields import CLOCK_EVENT_REASONS
from exporter.nvml.reader import NvmlReader

__all__ = ["CLOCK_EVENT_REASONS", "NvmlReader", "error_kind"]
