"""One clock that tests move by hand, for every component that takes an injectable clock."""

from __future__ import annotations


class FakeClock:
    """Returns ``now`` until a test moves it (``clock.now = ...`` or ``clock.advance(seconds)``)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
