"""The nightly rescoring's trigger: a cron time in a named zone, once per local day.

APScheduler's :class:`~apscheduler.triggers.cron.CronTrigger` in a named zone keeps the local
time across daylight saving changes, but a time inside the hour that autumn repeats (e.g.
02:30 in Europe/Berlin on the last Sunday of October) matches twice, an hour apart, and so
fires twice: a second full rescoring, hours of extraction, one hour after the first.
:class:`LocalCronTrigger` fires once, at the first of the two. A time inside the hour that
spring skips (02:30 on the last Sunday of March) has no match that night; APScheduler then
fires an hour later by the wall clock (03:30 summer time), once.

This module is imported by name from the scheduler's job store (the trigger is pickled there),
so it must keep its name and place.
"""

from __future__ import annotations

from datetime import datetime, tzinfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger


class LocalCronTrigger(CronTrigger):  # type: ignore[misc]
    """A :class:`CronTrigger` that never fires twice at the same local wall-clock time."""

    def get_next_fire_time(self, previous_fire_time: datetime | None,
                           now: datetime) -> datetime | None:
        fire = super().get_next_fire_time(previous_fire_time, now)
        if fire is not None and previous_fire_time is not None \
                and _wall(fire, self.timezone) == _wall(previous_fire_time, self.timezone):
            # the repeated hour: the same local time again, an hour later; the next one after
            fire = super().get_next_fire_time(fire, fire)
        return fire  # type: ignore[no-any-return]


def _wall(moment: datetime, zone: tzinfo) -> datetime:
    """The local wall-clock time of ``moment`` in ``zone``, naive (its fold ignored by ==)."""
    return moment.astimezone(zone).replace(tzinfo=None)


def same_trigger(stored: BaseTrigger, wanted: BaseTrigger) -> bool:
    """Whether a job stored by an earlier start fires as ``wanted`` does, so that it is kept
    with its next run time (a missed night then still runs at start).

    Compares the class and the zone as well as the fields: ``str()`` of a cron trigger names
    its fields only, so a job stored with a fixed UTC offset (which moves the nightly run by an
    hour at each daylight saving change) or with another ``[scoring] timezone`` would
    otherwise be kept for ever.
    """
    return (type(stored) is type(wanted) and str(stored) == str(wanted)
            and str(getattr(stored, "timezone", None)) == str(getattr(wanted, "timezone", None)))
