"""The audit trail: who did what, when, to which patient (``mrrp-pacs audit``).

One ``audit`` row per received object or message, per refused input, per score and per export
outcome. Each row is written with :func:`record` on the connection of the transaction that
writes the fact it records (the intake rows, the score row, the export row's new state), so an
audit row exists exactly when its fact was committed; under group commit
(:mod:`mrrp_pacs.store.groupcommit`) it shares the write's savepoint. Rows carry no patient data
beyond the patient key the store already keys cases by (``<id>^^^<issuer>``); ``what`` names the
object by its SOP Instance UID, an HL7 message by the digest of its control id
(:func:`control_digest`, as the MLLP log shows it), a score or an export by its row.

Events: ``received`` (a DICOM object or HL7 message stored; an identical re-send, answered as
a duplicate and not stored again, leaves no row), ``refused`` (refused for its content, or a
replacement from another source, see :mod:`mrrp_pacs.intake.persist`), ``scored``,
``exported``, ``export-failed`` (an export given up: dead). Retention: ``[audit] keep_days``
(0 = keep forever) is applied by :func:`prune`.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timedelta

from mrrp_pacs.clock import iso_utc
from mrrp_pacs.store import Store

RECEIVED, REFUSED, SCORED = "received", "refused", "scored"
EXPORTED, EXPORT_FAILED = "exported", "export-failed"
EVENTS = (RECEIVED, REFUSED, SCORED, EXPORTED, EXPORT_FAILED)
DETAIL_CHARS = 200


@dataclass(frozen=True)
class AuditRow:
    id: int
    at: str
    event: str
    who: str
    what: str
    patient_key: str | None
    detail: str | None


def control_digest(control_id: str) -> str:
    """What logs and the audit show of an HL7 control id (MSH-10 can quote an order or
    patient number): ``c:`` and the first 10 hex digits of its SHA-256, ``-`` for none."""
    if not control_id:
        return "-"
    return "c:" + hashlib.sha256(control_id.encode("utf-8", "replace")).hexdigest()[:10]


def content_digest(data_sha256: str) -> str:
    """``what`` of an input that could not be read far enough to name it."""
    return f"sha256:{data_sha256[:12]}"


def who_received(origin: str) -> str:
    """``who`` of received input, from the intake ``origin``.

    ``file:<path>`` (a file drop) becomes ``file-drop:<folder>``; the others (``dicom:<AE>@<
    address>``, ``mllp:<address>``, ``quarantine:<id>``) are kept as they are.
    """
    kind, _, rest = origin.partition(":")
    if kind == "file":
        folder = rest.rsplit("/", 1)[0] if "/" in rest else rest
        return f"file-drop:{folder or '/'}"
    return origin


def record(conn: sqlite3.Connection, *, at: str, event: str, who: str, what: str,
           patient_key: str | None = None, detail: str | None = None) -> int:
    """Write one row inside the caller's transaction; its id.

    Raises
    ------
    ValueError
        An unknown event.
    """
    if event not in EVENTS:
        raise ValueError(f"unknown audit event {event!r}")
    cursor = conn.execute(
        "INSERT INTO audit (at, event, who, what, patient_key, detail) VALUES (?, ?, ?, ?, ?, ?)",
        (at, event, who, what, patient_key, detail[:DETAIL_CHARS] if detail else None))
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def listing(store: Store, *, since: datetime | None = None, patient: str | None = None,
            limit: int | None = None) -> list[AuditRow]:
    """Rows, oldest first (with ``limit``: the newest ``limit``, still oldest first)."""
    where, params = [], []
    if since is not None:
        where.append("at >= ?")
        params.append(iso_utc(since))
    if patient is not None:
        where.append("patient_key = ?")
        params.append(patient)
    sql = "SELECT id, at, event, who, what, patient_key, detail FROM audit"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC"
    if limit:
        sql += f" LIMIT {int(limit):d}"
    rows = [AuditRow(*r) for r in store.conn.execute(sql, params)]
    rows.reverse()
    return rows


def prune(store: Store, keep_days: int, now: datetime) -> int:
    """Delete rows older than ``keep_days`` before ``now`` (0: none); how many went."""
    if keep_days <= 0:
        return 0
    cutoff = iso_utc(now - timedelta(days=keep_days))
    with store.transaction() as conn:
        return conn.execute("DELETE FROM audit WHERE at < ?", (cutoff,)).rowcount
