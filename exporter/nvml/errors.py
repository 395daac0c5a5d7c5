"""NVML's return codes, known in one place: which ones mean "this field is not available" and which
ones mean "this GPU is in trouble", and the short error kinds the self-metrics use.

``FieldReader.get`` is the one helper every per-field NVML call goes through (nvitop's idea): a
field-level refusal makes the field *absent* (and, for "not supported", listed in
``GpuSample.unsupported``), never a zero and never a failed poll; any other error propagates and marks
the GPU down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import pynvml

log = logging.getLogger(__name__)

T = TypeVar("T")

# NVML return codes that mean "this GPU cannot give this one field", not "this GPU is broken".
FIELD_LEVEL_ERRORS = frozenset({
    pynvml.NVML_ERROR_NOT_SUPPORTED,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_NO_PERMISSION,
    pynvml.NVML_ERROR_INVALID_ARGUMENT,
    pynvml.NVML_ERROR_NOT_FOUND,
    pynvml.NVML_ERROR_NO_DATA,
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
})
UNSUPPORTED_ERRORS = frozenset({
    pynvml.NVML_ERROR_NOT_SUPPORTED,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,  # an older driver without this call
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,  # an older driver without this struct version
})
# Error kinds (the ``error`` of a down GPU and the ``kind`` label of gpu_exporter_poll_errors_total).
_ERROR_KINDS = {
    pynvml.NVML_ERROR_GPU_IS_LOST: "gpu_lost",
    pynvml.NVML_ERROR_TIMEOUT: "timeout",
    pynvml.NVML_ERROR_NOT_FOUND: "not_found",
    pynvml.NVML_ERROR_NO_PERMISSION: "no_permission",
    pynvml.NVML_ERROR_RESET_REQUIRED: "reset_required",
    pynvml.NVML_ERROR_DRIVER_NOT_LOADED: "driver_not_loaded",
    pynvml.NVML_ERROR_LIBRARY_NOT_FOUND: "library_not_found",
    pynvml.NVML_ERROR_UNINITIALIZED: "uninitialized",
    pynvml.NVML_ERROR_INSUFFICIENT_POWER: "insufficient_power",
    pynvml.NVML_ERROR_IRQ_ISSUE: "irq_issue",
}


def error_kind(exc: BaseException) -> str:
    """Short snake_case name for an NVML error (``gpu_lost``, ``timeout``, ...; ``unknown`` otherwise)."""
    if isinstance(exc, pynvml.NVMLError):
        return _ERROR_KINDS.get(exc.value, "unknown")
    return "unknown"


class FieldReader:
    """Reads one GPU for one poll; collects "not supported" fields instead of failing on them."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.unsupported: set[str] = set()

    def get(self, field: str, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(handle, *args)``; None when NVML refuses this field, raises when the GPU is in trouble."""
        try:
            return fn(self.handle, *args)
        except pynvml.NVMLError as exc:
            if exc.value in UNSUPPORTED_ERRORS:
                self.unsupported.add(field)
                return None
            if exc.value in FIELD_LEVEL_ERRORS:
                log.debug("NVML %s: %s for %s", fn.__name__, exc, field)
                return None
            raise
