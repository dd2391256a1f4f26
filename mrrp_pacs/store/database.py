"""The SQLite database: WAL mode, explicit transactions, migrated on open."""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from mrrp_pacs.clock import Clock, iso_utc, system_clock
from mrrp_pacs.store import migrations
from mrrp_pacs.store.objects import ObjectStore

LOGGER = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 10_000


class Store:
    """One SQLite database (WAL) plus the object store beside it.

    Use one ``Store`` per thread. Writes go through :meth:`transaction`, which takes the write
    lock up front (``BEGIN IMMEDIATE``) so a multi-row write is all-or-nothing.

    ``clock`` is the time every ``*_at`` column is stamped with and every decision by time
    made against this store reads (see :mod:`mrrp_pacs.clock`); the wall clock by default.
    """

    def __init__(self, db_path: Path, objects_dir: Path, *, migrate: bool = True,
                 clock: Clock = system_clock) -> None:
        self.db_path = db_path
        self.clock = clock
        try:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a file stands where the folder should be
            raise NotADirectoryError(
                errno.ENOTDIR, "is not a folder", str(db_path.parent)) from None
        self.conn = sqlite3.connect(
            db_path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
            check_same_thread=False,
        )
        self.conn.row_factory = sqlite3.Row
        self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS:d}")
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.db = sqlite_utils.Database(self.conn)
        if self.conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self.db.enable_wal()
        # synchronous stays FULL: an acknowledged message must survive a power cut too
        self.conn.execute("PRAGMA synchronous = FULL")
        self.objects = ObjectStore(objects_dir)
        if migrate:
            migrations.ensure_history_table(self.conn)
            migrations.migrate(self.conn, clock=clock)

    def stamp(self) -> str:
        """Now by this store's clock, as an ``*_at`` column value (see :func:`iso_utc`)."""
        return iso_utc(self.clock())

    @property
    def schema_version(self) -> int:
        return migrations.schema_version(self.conn)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All statements inside commit together or not at all.

        A failed ``COMMIT`` (a deferred constraint, an I/O error, a full disk) is rolled back
        before its error is raised, so the connection is never left inside a transaction: the
        next ``transaction()`` starts afresh once the fault is gone. When SQLite already
        rolled back by itself (it does on ``SQLITE_FULL``), the error raised is still the
        statement's own, not the ``ROLLBACK``'s "no transaction is active".
        """
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self._rollback()
            raise
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        """Roll back the open transaction, if SQLite has not already; never raises."""
        if not self.conn.in_transaction:
            return
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            # the caller's error is the one to report; this one only goes to the log
            LOGGER.error("ROLLBACK failed after an error in a transaction: %s", exc)

    def insert(self, conn: sqlite3.Connection, table: str, row: dict[str, Any]) -> int:
        """Insert one row inside a transaction; returns its id."""
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        cursor = conn.execute(
            f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(row.values())
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

