"""What the hook accepts from the training code's calls, checked before anything is recorded.

A NaN/Inf, a negative amount, a bool, a string or a tensor (reading a CUDA tensor would synchronise
the device) is refused here; the monitor drops it and counts it in ``invalid_values``
(``training_hook_invalid_values_total``), so no argument can make every later push invalid.
Labels are cut to the schema's length and never carry lone surrogates (the exporter refuses those).
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
from typing import Any

from exporter.hook.schema import MAX_LABEL_LENGTH, NONFINITE_ALLOWED

log = logging.getLogger("exporter.hook")
_AMOUNTS = frozenset({"samples", "tokens", "requested_bytes", "free_bytes"})


def checked_number(value: Any, *, nonneg: bool = False) -> float | None:
    """``value`` as a finite float (non-negative with ``nonneg``), or None. Ints, floats and other real
    scalars (numpy) pass; bools, strings, tensors and anything else do not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(number) or (nonneg and number < 0):
        return None
    return number


def label(value: object) -> str:
    """A label value as sent: ``str(value)``, at most MAX_LABEL_LENGTH characters, valid UTF-8."""
    return str(value)[:MAX_LABEL_LENGTH].encode("utf-8", "replace").decode("utf-8")


def service_name(value: Any) -> str | None:
    """A service name as sent (a non-empty string), or None."""
    return label(value) if isinstance(value, str) and value else None


def short_repr(value: Any) -> str:
    """``repr(value)`` for a log line: at most 60 characters, never raising."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def status_label(value: Any) -> str | None:
    """An auth failure's status as sent: an int as its digits, a non-empty string as is; else None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return label(value) if isinstance(value, str) and value else None


def drop_unsendable(counters: dict[str, float], gauges: dict[str, float | None]) -> list[tuple[str, Any]]:
    """Remove what the exporter would refuse (counters: negative or non-finite; gauges: non-finite,
    except the loss) from a payload being built; return what was removed."""
    dropped: list[tuple[str, Any]] = []
    for key, value in list(counters.items()):
        if not 0 <= value < math.inf:
            dropped.append((key, counters.pop(key)))
    for key, gauge in list(gauges.items()):
        if gauge is not None and key not in NONFINITE_ALLOWED and not -math.inf < gauge < math.inf:
            dropped.append((key, gauges.pop(key)))
    return dropped


class CheckedInputs:
    """The Monitor's side of the checks: count what was dropped, say so once per kind."""

    _lock: threading.Lock
    _warned: set[str]
    invalid_values: int

    def _number(self, value: Any, what: str, *, nonneg: bool = False, optional: bool = False) -> float | None:
        """``value`` as checked_number gives it, or None after counting it (None passes if ``optional``)."""
        if value is None and optional:
            return None
        number = checked_number(value, nonneg=nonneg)
        if number is None:
            self._invalid(what, value)
        return number

    def _service(self, service: Any, what: str) -> str | None:
        name = service_name(service)
        if name is None:
            self._invalid(what, service)
        return name

    def _invalid(self, what: str, value: Any) -> None:
        with self._lock:
            self.invalid_values += 1
        kind = {"service": "a non-empty name", "status_code": "a status code"}.get(
            what, "a finite non-negative number" if what in _AMOUNTS else "a finite number"
        )
        self._warn_once(
            "invalid:" + what,
            f"dropped {what}={short_repr(value)} (not {kind}); counted in training_hook_invalid_values_total",
        )

    def _warn_once(self, key: str, message: str) -> None:
        """Log ``message`` the first time ``key`` comes up (at most a few dozen keys per process)."""
        try:
            if key not in self._warned:
                self._warned.add(key)
                log.warning("gpu-exporter hook: %s", message)
        except Exception:
            pass
