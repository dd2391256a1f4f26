"""Moves this Python process's wall clock ahead when ``MRRP_TEST_CLOCK_AHEAD`` says so.

``make test`` runs the time-sensitive tests a second time with ``MRRP_TEST_CLOCK_AHEAD=+365d``:
the test process travels (``tests/conftest.py`` calls :func:`travel_if_asked`), and so does
every Python process the tests start (the daemon, the demo), since conftest puts
``time_travel/`` on their ``PYTHONPATH`` and Python imports its ``sitecustomize`` at start-up.
Each process moves by the same offset from the real time of its start and then ticks on:
realtime clocks (``time.time``, ``datetime.now``) move, monotonic ones and timed waits do not.
That is why this is done with time-machine and not libfaketime: its ``LD_PRELOAD`` also shifts
the monotonic clock, and a timed lock wait in Python 3.11 then sleeps for the whole offset
(seen with Debian's faketime 0.9.10; with the monotonic clock excluded, ``time.sleep`` fails
with EINVAL instead). Programs that are not Python (Orthanc, dcmtk, R) keep the real time.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta

VARIABLE = "MRRP_TEST_CLOCK_AHEAD"
_UNITS_S = {"d": 86_400, "y": 365 * 86_400}


def offset(text: str) -> timedelta:
    """``+<n>d`` or ``+<n>y`` (365 days a year) as a timedelta."""
    match = re.fullmatch(r"\+(\d+)([dy])", text)
    if not match:
        raise ValueError(f"{VARIABLE}={text!r}: expected +<n>d or +<n>y, e.g. +365d")
    return timedelta(seconds=int(match[1]) * _UNITS_S[match[2]])


_travelling: timedelta | None = None  # the offset once this process travels


def travel_if_asked() -> timedelta:
    """Start travelling by ``$MRRP_TEST_CLOCK_AHEAD`` (if set); returns the offset.

    Once per process: a pytest-xdist worker travels at start-up (``sitecustomize``, since the
    controller put ``time_travel/`` on its ``PYTHONPATH``) and again in its own
    ``pytest_configure``; the second call must not move the clock a second offset ahead.
    """
    global _travelling
    wanted = os.environ.get(VARIABLE)
    if not wanted:
        return timedelta(0)
    if _travelling is not None:
        return _travelling
    ahead = offset(wanted)
    import time_machine

    time_machine.travel(datetime.now(UTC) + ahead, tick=True).start()
    _travelling = ahead
    return ahead

