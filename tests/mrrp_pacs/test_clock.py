"""The clock and the stamp format every ``*_at`` column uses."""

import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone

import clock_travel
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
    """The kernel's boot time plus its uptime: read from /proc, which no clock travel moves."""
    with open("/proc/stat") as stat:
        boot_s = next(int(line.split()[1]) for line in stat if line.startswith("btime "))
    with open("/proc/uptime") as uptime:
        return boot_s + float(uptime.read().split()[0])


def test_the_system_clock_is_where_make_test_put_it():
    """``make test``'s second pass sets MRRP_TEST_CLOCK_AHEAD (e.g. +365d): this proves the
    clock really moved, so that pass cannot pass by doing nothing."""
    ahead = clock_travel.offset(os.environ.get(clock_travel.VARIABLE, "+0d"))
    assert abs(time.time() - _real_now_s() - ahead.total_seconds()) < 120
    assert abs(datetime.now(UTC).timestamp() - _real_now_s() - ahead.total_seconds()) < 120


def test_a_python_process_the_tests_start_travels_too():
    moved = subprocess.run([sys.executable, "-c", "import time; print(time.time())"],
                           capture_output=True, text=True, check=True, timeout=60)
    ahead = clock_travel.offset(os.environ.get(clock_travel.VARIABLE, "+0d"))
    assert abs(float(moved.stdout) - _real_now_s() - ahead.total_seconds()) < 120
