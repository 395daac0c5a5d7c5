"""Health of an optional attribution source (the Docker engine, the kubelet): is it answering, how often
did it fail and why, and one log line per outage and one per recovery however many calls fail between.

Each source keeps its own timing (retry, refresh, staleness); what they share is this bookkeeping, which
the self-metrics (``gpu_exporter_docker_up`` / ``gpu_exporter_attribution_up`` and their
``_errors_total{kind}``) render.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass


class SourceUnavailable(Exception):
    """A source could not be asked. ``kind`` is the bounded label value for errors_total."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class SourceStats:
    """What the self-metrics show for one source."""

    up: bool | None  # None until first asked
    errors: dict[str, int]


class SourceHealth:
    """Up/down and errors by kind for one source; logs to ``log`` on each change of state only.

    ``name`` says which source ("Docker engine at unix:///…"); ``while_down`` what the exporter does
    meanwhile (the end of the outage warning).
    """

    def __init__(self, log: logging.Logger, name: str, while_down: str) -> None:
        self._log = log
        self.name = name
        self.while_down = while_down
        self._lock = threading.Lock()
        self._up: bool | None = None
        self._errors: dict[str, int] = {}

    @property
    def up(self) -> bool | None:
        return self._up

    def failed(self, exc: SourceUnavailable) -> None:
        with self._lock:
            self._errors[exc.kind] = self._errors.get(exc.kind, 0) + 1
            was_up, self._up = self._up, False
        if was_up is not False:
            self._log.warning("%s unavailable (%s: %s); %s", self.name, exc.kind, exc, self.while_down)

    def answered(self) -> None:
        with self._lock:
            was_up, self._up = self._up, True
        if was_up is False:
            self._log.info("%s answers again", self.name)

    def stats(self) -> SourceStats:
        with self._lock:
            return SourceStats(self._up, dict(self._errors))
