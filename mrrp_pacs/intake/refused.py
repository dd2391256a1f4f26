"""Input refused for its content, kept for the operator: ``mrrp-pacs quarantine ...``.

A message answered AE (no usable patient identifier, bad encoding, larger than
``ingest.max_hl7_bytes``) is not stored as a message, and the sender does not send it again.
Without a copy, a misconfigured assigning authority would silently drop every result. So each
refused input is kept here: its bytes in a content-addressed area of its own
(``<objects>/refused/``), and a ``refused_input`` row with the reason, the peer, the time and
the listener. A transient failure (database locked, disk full) is not kept: nothing was
refused, the sender resends.

Bounds: at most ``ingest.refused_keep_bytes`` and :data:`MAX_ROWS` rows are kept, the oldest
rows (and their bytes) dropped beyond; an input larger than ``ingest.max_hl7_bytes`` keeps
only its first :data:`HEAD_BYTES` and its size (it cannot be reprocessed). :func:`reprocess`
runs kept bytes through :class:`~mrrp_pacs.intake.Intake` again with the current
configuration and marks the row with the outcome; a row is never reprocessed twice. Not to be
confused with :mod:`mrrp_pacs.quarantine`, which holds back *patients* whose scoring failed.

The table has a ``kind`` column (``hl7``, ``dicom``). DICOM objects are kept here when intake
refuses to let them replace an instance stored from another source
(:meth:`~mrrp_pacs.intake.Intake.receive_dicom`); reprocessing such a row is the operator's
decision to accept the replacement, so it replaces the stored instance.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from mrrp_pacs.errors import MrrpError
from mrrp_pacs.intake.persist import Intake, IntakeResult, Outcome
from mrrp_pacs.store import ObjectStore, Store

HEAD_BYTES = 64 * 1024
"""Bytes kept of an input larger than the configured limit (with its size)."""

KINDS = ("hl7", "dicom")

MAX_ROWS = 100_000
"""Refused inputs kept at most, however small (a flood of 10-byte junk frames would otherwise
fill the table with millions of rows within ``refused_keep_bytes``); the oldest are dropped."""


class RefusedError(MrrpError):
    """A quarantine row that does not exist or cannot be reprocessed."""


@dataclass(frozen=True)
class RefusedInput:
    """One ``refused_input`` row (without its bytes)."""

    id: int
    kind: str
    listener: str
    peer: str | None
    received_at: str
    reason: str
    size_bytes: int
    kept_bytes: int
    sha256: str
    reprocessed_at: str | None
    reprocess_outcome: str | None
    reprocess_note: str | None

    @property
    def complete(self) -> bool:
        """Whether every byte was kept (only then can it be reprocessed)."""
        return self.kept_bytes == self.size_bytes


def refused_objects(store: Store) -> ObjectStore:
    """The content-addressed area holding refused bytes, beside the store's objects."""
    return ObjectStore(store.objects.root / "refused")


def keep(store: Store, *, kind: str, listener: str, peer: str | None, reason: str,
         data: bytes, size_bytes: int, max_bytes: int, keep_bytes: int) -> int | None:
    """Keep one refused input; its row id, or None when it is larger than all we may keep.

    Parameters
    ----------
    data
        The bytes received (for a frame cut at the listener's limit: those it buffered).
    size_bytes
        The input's size as received (at least ``len(data)``).
    max_bytes
        Largest input kept whole (``ingest.max_hl7_bytes``); beyond, :data:`HEAD_BYTES`.
    keep_bytes
        Bytes kept in all (``ingest.refused_keep_bytes``); the oldest rows are dropped.

    Raises
    ------
    sqlite3.Error, OSError
        The row or the bytes could not be written (nothing is kept then).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind of refused input {kind!r}")
    if size_bytes > max_bytes or len(data) > max_bytes or size_bytes > len(data):
        data = data[:HEAD_BYTES]
    size_bytes = max(size_bytes, len(data))
    if len(data) > keep_bytes:
        return None
    objects = refused_objects(store)
    sha = objects.put_bytes(data).sha256
    with store.transaction() as conn:
        row_id, dropped = keep_row(conn, store, kind=kind, listener=listener, peer=peer,
                                   reason=reason, sha256=sha, size_bytes=size_bytes,
                                   kept_bytes=len(data), keep_bytes=keep_bytes)
    forget(store, dropped)
    return row_id


def keep_row(conn: sqlite3.Connection, store: Store, *, kind: str, listener: str,
             peer: str | None, reason: str, sha256: str, size_bytes: int, kept_bytes: int,
             keep_bytes: int) -> tuple[int, list[str]]:
    """Write one row inside the caller's transaction, its bytes already kept in
    :func:`refused_objects`; its id and the digests of rows dropped as the oldest (pass them
    to :func:`forget` once the transaction committed)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind of refused input {kind!r}")
    row_id = store.insert(conn, "refused_input", {
        "kind": kind, "listener": listener, "peer": peer, "received_at": store.stamp(),
        "reason": reason, "size_bytes": size_bytes, "kept_bytes": kept_bytes,
        "sha256": sha256,
    })
    return row_id, _drop_oldest(conn, keep_bytes)


