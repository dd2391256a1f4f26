"""The clock and the stamp format every ``*_at`` column uses."""

import os
import re
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from mrrp_pacs.clock import iso_utc, system_clock


def test_stamps_are_utc_to_the_second_and_sort_as_text():
    berlin_summer = timezone(timedelta(hours=2))
    assert iso_utc(datetime(2027, 7, 1, 2, 0, 59, 999_000, tzinfo=berlin_summer)) == \
        "2027-07-01T00:00:59Z"
    early, late = datetime(2027, 1, 1, 23, tzinfo=UTC), datetime(2027, 1, 2, 1, tzinfo=UTC)
    assert iso_utc(early) < iso_utc(late)


def test_a_naive_time_is_refused():
    with pytest.raises(ValueError, match="timezone-aware"):
        iso_utc(datetime(2027, 1, 1, 12))


def test_the_system_clock_is_timezone_aware_utc():
    assert system_clock().utcoffset() == timedelta(0)


def _real_now_s() -> float:
    """The kernel's boot time plus its uptime: read from /proc, which libfaketime leaves alone."""
    with open("/proc/stat") as stat:
        boot_s = next(int(line.split()[1]) for line in stat if line.startswith("btime "))
    with open("/proc/uptime") as uptime:
        return boot_s + float(uptime.read().split()[0])


def test_the_system_clock_is_where_make_test_put_it():
    """``make test``'s second pass sets MRRP_TEST_CLOCK_AHEAD (e.g. +365d) and runs under
    faketime: this proves the clock really moved, so that pass cannot pass by doing nothing."""
    wanted = os.environ.get("MRRP_TEST_CLOCK_AHEAD", "+0d")
    match = re.fullmatch(r"\+(\d+)([dy])", wanted)
    assert match, f"MRRP_TEST_CLOCK_AHEAD={wanted!r}: expected +<n>d or +<n>y"
    ahead_s = int(match[1]) * {"d": 86_400, "y": 365 * 86_400}[match[2]]
    assert abs(time.time() - _real_now_s() - ahead_s) < 120
