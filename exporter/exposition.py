"""The /metrics body: every collector rendered to bytes, cached per data generation.

A scrape must be cheap (the issue's budget is about 1 ms of CPU), but rendering 8 GPUs' worth of metric
families with prometheus_client costs more than that. The data only changes when the poller (or the
training ingest) produces something new, so each ``Source`` says which generation of data it would
render (``generation()``); its bytes are cached per format and re-rendered only when that changes.
Sources without a generation (the exporter's own health: snapshot age, scrape timings) are rendered on
every scrape; they are small.

Formats: the classic text format (0.0.4) and OpenMetrics 1.0.0, chosen from the Accept header.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as om_format
from prometheus_client.utils import floatToGoString

# Metric and label names our collectors use are legacy-valid; a family whose name is not (or whose
# labels are not) takes prometheus_client's general path, which knows the UTF-8 quoting rules.
_LEGACY_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$").match

log = logging.getLogger(__name__)

TEXT = "text"
OPENMETRICS = "openmetrics"
CONTENT_TYPES = {
    TEXT: "text/plain; version=0.0.4; charset=utf-8",
    OPENMETRICS: "application/openmetrics-text; version=1.0.0; charset=utf-8",
}
_OM_EOF = b"# EOF\n"


class Collector(Protocol):
    """A prometheus_client custom collector: ``collect()`` yields metric families."""

    def collect(self) -> Iterable[Any]: ...


@dataclass
class Source:
    """One named collector in the exposition (its name is the ``collector`` label of the self-metrics).

    ``generation`` returns a token that changes whenever the collector's output would change (e.g. the
    poller's snapshot counter); None means "render on every scrape".
    """

    name: str
    collector: Collector
    generation: Callable[[], object] | None = None
    # Filled by the renderer:
    last_success: bool = True
    last_duration_seconds: float = 0.0
    last_series: int = 0  # samples (lines that are not comments) in its last rendering
    _cache: dict[str, tuple[object, bytes]] = field(default_factory=dict, repr=False)


def _hit(cached: tuple[object, bytes] | None, key: object) -> bool:
    """Does a cache entry hold the rendering of generation ``key``?"""
    return cached is not None and (cached[0] is key or cached[0] == key)


class _One:
    """Adapts a single collector to the ``registry.collect()`` shape prometheus_client renders."""

    __slots__ = ("collector",)

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def collect(self) -> Iterable[Any]:
        return self.collector.collect()


def negotiate(accept: str | None) -> str:
    """TEXT or OPENMETRICS for an Accept header (OpenMetrics only when the client asks for it)."""
    if not accept or "openmetrics" not in accept:
        return TEXT
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if media != "application/openmetrics-text":
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > 0:
            return OPENMETRICS
    return TEXT


def _render(collector: Collector, fmt: str) -> bytes:
    if fmt == OPENMETRICS:
        body = om_format.generate_latest(_One(collector))
        return body[: -len(_OM_EOF)] if body.endswith(_OM_EOF) else body
    return render_text(collector.collect())


class _Families:
    """A fixed list of families in the ``registry.collect()`` shape (for the general renderer)."""

    __slots__ = ("families",)

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterable[Any]:
        return self.families


_ESCAPE_LABEL_VALUE = str.maketrans({"\\": r"\\", "\n": r"\n", '"': r'\"'})
_TEXT_TYPES = {"info": "gauge", "stateset": "gauge", "unknown": "untyped"}
_SIMPLE_TYPES = frozenset({"gauge", "counter", "info", "stateset", "unknown"})


def render_text(families: Iterable[Any]) -> bytes:
    """The classic text format, byte for byte what ``prometheus_client.generate_latest`` writes.

    About twice as fast for the simple families our collectors emit (no per-label name escaping, one
    ``str.translate`` per label value), which halves the poller's render cost per snapshot; anything
    unusual (summaries, histograms, timestamps, ``_created`` samples, non-legacy names) goes through
    prometheus_client itself. tests/test_exposition_text.py holds the two outputs equal.
    """
    out: list[str] = []
    append = out.append
    for family in families:
        name, kind = family.name, family.type
        samples = family.samples
        if kind not in _SIMPLE_TYPES or not _LEGACY_NAME(name) or (
            samples and not all(_LEGACY_NAME(k) for k in samples[0].labels)  # our families: same keys throughout
        ) or any(
            s.timestamp is not None or s.exemplar is not None or s.name.endswith("_created") for s in samples
        ):
            append(text_format.generate_latest(_Families([family])).decode())
            continue
        if kind == "counter":
            name += "_total"
        elif kind == "info":
            name += "_info"
        doc = family.documentation.replace("\\", r"\\").replace("\n", r"\n")
        append(f"# HELP {name} {doc}\n# TYPE {name} {_TEXT_TYPES.get(kind, kind)}\n")
        for s in samples:
            if s.labels:
                labels = ",".join([f'{k}="{v.translate(_ESCAPE_LABEL_VALUE)}"' for k, v in sorted(s.labels.items())])
                append(f"{s.name}{{{labels}}} {floatToGoString(s.value)}\n")
            else:
                append(f"{s.name} {floatToGoString(s.value)}\n")
    return "".join(out).encode()


class Exposition:
    """Renders the sources in order; the uncached ones last, so they can report on this very render."""

    # Pre-render after a poll only while someone scrapes: an exporter nobody scrapes costs its polls and
    # nothing more, and any sane scrape interval (<= this window) keeps every scrape on cached bytes.
    WARM_WHILE_SCRAPED_SECONDS = 300.0

    def __init__(self, sources: Sequence[Source] = ()) -> None:
        self.sources: list[Source] = []
        # When each format was last scraped (Prometheus negotiates OpenMetrics, curl gets text);
        # replaced, never mutated, so the poller thread can read it while a scrape updates it.
        self.last_scraped: dict[str, float] = {}
        for source in sources:
            self.add(source)

    def add(self, source: Source) -> None:
        if any(s.name == source.name for s in self.sources):
            raise ValueError(f"duplicate collector name {source.name!r}")
        self.sources.append(source)
        # Cached sources first, per-scrape ones (self-metrics) after them.
        self.sources.sort(key=lambda s: s.generation is None)

    def warm(self) -> bool:
        """Render the cached sources now (called on the poller thread after a new snapshot) in each
        format scraped within ``WARM_WHILE_SCRAPED_SECONDS``; return whether it rendered any."""
        now = time.monotonic()
        formats = [fmt for fmt, at in self.last_scraped.items() if now - at <= self.WARM_WHILE_SCRAPED_SECONDS]
        for fmt in formats:
            for source in self.sources:
                if source.generation is not None:
                    self._part(source, fmt)
        return bool(formats)

    def is_cached(self, fmt: str = TEXT) -> bool:
        """True when every cached source holds a rendering of its current generation in ``fmt``."""
        return all(
            _hit(source._cache.get(fmt), source.generation())
            for source in self.sources
            if source.generation is not None
        )

    def render(self, fmt: str = TEXT) -> bytes:
        self.last_scraped = {**self.last_scraped, fmt: time.monotonic()}
        parts = [self._part(source, fmt) for source in self.sources]
        if fmt == OPENMETRICS:
            parts.append(_OM_EOF)
        return b"".join(parts)

    def _part(self, source: Source, fmt: str) -> bytes:
        key = source.generation() if source.generation is not None else None
        if source.generation is not None:
            cached = source._cache.get(fmt)
            if cached is not None and _hit(cached, key):
                return cached[1]
        started = time.perf_counter()
        try:
            body = _render(source.collector, fmt)
            ok = True
        except Exception:
            log.exception("collector %s failed to render; its series are left out", source.name)
            body, ok = b"", False
        source.last_duration_seconds = time.perf_counter() - started
        source.last_success = ok
        # Every line ends in "\n" and a comment starts one ("\n" inside a label value is escaped).
        source.last_series = body.count(b"\n") - body.count(b"\n#") - body.startswith(b"#")
        if source.generation is not None:
            # One tuple swapped in: a concurrent reader sees the old or the new entry, never a mix.
            source._cache[fmt] = (key, body)
        return body
