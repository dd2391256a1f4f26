"""Patients whose extraction or scoring failed: retried with backoff, then quarantined.

A failure that is not a feature error (the worker raised, died, or ran over its memory or time
limit: :class:`mrrp_pacs.workers.WorkerFailed`, or scoring raised) is recorded per patient in
``patient_failures``. The patient is skipped until ``next_attempt_at`` (``backoff_s`` after the
first failure, doubling per failure up to :data:`MAX_BACKOFF`), and after ``max_failures``
failures it is **quarantined**: skipped until something new arrives for it (its arrivals digest
changes) or an operator releases it (``mrrp-pacs cases --release KEY``). A patient that scores
loses its row. ``cases``, ``/metrics`` and ``doctor`` show both states.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from mrrp_pacs.clock import iso_utc
from mrrp_pacs.store import Store

MAX_BACKOFF = timedelta(hours=24)
ERROR_CHARS = 500

QUARANTINED, DEFERRED = "quarantined", "deferred"


@dataclass(frozen=True)
class Failure:
    patient_key: str
    arrivals: str | None
    failures: int
    first_failed_at: datetime
    last_failed_at: datetime
    next_attempt_at: datetime
    quarantined_at: datetime | None
    last_error: str

    def holds(self, arrivals: str | None, now: datetime) -> str | None:
        """Why the patient is skipped at ``now`` (:data:`QUARANTINED`, :data:`DEFERRED`), or
        None. New arrivals (another digest) end both: the failure may have been the data's."""
        if arrivals is not None and arrivals != self.arrivals:
            return None
        if self.quarantined_at is not None:
            return QUARANTINED
        return DEFERRED if now < self.next_attempt_at else None

    def describe(self) -> str:
        """One line for ``cases`` (may quote the error, which may name the patient)."""
        if self.quarantined_at is not None:
            return (f"quarantined after {self.failures} failures (last: {self.last_error}); "
                    f"release with `mrrp-pacs cases --release {self.patient_key}`")
        return (f"failed {self.failures}x (last: {self.last_error}); next attempt "
                f"{self.next_attempt_at:%Y-%m-%d %H:%M} UTC")


def failures(store: Store) -> dict[str, Failure]:
    """Every patient with a recorded failure."""
    return {row[0]: Failure(row[0], row[1], int(row[2]), _time(row[3]), _time(row[4]),
                            _time(row[5]), _time(row[6]) if row[6] else None, row[7])
            for row in store.conn.execute(
                "SELECT patient_key, arrivals, failures, first_failed_at, last_failed_at, "
                "next_attempt_at, quarantined_at, last_error FROM patient_failures")}


def record_failure(store: Store, patient_key: str, arrivals: str | None, error: str,
                   now: datetime, *, backoff_s: float, max_failures: int) -> Failure:
    """Count one more failure of ``patient_key`` at ``now`` (a first one after new arrivals
    starts the count again); returns the patient's record."""
    previous = failures(store).get(patient_key)
    if previous is not None and previous.arrivals == arrivals:
        count, first = previous.failures + 1, previous.first_failed_at
    else:
        count, first = 1, now
    delay = min(timedelta(seconds=backoff_s * 2 ** (count - 1)), MAX_BACKOFF)
    quarantined = now if max_failures and count >= max_failures else None
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO patient_failures (patient_key, arrivals, failures, first_failed_at, "
            "last_failed_at, next_attempt_at, quarantined_at, last_error) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (patient_key) DO UPDATE SET "
            "arrivals = excluded.arrivals, failures = excluded.failures, "
            "first_failed_at = excluded.first_failed_at, last_failed_at = excluded.last_failed_at, "
            "next_attempt_at = excluded.next_attempt_at, quarantined_at = excluded.quarantined_at, "
            "last_error = excluded.last_error",
            (patient_key, arrivals, count, iso_utc(first), iso_utc(now), iso_utc(now + delay),
             iso_utc(quarantined) if quarantined else None, error[:ERROR_CHARS]))
    return failures(store)[patient_key]


def clear(store: Store, patient_key: str) -> bool:
    """Forget the failures of ``patient_key`` (it scored, or an operator released it)."""
    with store.transaction() as conn:
        return conn.execute("DELETE FROM patient_failures WHERE patient_key = ?",
                            (patient_key,)).rowcount > 0


def counts(store: Store) -> dict[str, int]:
    """Patients quarantined and patients failing (retried later), for ``/metrics``."""
    found = failures(store).values()
    quarantined = sum(f.quarantined_at is not None for f in found)
    return {QUARANTINED: quarantined, "failing": len(found) - quarantined}


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp).astimezone(UTC)
