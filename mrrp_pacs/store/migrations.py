"""Numbered schema migrations.

Each ``migrations/NNNN_name.sql`` file moves the schema from version NNNN-1 to NNNN and runs in
one transaction together with the version bump, so a database is always at a whole version.
``PRAGMA user_version`` holds the current version; ``schema_migrations`` records when each step
ran. A fresh database and an old one migrated step by step reach the same schema (tested).
"""

from __future__ import annotations

import logging
import re
import sqlite3
from dataclasses import dataclass
from importlib import resources

from mrrp_pacs.clock import Clock, iso_utc, system_clock
from mrrp_pacs.errors import SchemaError

LOGGER = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """All migrations shipped with the package, in version order (1, 2, …, without gaps)."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise SchemaError(f"migration files are not numbered 1..n: {[m.version for m in found]}")
    return found


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, target: int | None = None,
            clock: Clock = system_clock) -> list[Migration]:
    """Apply the migrations above the database's version, up to ``target`` (default: latest).

    ``conn`` must be in autocommit mode (``isolation_level=None``). Returns what was applied.

    Raises
    ------
    SchemaError
        The database is newer than this code knows, or a migration failed (it was rolled back).
    """
    migrations = available_migrations()
    latest = migrations[-1].version
    target = latest if target is None else target
    current = schema_version(conn)
    if current > latest:
        raise SchemaError(
            f"database schema version {current} is newer than this mrrp-pacs knows ({latest}): "
            "upgrade mrrp-pacs, or point it at another database"
        )
    applied = []
    for migration in migrations:
        if not current < migration.version <= target:
            continue
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _statements(migration.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, iso_utc(clock())),
            )
            conn.execute(f"PRAGMA user_version = {migration.version:d}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise SchemaError(
                f"migration {migration.version:04d}_{migration.name} failed and was rolled "
                f"back: {exc}"
            ) from exc
        LOGGER.info("schema migrated to version %d (%s)", migration.version, migration.name)
        applied.append(migration)
    return applied


def ensure_history_table(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )


def _statements(sql: str) -> list[str]:
    """Split a migration file into statements (``sqlite3.complete_statement`` decides where)."""
    statements, pending = [], ""
    for line in sql.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            if pending.strip():
                statements.append(pending.strip())
            pending = ""
    if pending.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in pending.splitlines()
    ):
        raise SchemaError(f"migration ends with an incomplete statement: {pending[:80]!r}")
    return statements