def forget(store: Store, dropped: list[str]) -> None:
    """Delete the bytes of dropped rows no other row refers to (after the commit)."""
    objects = refused_objects(store)
    for digest in dropped:
        _forget(store, objects, digest)


def _drop_oldest(conn: sqlite3.Connection, keep_bytes: int) -> list[str]:
    """Delete the oldest rows until the kept bytes fit and at most :data:`MAX_ROWS` rows
    remain; the digests whose rows went. The totals come from ``refused_totals`` (kept by
    triggers), so the cost is that of the rows dropped, not of the rows kept."""
    count, total = conn.execute(
        "SELECT row_count, kept_bytes FROM refused_totals WHERE id = 1").fetchone()
    dropped: list[str] = []
    while total > keep_bytes or count > MAX_ROWS:
        batch = conn.execute("SELECT id, kept_bytes, sha256 FROM refused_input ORDER BY id "
                             "LIMIT 256").fetchall()
        if not batch:
            break
        for row_id, kept, sha in batch:
            if total <= keep_bytes and count <= MAX_ROWS:
                break
            conn.execute("DELETE FROM refused_input WHERE id = ?", (row_id,))
            total, count = total - kept, count - 1
            dropped.append(sha)
    return dropped


def _forget(store: Store, objects: ObjectStore, sha: str) -> None:
    """Delete a refused object no row refers to any more (after the rows' commit)."""
    if store.conn.execute("SELECT 1 FROM refused_input WHERE sha256 = ?",
                          (sha,)).fetchone() is None:
        objects.path_for(sha).unlink(missing_ok=True)


def _row(values: sqlite3.Row) -> RefusedInput:
    return RefusedInput(**{k: values[k] for k in values.keys()})  # noqa: SIM118


def listing(store: Store, limit: int | None = None) -> list[RefusedInput]:
    """Rows kept, newest first."""
    sql = "SELECT * FROM refused_input ORDER BY id DESC"
    rows = store.conn.execute(sql + (" LIMIT ?" if limit else ""),
                              (limit,) if limit else ()).fetchall()
    return [_row(r) for r in rows]


def get(store: Store, row_id: int) -> RefusedInput:
    """One row.

    Raises
    ------
    RefusedError
        No such row (never kept, or dropped as the oldest).
    """
    found = store.conn.execute("SELECT * FROM refused_input WHERE id = ?",
                               (row_id,)).fetchone()
    if found is None:
        raise RefusedError(f"no refused input {row_id} (see `mrrp-pacs quarantine list`)")
    return _row(found)


def raw_bytes(store: Store, item: RefusedInput) -> bytes:
    """The bytes kept for a row (which may hold patient data).

    Raises
    ------
    RefusedError
        The bytes are missing or do not match their digest.
    """
    path: Path = refused_objects(store).path_for(item.sha256)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RefusedError(f"refused input {item.id}: its bytes are missing ({path})") from None
    if hashlib.sha256(data).hexdigest() != item.sha256:
        raise RefusedError(f"refused input {item.id}: its bytes at {path} are damaged")
    return data


def reprocess(intake: Intake, row_id: int) -> IntakeResult:
    """Run a row's bytes through intake again (current configuration) and mark the row.

    Raises
    ------
    RefusedError
        No such row, already reprocessed, or only its first bytes were kept.
    sqlite3.Error, OSError
        A transient failure: the row is left as it was, to be tried again.
    """
    store = intake.store
    item = get(store, row_id)
    if item.reprocessed_at is not None:
        raise RefusedError(f"refused input {row_id} was already reprocessed "
                           f"({item.reprocess_outcome}: {item.reprocess_note})")
    if not item.complete:
        raise RefusedError(f"refused input {row_id} cannot be reprocessed: only its first "
                           f"{item.kept_bytes} of {item.size_bytes} bytes were kept")
    data = raw_bytes(store, item)
    origin = f"quarantine:{row_id}"
    if item.kind == "hl7":
        result = intake.receive_hl7(data, origin=origin)
    else:
        # a DICOM object refused as a replacement from another source: reprocessing it is
        # the operator accepting it; it is stored as coming from where it came from
        sender = item.peer or f"(refused input {row_id})"
        result = intake.receive_dicom(data, origin=f"{item.listener}:{sender}",
                                      accepted=origin)
    if result.outcome is Outcome.NEW:
        note = f"stored as row {result.row_id}"
    else:
        note = result.reason or str(result.outcome)
    with store.transaction() as conn:
        conn.execute("UPDATE refused_input SET reprocessed_at = ?, reprocess_outcome = ?, "
                     "reprocess_note = ? WHERE id = ? AND reprocessed_at IS NULL",
                     (store.stamp(), str(result.outcome), note, row_id))
    return result


def pending(store: Store) -> list[int]:
    """Ids of rows that can be reprocessed (complete, not yet reprocessed), oldest first."""
    return [r[0] for r in store.conn.execute(
        "SELECT id FROM refused_input WHERE reprocessed_at IS NULL AND kept_bytes = size_bytes "
        "ORDER BY id")]
