import sqlite3

import pytest

from mrrp_pacs.errors import SchemaError
from mrrp_pacs.store import Store
from mrrp_pacs.store import migrations as mig

EXPECTED_TABLES = {"instances", "hl7_messages", "observations", "reports", "clinical_values",
                   "rois", "features", "scores", "exports", "jobs", "schema_migrations"}


def _schema(conn: sqlite3.Connection) -> list[tuple[str, str, str]]:
    return sorted(tuple(r) for r in conn.execute(
        "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))


def _connect(path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    mig.ensure_history_table(conn)
    return conn


def test_fresh_database_has_every_table_and_wal(tmp_path):
    with Store(tmp_path / "db.sqlite3", tmp_path / "objects") as store:
        assert store.schema_version == len(mig.available_migrations()) >= 2
        assert set(store.db.table_names()) >= EXPECTED_TABLES
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = [r[0] for r in store.conn.execute("SELECT version FROM schema_migrations")]
        assert versions == list(range(1, store.schema_version + 1))


def test_old_database_reaches_the_same_schema_and_keeps_its_rows(tmp_path):
    old = _connect(tmp_path / "old.sqlite3")
    mig.migrate(old, target=1)
    assert mig.schema_version(old) == 1
    assert "features" not in {r[0] for r in old.execute("SELECT name FROM sqlite_master")}
    old.execute(
        "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, "
        "series_instance_uid, sha256, size_bytes, source, received_at) "
        "VALUES ('1.2', '1.2.3', '1.4', '1.5', 'ab', 1, 'test', 'now')")
    old.close()

    with Store(tmp_path / "old.sqlite3", tmp_path / "o1") as upgraded, \
            Store(tmp_path / "fresh.sqlite3", tmp_path / "o2") as fresh:
        assert _schema(upgraded.conn) == _schema(fresh.conn)
        assert upgraded.schema_version == fresh.schema_version
        rows = upgraded.conn.execute("SELECT sop_instance_uid FROM instances").fetchall()
        assert [tuple(r) for r in rows] == [("1.2",)]


def test_migrating_twice_changes_nothing(tmp_path):
    conn = _connect(tmp_path / "db.sqlite3")
    assert len(mig.migrate(conn)) == len(mig.available_migrations())
    before = _schema(conn)
    assert mig.migrate(conn) == []
    assert _schema(conn) == before


def test_newer_database_is_refused(tmp_path):
    conn = _connect(tmp_path / "db.sqlite3")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(SchemaError, match="version 99 is newer"):
        Store(tmp_path / "db.sqlite3", tmp_path / "objects")


def test_failed_migration_is_rolled_back(tmp_path, monkeypatch):
    real = mig.available_migrations()
    broken = mig.Migration(len(real) + 1, "broken",
                           "CREATE TABLE half_done (x INTEGER);\nINSERT INTO nowhere VALUES (1);")
    monkeypatch.setattr(mig, "available_migrations", lambda: [*real, broken])
    conn = _connect(tmp_path / "db.sqlite3")
    with pytest.raises(SchemaError, match=f"{len(real) + 1:04d}_broken failed and was rolled back"):
        mig.migrate(conn)
    assert mig.schema_version(conn) == len(real)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "half_done" not in names


def test_statements_split_on_semicolons_not_inside_strings():
    sql = "CREATE TABLE a (x TEXT DEFAULT 'a;b');\n-- note;\nCREATE TABLE b (y);\n-- end\n"
    statements = mig._statements(sql)
    assert len(statements) == 2
    assert statements[0] == "CREATE TABLE a (x TEXT DEFAULT 'a;b');"
    conn = sqlite3.connect(":memory:")
    for statement in statements:
        conn.execute(statement)
    assert conn.execute("INSERT INTO a DEFAULT VALUES RETURNING x").fetchone() == ("a;b",)


def test_the_outbox_migration_keys_old_rows_without_losing_any(tmp_path):
    """0007 keys exports by (SOP Instance UID or HL7 control id, destination). Rows queued
    before were keyed by bytes: two rows with one UID (other bytes) both stay, the first keeps
    the key; scores with rows count as published; a failing row's budget starts at its last
    failure."""
    version = next(m.version for m in mig.available_migrations() if m.name == "outbox")
    old = _connect(tmp_path / "old.sqlite3")
    mig.migrate(old, target=version - 1)
    old.executemany(
        "INSERT INTO scores (id, patient_key, model_version, inputs_hash, outputs, created_at) "
        "VALUES (?, 'P', ?, 'h', '{}', 't0')", [(1, "1"), (2, "2")])
    rows = [  # id, score, kind, destination, sha, uid, state, attempts, updated_at
        (1, 1, "sr", "pacs", "aa", "1.2.3", "sent", 1, "t1"),
        (2, 1, "sr", "pacs", "bb", "1.2.3", "pending", 0, "t1"),  # same UID, other bytes
        (3, 1, "sr", "archive", "aa", "1.2.3", "pending", 2, "t5"),
        (4, 1, "hl7", "his", "cc", None, "sent", 1, "t1"),
        (5, None, "hl7", "his", "dd", None, "dead", 8, "t1"),
    ]
    old.executemany(
        "INSERT INTO exports (id, score_id, kind, destination, object_sha256, sop_instance_uid, "
        "state, attempts, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 't0', ?)",
        rows)
    old.close()

    with Store(tmp_path / "old.sqlite3", tmp_path / "objects") as store:
        migrated = [tuple(r) for r in store.conn.execute(
            "SELECT id, object_key, revision, failing_since FROM exports ORDER BY id")]
        assert migrated == [(1, "1.2.3", 0, None), (2, None, 0, None),
                            (3, "1.2.3", 0, "t5"), (4, "hl7:MRRP1", 0, None),
                            (5, None, 0, None)]
        scores = [tuple(r) for r in store.conn.execute(
            "SELECT id, revision, published_revision FROM scores ORDER BY id")]
        assert scores == [(1, 0, 0), (2, 0, None)]
        with pytest.raises(sqlite3.IntegrityError), store.transaction() as conn:
            conn.execute("INSERT INTO exports (kind, destination, object_key, state, "
                         "created_at, updated_at) VALUES ('sr', 'pacs', '1.2.3', 'pending', "
                         "'t', 't')")
