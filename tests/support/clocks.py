"""Clocks for tests: time is an input, never the wall clock compared with a date literal."""

from datetime import UTC, datetime, timedelta

START = datetime(2031, 3, 9, 9, 30, tzinfo=UTC)
"""Where a test clock starts: any fixed moment works, since every stamp the code under test
writes or compares comes from the same clock."""


class SteppingClock:
    """Stands still at ``start`` until a test moves it (:meth:`advance`, :meth:`set`)."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        """Move forward (or back, with negative values) by ``timedelta(**delta)``."""
        self.now += timedelta(**delta)
        return self.now

    def set(self, moment: datetime) -> datetime:
        self.now = moment
        return self.now
