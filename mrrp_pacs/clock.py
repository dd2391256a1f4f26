"""Time as an input: everything that decides by time reads a :data:`Clock`.

A clock is a callable without arguments that returns the current moment as a timezone-aware
``datetime`` in UTC. The product runs on :func:`system_clock`; tests hand in their own (a
fixed or stepping clock, ``tests/support/clocks.py``) so that no test compares a date literal
with the wall clock, and the suite passes on any day.

The clock travels with the :class:`~mrrp_pacs.store.Store` (``store.clock``): intake stamps
``received_at`` with it, scoring measures the wait for a missing modality with it, the outbox
schedules its retries with it, and the daemon's scheduler starts its catch-up runs from it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]
"""Returns now, timezone-aware, in UTC."""


def system_clock() -> datetime:
    """The wall clock (UTC)."""
    return datetime.now(UTC)


def iso_utc(moment: datetime) -> str:
    """The stamp of ``*_at`` columns: UTC, ISO 8601, second precision, ``Z`` suffix.

    Stamps of this one form compare correctly as strings (SQL ``<=`` and ``MIN``).

    Raises
    ------
    ValueError
        ``moment`` has no time zone (a naive time is ambiguous: local or UTC?).
    """
    if moment.tzinfo is None:
        raise ValueError(f"a stamp needs a timezone-aware time, got naive {moment.isoformat()}")
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
