"""CUDA facts the hook reads without ever initialising CUDA or synchronising the device.

torch is never imported here: the hook uses the ``torch`` module the training script already
imported (``sys.modules``), and touches ``torch.cuda`` only once ``torch.cuda.is_initialized()``.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger("exporter.hook")

_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_REQUESTED_RE = re.compile(r"Tried to allocate ([0-9.]+) ?(B|KiB|MiB|GiB|TiB)")
_FREE_RE = re.compile(r"of which ([0-9.]+) ?(B|KiB|MiB|GiB|TiB) is free")


def torch_module() -> Any | None:
    """The torch module if the training process imported it, else None (the hook never imports it)."""
    return sys.modules.get("torch")


def cuda_initialized() -> bool:
    torch = torch_module()
    if torch is None:
        return False
    try:
        return bool(torch.cuda.is_initialized())
    except Exception:
        return False


def is_oom_exception(exc: BaseException) -> bool:
    """True for torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class)."""
    torch = torch_module()
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if isinstance(oom_type, type) and isinstance(exc, oom_type):
        return True
    return type(exc).__name__ == "OutOfMemoryError"


def parse_oom_message(message: str) -> tuple[int | None, int | None]:
    """(requested bytes, free bytes) from PyTorch's CUDA OOM message, when it says them."""

    def grab(pattern: re.Pattern[str]) -> int | None:
        m = pattern.search(message)
        return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None

    return grab(_REQUESTED_RE), grab(_FREE_RE)


def memory_stats(device: int | None) -> dict[str, float] | None:
    """Caching-allocator figures for ``device`` (default: LOCAL_RANK's device), or None before CUDA init.

    ``torch.cuda.memory_stats`` reads host-side counters under the allocator's lock: no device sync.
    """
    if not cuda_initialized():
        return None
    torch = torch_module()
    assert torch is not None
    try:
        index = device if device is not None else 0
        if index >= torch.cuda.device_count():
            # LOCAL_RANK 3 with CUDA_VISIBLE_DEVICES narrowed to one GPU per rank: that GPU is cuda:0.
            index = torch.cuda.current_device()
        stats = torch.cuda.memory_stats(index)
    except Exception as exc:
        log.debug("torch.cuda.memory_stats failed: %s", exc)
        return None
    out: dict[str, float] = {}
    for key, name in (
        ("allocated_bytes.all.current", "cuda_memory_allocated_bytes"),
        ("reserved_bytes.all.current", "cuda_memory_reserved_bytes"),
        ("allocated_bytes.all.peak", "cuda_memory_max_allocated_bytes"),
        ("reserved_bytes.all.peak", "cuda_memory_max_reserved_bytes"),
        ("num_alloc_retries", "cuda_alloc_retries"),
        ("num_ooms", "cuda_oom"),
    ):
        value = stats.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
    return out


def attach_oom_observer(callback: Callable[[int, int, int, int], None]) -> bool:
    """Register ``callback(device, requested, device_allocated, device_free)`` with the CUDA allocator.

    The allocator calls it at the moment of every OOM, before the exception reaches user code, so an
    OOM the training code catches and swallows is still seen. Returns False where torch has no such
    API (CPU builds, old versions) or CUDA is not initialised yet.
    """
    if not cuda_initialized():
        return False
    torch = torch_module()
    attach = getattr(getattr(torch, "_C", None), "_cuda_attach_out_of_memory_observer", None)
    if attach is None:
        return False
    try:
        attach(callback)
    except Exception as exc:
        log.debug("could not attach the CUDA OOM observer: %s", exc)
        return False
    return True


_uuid_cache: dict[int, str] = {}


def device_uuid(device: int | None) -> str:
    """NVML-style UUID ("GPU-...") of the training device, "" before CUDA init. Read from the device
    properties (host-side, cached): no sync. Lets the exporter tie an OOM to its GPU by UUID even when
    CUDA_VISIBLE_DEVICES renumbers devices."""
    if not cuda_initialized():
        return ""
    index = device if device is not None else 0
    cached = _uuid_cache.get(index)
    if cached is not None:
        return cached
    torch = torch_module()
    value = ""
    try:
        if index >= torch.cuda.device_count():  # type: ignore[union-attr]
            index = torch.cuda.current_device()  # type: ignore[union-attr]
        raw = str(torch.cuda.get_device_properties(index).uuid)  # type: ignore[union-attr]
        value = raw if raw.startswith(("GPU-", "MIG-")) else f"GPU-{raw}"
    except Exception as exc:
        log.debug("could not read the CUDA device UUID: %s", exc)
    _uuid_cache[index] = value
    return value


class LossSampler:
    """Reads a CUDA loss tensor without a device sync: async copy to pinned memory + a CUDA event.

    ``offer(tensor)`` starts a non-blocking device-to-host copy and records an event; ``poll()``
    returns the value once the event has completed (``event.query()`` never blocks), else None.
    """

    def __init__(self) -> None:
        self._buf: Any = None
        self._event: Any = None
        self._pending = False

    def offer(self, loss: Any) -> None:
        if self._pending:
            return  # the previous sample is still in flight: never queue more than one
        torch = torch_module()
        if torch is None:
            return
        if self._buf is None:
            self._buf = torch.empty((), dtype=torch.float32, pin_memory=True)
            self._event = torch.cuda.Event()
        self._buf.copy_(loss.detach().reshape(()).float(), non_blocking=True)
        self._event.record()
        self._pending = True

    def poll(self) -> float | None:
        if not self._pending or not self._event.query():
            return None
        self._pending = False
        return float(self._buf.item())  # host memory: no sync
