"""The clock and the stamp format every ``*_at`` column uses."""

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
