"""The durable outbox: every object we send out is recorded before any network call.

A row of ``exports`` is written (state ``pending``) when an object is enqueued; :meth:`Outbox.drain`
sends the due rows through one :class:`Sender` per destination and records each outcome in its
own transaction right after that send. A row ends ``sent``, or ``dead`` after a permanent failure
or once transient failures have gone on for the retry budget (``retry_hours``, 72 h by default,
from the first failure); a dead row is kept, with its last error, until an operator calls
:meth:`Outbox.retry`. Rows and objects are never deleted.

A row is keyed by what it carries and where to: (``object_key``, ``destination``), the key being
the SOP Instance UID of a DICOM object or ``hl7:`` + MSH-10 of an HL7 message. Queuing the same
key and destination again with the same bytes returns the first row; with other bytes it is
refused (:class:`ExportConflict`): one UID must never name two documents. The caller passes its
transaction (``conn``) so that every object of one score is queued, or none.

Delivery is **at least once**: a crash between a successful send and the update of its row sends
the object again on restart. That is harmless for DICOM, since the object keeps its SOP Instance
UID and a second C-STORE of the same UID replaces (or is ignored as) the same instance; an HL7
receiver sees the same MSH-10 control id again.

Two drains (the daemon and an operator's ``export``) do not send the same row twice: a row is
claimed, by moving its ``next_attempt_at`` ``claim_s`` into the future, in a transaction of its
own just before it is sent, and the claim names its process (``claimed_by``: host, pid, process
start time). A row claimed by a process of this host that no longer runs (the daemon was killed
while sending) is released at the next drain; one claimed on another host waits ``claim_s``.

Retries back off exponentially (``backoff_s`` doubling up to ``max_backoff_s``) with jitter: each
delay is drawn uniformly from its upper half, so rows that failed together (a PACS maintenance
window) do not all come back in the same second. The last try is placed at the end of the
budget. The random source is injectable (``rng``) for reproducible tests.

Times are UTC and come from the store's clock (``store.clock``, :mod:`mrrp_pacs.clock`); the
``*_at`` columns hold ISO 8601 at second precision (:func:`mrrp_pacs.clock.iso_utc`), so they
compare as strings. ``sent_at`` is the ``updated_at``
of a ``sent`` row: nothing updates a sent row except an explicit :meth:`Outbox.retry`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from mrrp_pacs import audit
from mrrp_pacs.clock import iso_utc
from mrrp_pacs.errors import MrrpError, SendError
from mrrp_pacs.faults import fault_point
from mrrp_pacs.store import ObjectStore, Store

LOGGER = logging.getLogger(__name__)

KINDS = ("sr", "pdf", "hl7")
DEFAULT_RETRY_HOURS = 72.0  # a PACS down for a long weekend loses nothing
DEFAULT_MAX_ATTEMPTS = 0  # no cap on tries: the time budget decides
DEFAULT_BACKOFF_S = 60.0
DEFAULT_MAX_BACKOFF_S = 3600.0
DEFAULT_CLAIM_S = 900.0
ERROR_CHARS = 500

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DESTINATION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class ExportConflict(MrrpError, ValueError):
    """An object whose key (SOP Instance UID or HL7 control id) is already queued for the
    destination with other bytes (``uid``: the key). Nothing is queued."""


class ExportState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class SendSession(Protocol):
    """An open channel to one destination (e.g. one DICOM association)."""

    def send(self, data: bytes) -> None:
        """Deliver one object; raise :class:`SendError` if the peer did not take it."""


class Sender(Protocol):
    """Delivers objects to one destination; :meth:`session` may reuse one connection."""

    @property
    def peer(self) -> str:
        """The destination for logs and errors, e.g. ``PACS@10.1.2.3:104``."""

    def session(self) -> AbstractContextManager[SendSession]:
        """A session for a batch of sends; it connects lazily and closes on exit."""


@dataclass(frozen=True)
class ExportRow:
    """One row of the ``exports`` table."""

    id: int
    score_id: int | None
    kind: str
    destination: str
    object_sha256: str | None
    sop_instance_uid: str | None
    state: str
    attempts: int
    last_error: str | None
    next_attempt_at: str | None
    created_at: str
    updated_at: str
    revision: int = 0
    object_key: str | None = None
    failing_since: str | None = None

    @property
    def sent_at(self) -> str | None:
        return self.updated_at if self.state == ExportState.SENT else None

    def summary(self) -> str:
        """One line for an operator: id, state, kind, destination, attempts, when, error."""
        when = {ExportState.SENT: f"sent {self.sent_at}",
                ExportState.PENDING: f"next {self.next_attempt_at}"}.get(
                    ExportState(self.state), f"since {self.updated_at}")
        line = (f"{self.id:>6}  {self.state:<7} {self.kind:<3} {self.destination}  "
                f"attempts={self.attempts}  {when}  sop={self.sop_instance_uid or '-'}")
        return f"{line}  error: {self.last_error}" if self.last_error else line


@dataclass(frozen=True)
class Enqueued:
    """The row an object is queued in; ``created`` is False when it was already queued."""

    row_id: int
    created: bool


@dataclass
class DrainSummary:
    """What one :meth:`Outbox.drain` did, in rows.

    ``retried``: failed and due again later; ``dead``: failed for the last time;
    ``skipped``: due, but no sender is configured for their destination (left pending).
    """

    sent: int = 0
    retried: int = 0
    dead: int = 0
    skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "retried": self.retried, "dead": self.dead,
                "skipped": self.skipped}

    def __str__(self) -> str:
        return (f"sent {self.sent}, retried {self.retried}, dead {self.dead}, "
                f"skipped {self.skipped}")


class Outbox:
    """The ``exports`` table of ``store``, with the objects kept in ``objects``."""

    def __init__(self, store: Store, objects: ObjectStore | None = None,
                 rng: random.Random | None = None) -> None:
        self.store = store
        self.objects = objects if objects is not None else store.objects
        self.rng = rng if rng is not None else random.Random()  # noqa: S311 (jitter, not crypto)

    def enqueue(self, conn: sqlite3.Connection | None, *, score_id: int | None, kind: str,
                destination: str, data: bytes, sop_instance_uid: str | None,
                revision: int = 0) -> Enqueued:
        """Store ``data`` and queue it for ``destination``, before any network call.

        Parameters
        ----------
        conn
            A connection inside the caller's transaction (so the row commits with, e.g., the
            score row), or None to commit in a transaction of its own.
        score_id
            The ``scores`` row the object reports, if any.
        kind
            ``sr``, ``pdf`` or ``hl7``.
        destination
            The configured destination name (letters, digits, ``_.-``; at most 64 characters).
        data
            The whole object: a DICOM file (Part 10) or an HL7 message.
        sop_instance_uid
            Required for ``sr`` and ``pdf`` (their key); an ``hl7`` row is keyed by MSH-10.
        revision
            The score revision the object reports (``scores.revision``).

        Returns
        -------
        Enqueued
            The same key queued twice for one destination with the same bytes gives one row:
            the second call returns the first row, whatever its state, with ``created`` False.

        Raises
        ------
        ExportConflict
            The key is queued for ``destination`` with other bytes (logged, without the key).
        ValueError
            ``kind``, ``destination`` or ``sop_instance_uid`` is not valid, or an HL7 message
            without MSH-10.
        """
        if kind not in KINDS:
            raise ValueError(f"export kind {kind!r} is not one of {', '.join(KINDS)}")
        if not _DESTINATION.match(destination):
            raise ValueError(f"destination name {destination!r} must be 1-64 letters, digits "
                             "or _.- starting with a letter or digit")
        if kind != "hl7" and (sop_instance_uid is None or len(sop_instance_uid) > 64
                              or not _UID.match(sop_instance_uid)):
            raise ValueError(f"a {kind} export needs a valid SOP Instance UID, "
                             f"got {sop_instance_uid!r}")
        if not data:
            raise ValueError("refusing to queue an empty object")
        key = object_key(kind, data, sop_instance_uid)
        stamp = iso_utc(self.store.clock())  # due at once
        # the object is on disk (fsynced) before its row exists; a crash in between leaves
        # an unreferenced object, never a row without its object
        stored = self.objects.put_bytes(data)
        with self._transaction(conn) as tx:
            found = tx.execute("SELECT id, object_sha256 FROM exports WHERE object_key = ? AND "
                               "destination = ?", (key, destination)).fetchone()
            if found is not None:
                if found["object_sha256"] == stored.sha256:
                    return Enqueued(int(found["id"]), created=False)
                LOGGER.error("refused to queue a %s for %s: export %d holds the same %s with "
                             "other content (%s…, new %s…)", kind, destination, found["id"],
                             "control id" if kind == "hl7" else "SOP Instance UID",
                             str(found["object_sha256"])[:12], stored.sha256[:12])
                raise ExportConflict(
                    f"{'HL7 control id' if kind == 'hl7' else 'SOP Instance UID'} {key} is "
                    f"already queued for {destination} (export {found['id']}) with other "
                    "content; one identifier must not name two documents, so nothing was "
                    "queued", uid=key)
            row_id = self.store.insert(tx, "exports", {
                "score_id": score_id, "kind": kind, "destination": destination,
                "object_sha256": stored.sha256, "sop_instance_uid": sop_instance_uid,
                "object_key": key, "revision": revision,
                "state": ExportState.PENDING.value, "attempts": 0, "last_error": None,
                "next_attempt_at": stamp, "created_at": stamp, "updated_at": stamp,
            })
        LOGGER.info("export %d queued: %s for %s (%d bytes)", row_id, kind, destination,
                    stored.size_bytes)
        return Enqueued(row_id, created=True)

    def due(self) -> list[ExportRow]:
        """Pending rows whose ``next_attempt_at`` is now or earlier, oldest due first."""
        return self._select("state = ? AND next_attempt_at <= ? ORDER BY next_attempt_at, id",
                            (ExportState.PENDING.value, iso_utc(self.store.clock())))

    def rows(self, states: Iterable[str] | None = None) -> list[ExportRow]:
        """Rows in ``states`` (default all), by id.

        Raises
        ------
        ValueError
            A state that is not ``pending``, ``sent`` or ``dead``.
        """
        if states is None:
            return self._select("1 ORDER BY id", ())
        wanted = [ExportState(s).value for s in states]
        marks = ", ".join("?" for _ in wanted)
        return self._select(f"state IN ({marks}) ORDER BY id", tuple(wanted))

    def counts(self) -> dict[str, int]:
        """Number of rows per state (every state present, zero when none)."""
        found = dict(self.store.conn.execute(
            "SELECT state, count(*) FROM exports GROUP BY state").fetchall())
        return {s.value: int(found.get(s.value, 0)) for s in ExportState}

    def retry(self, ids: Iterable[int] | None = None) -> list[int]:
        """Make rows pending again, with attempts reset and due now.

        Parameters
        ----------
        ids
            Rows to retry, in any state (a sent row is sent again, e.g. after a PACS lost it);
            None retries every dead row.

        Returns
        -------
        list of int
            The ids made pending.

        Raises
        ------
        ValueError
            An id that is not in the table; nothing is changed then.
        """
        stamp = iso_utc(self.store.clock())
        with self.store.transaction() as tx:
            if ids is None:
                chosen = [int(r[0]) for r in tx.execute(
                    "SELECT id FROM exports WHERE state = ? ORDER BY id",
                    (ExportState.DEAD.value,))]
            else:
                chosen = sorted(set(ids))
                known = {int(r[0]) for r in tx.execute(
                    f"SELECT id FROM exports WHERE id IN ({', '.join('?' for _ in chosen)})",
                    chosen)}
                unknown = [i for i in chosen if i not in known]
                if unknown:
                    raise ValueError(f"no export rows with id {', '.join(map(str, unknown))}; "
                                     "`mrrp-pacs outbox list` shows the ids")
            tx.executemany(
                "UPDATE exports SET state = ?, attempts = 0, failing_since = NULL, "
                "next_attempt_at = ?, updated_at = ? WHERE id = ?",
                [(ExportState.PENDING.value, stamp, stamp, i) for i in chosen])
        if chosen:
            LOGGER.info("%d exports made pending again", len(chosen))
        return chosen

    def drain(self, senders: Mapping[str, Sender], *,
              retry_hours: float = DEFAULT_RETRY_HOURS, backoff_s: float = DEFAULT_BACKOFF_S,
              max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
              max_attempts: int = DEFAULT_MAX_ATTEMPTS,
              claim_s: float = DEFAULT_CLAIM_S) -> DrainSummary:
        """Send every due row once, through the sender of its destination.

        Each outcome is committed right after its send. A permanent failure makes the row
        ``dead``. After a transient one ``attempts`` grows by one and the row is due again
        after a delay drawn uniformly from ``[d/2, d]``, ``d = min(backoff_s * 2**(attempts -
        1), max_backoff_s)``, but no later than ``retry_hours`` after its first failure
        (``failing_since``); a transient failure at or after that deadline makes it ``dead``.

        Parameters
        ----------
        senders
            Sender per destination name. Rows for a destination without one stay pending
            (counted as skipped).
        retry_hours
            How long transient failures are retried, from the first one (> 0).
        backoff_s, max_backoff_s
            First retry delay and its cap, in seconds (before jitter).
        max_attempts
            A cap on tries as well (≥ 1), or 0 for none (the default: the time budget alone
            decides, so a long outage dead-letters nothing however often it was tried).
        claim_s
            Seconds a row being sent is hidden from other drains.
        """
        if (retry_hours <= 0 or max_attempts < 0 or backoff_s <= 0
                or max_backoff_s < backoff_s or claim_s <= 0):
            raise ValueError("drain needs retry_hours > 0, max_attempts >= 0, backoff_s > 0, "
                             "max_backoff_s >= backoff_s and claim_s > 0; got "
                             f"{retry_hours}, {max_attempts}, {backoff_s}, {max_backoff_s}, "
                             f"{claim_s}")
        policy = RetryPolicy(timedelta(hours=retry_hours), backoff_s, max_backoff_s,
                             max_attempts)
        summary = DrainSummary()
        self.release_abandoned_claims()
        by_destination: dict[str, list[ExportRow]] = {}
        for row in self.due():
            by_destination.setdefault(row.destination, []).append(row)
        for destination, rows in by_destination.items():
            sender = senders.get(destination)
            if sender is None:
                LOGGER.warning("%d due exports wait for destination %s, which has no sender "
                               "configured", len(rows), destination)
                summary.skipped += len(rows)
                continue
            with sender.session() as session:
                for row in rows:
                    if not self._claim(row.id, self.store.clock(), claim_s):
                        continue  # another drain took it
                    error = self._deliver(session, sender.peer, row)
                    state = self._record(row, error, self.store.clock(), policy, sender.peer)
                    if state is ExportState.SENT:
                        summary.sent += 1
                    elif state is ExportState.DEAD:
                        summary.dead += 1
                    else:
                        summary.retried += 1
        if summary.sent or summary.retried or summary.dead:
            LOGGER.info("outbox drained: %s", summary)
        return summary

    def _deliver(self, session: SendSession, peer: str, row: ExportRow) -> SendError | None:
        try:
            if row.object_sha256 is None:
                raise FileNotFoundError
            data = self.objects.read_bytes(row.object_sha256)
        except (FileNotFoundError, ValueError):
            return SendError(f"object {(row.object_sha256 or '-')[:12]} is missing from the "
                             "object store", transient=False)
        try:
            session.send(data)
            fault_point("outbox.sent")
        except SendError as exc:
            return exc
        except Exception as exc:
            # a sender bug must not stop the drain: the row records it and is tried again
            LOGGER.error("export %d: unexpected %s from the sender for %s", row.id,
                         type(exc).__name__, peer)
            LOGGER.debug("export %d: sender failure", row.id, exc_info=True)
            return SendError(f"unexpected {type(exc).__name__} while sending to {peer}",
                             transient=True)
        return None

    def _claim(self, row_id: int, at: datetime, claim_s: float) -> bool:
        stamp = iso_utc(at)
        with self.store.transaction() as tx:
            cursor = tx.execute(
                "UPDATE exports SET next_attempt_at = ?, updated_at = ?, claimed_by = ? "
                "WHERE id = ? AND state = ? AND next_attempt_at <= ?",
                (iso_utc(at + timedelta(seconds=claim_s)), stamp, process_token(), row_id,
                 ExportState.PENDING.value, stamp))
            return cursor.rowcount == 1

    def release_abandoned_claims(self) -> int:
        """Make rows claimed by a process of this host that no longer runs due now; returns
        how many."""
        now = iso_utc(self.store.clock())
        host = socket.gethostname()
        abandoned = [row_id for row_id, token in self.store.conn.execute(
            "SELECT id, claimed_by FROM exports WHERE state = ? AND claimed_by IS NOT NULL "
            "AND next_attempt_at > ?", (ExportState.PENDING.value, now))
            if _abandoned(token, host)]
        if abandoned:
            with self.store.transaction() as tx:
                tx.executemany("UPDATE exports SET next_attempt_at = ?, claimed_by = NULL "
                               "WHERE id = ? AND state = ?",
                               [(now, i, ExportState.PENDING.value) for i in abandoned])
            LOGGER.warning("%d export(s) claimed by a process that is gone (killed while "
                           "sending?) are due again", len(abandoned))
        return len(abandoned)

    def _record(self, row: ExportRow, error: SendError | None, at: datetime,
                policy: RetryPolicy, peer: str) -> ExportState:
        attempts = row.attempts + 1
        stamp = iso_utc(at)
        failing_since: str | None = None
        if error is None:
            state, next_at, last_error = ExportState.SENT, None, None
            LOGGER.info("export %d sent to %s (attempt %d)", row.id, row.destination, attempts)
        else:
            last_error = error.reason[:ERROR_CHARS]
            failing_since = row.failing_since or stamp
            deadline = datetime.fromisoformat(failing_since) + policy.budget
            if (not error.transient or at >= deadline
                    or 0 < policy.max_attempts <= attempts):
                state, next_at = ExportState.DEAD, None
                LOGGER.error("export %d to %s is dead after %d attempts since %s (%s): %s",
                             row.id, row.destination, attempts, failing_since,
                             "transient" if error.transient else "permanent", last_error)
            else:
                delay = timedelta(seconds=policy.delay_s(attempts, self.rng))
                due = min(at + delay, deadline)
                state, next_at = ExportState.PENDING, iso_utc(due)
                LOGGER.warning("export %d to %s failed (attempt %d), next try in %.0f s: %s",
                               row.id, row.destination, attempts,
                               (due - at).total_seconds(), last_error)
        with self.store.transaction() as tx:
            tx.execute(
                "UPDATE exports SET state = ?, attempts = ?, last_error = ?, "
                "next_attempt_at = ?, failing_since = ?, updated_at = ?, claimed_by = NULL "
                "WHERE id = ?",
                (state.value, attempts, last_error, next_at, failing_since, stamp, row.id))
            if state is not ExportState.PENDING:
                self._audit(tx, row, state, stamp, peer, attempts)
        return state

    def _audit(self, tx: sqlite3.Connection, row: ExportRow, state: ExportState, stamp: str,
               peer: str, attempts: int) -> None:
        """The audit row of an export sent or given up (in the transaction recording it)."""
        patient = None
        if row.score_id is not None:
            found = tx.execute("SELECT patient_key FROM scores WHERE id = ?",
                               (row.score_id,)).fetchone()
            patient = found[0] if found else None
        key = row.object_key or row.sop_instance_uid or ""
        what = (audit.control_digest(key.removeprefix("hl7:")) if row.kind == "hl7"
                else row.sop_instance_uid or key or "-")
        sent = state is ExportState.SENT
        audit.record(tx, at=stamp, event=audit.EXPORTED if sent else audit.EXPORT_FAILED,
                     who=peer, what=what, patient_key=patient,
                     detail=f"export {row.id}, {row.kind} to {row.destination}, "
                            f"{'sent' if sent else 'dead'} after {attempts} attempt(s)"
                            + ("" if row.score_id is None else f", score {row.score_id}"))

    def _select(self, where: str, params: tuple[object, ...]) -> list[ExportRow]:
        cursor = self.store.conn.execute(
            "SELECT id, score_id, kind, destination, object_sha256, sop_instance_uid, state, "
            "attempts, last_error, next_attempt_at, created_at, updated_at, revision, "
            f"object_key, failing_since FROM exports WHERE {where}", params)
        return [ExportRow(**dict(r)) for r in cursor.fetchall()]

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection | None) -> Iterator[sqlite3.Connection]:
        if conn is not None:
            yield conn
        else:
            with self.store.transaction() as tx:
                yield tx


def process_token(pid: int | None = None) -> str:
    """``host:pid:start`` of a process (this one by default): its start time (clock ticks since
    boot, /proc) tells a live process from a later one that reuses the pid."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def _start_ticks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            # the command may hold spaces and parentheses: fields count from the last ')'
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _abandoned(token: str, host: str) -> bool:
    """Whether the process that claimed a row (``token``) ran on ``host`` and is gone."""
    parts = token.rsplit(":", 2)
    if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
        return False  # another host's (or unreadable): its claim runs out by itself
    started = _start_ticks(int(parts[1]))
    return started == "?" or started != parts[2]


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed row is tried again, and when it is given up (see :meth:`Outbox.drain`)."""

    budget: timedelta
    backoff_s: float
    max_backoff_s: float
    max_attempts: int = 0  # 0: no cap

    def delay_s(self, attempts: int, rng: random.Random) -> float:
        """Seconds before try ``attempts + 1``: the capped exponential delay, jittered into
        its upper half."""
        ceiling = min(self.backoff_s * 2.0 ** min(attempts - 1, 64), self.max_backoff_s)
        return ceiling * (0.5 + 0.5 * rng.random())


def object_key(kind: str, data: bytes, sop_instance_uid: str | None) -> str:
    """What an export row carries, whatever its bytes: the SOP Instance UID of a DICOM
    object, ``hl7:`` + MSH-10 (the message control id) of an HL7 message.

    Raises
    ------
    ValueError
        An HL7 message without an MSH segment or control id.
    """
    if kind != "hl7":
        if sop_instance_uid is None:
            raise ValueError(f"a {kind} export needs a SOP Instance UID")
        return sop_instance_uid
    msh = data.lstrip(b"\x0b").split(b"\r", 1)[0]
    fields = msh.split(msh[3:4]) if len(msh) > 3 else []
    # MSH-1 is the field separator itself, so MSH-n is field n - 1 of the split
    if not msh.startswith(b"MSH") or len(fields) < 10 or not fields[9].strip():
        raise ValueError("an hl7 export needs a message starting with MSH and holding a "
                         "control id (MSH-10)")
    return "hl7:" + fields[9].decode("ascii", "replace").strip()
