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
