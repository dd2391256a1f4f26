"""Store.transaction against real SQLite failures: the connection is never left in a
transaction, so the next write succeeds once the fault is gone."""

import sqlite3

import pytest

from mrrp_pacs.store import Store


@pytest.fixture
def db(tmp_path):
    with Store(tmp_path / "db.sqlite3", tmp_path / "objects") as store:
        store.conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, text TEXT)")
        yield store


def _plant_commit_fault(store):
    """Every insert into ``items`` then fails at COMMIT, not at the statement: a trigger
    writes a row whose deferred foreign key points at nothing (SQLite checks it at COMMIT and,
    failing it, keeps the transaction open)."""
    store.conn.executescript(
        "CREATE TABLE targets (id INTEGER PRIMARY KEY);"
        "CREATE TABLE dangling (target INTEGER REFERENCES targets(id) "
        "DEFERRABLE INITIALLY DEFERRED);"
        "CREATE TRIGGER fault AFTER INSERT ON items BEGIN "
        "INSERT INTO dangling (target) VALUES (404); END;")


def test_a_failed_commit_is_rolled_back_and_the_next_transaction_works(db):
    _plant_commit_fault(db)
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"), db.transaction() as conn:
        conn.execute("INSERT INTO items (text) VALUES ('lost')")
    assert not db.conn.in_transaction
    assert db.conn.execute("SELECT count(*) FROM items").fetchone()[0] == 0
    db.conn.execute("DROP TRIGGER fault")  # the fault clears
    with db.transaction() as conn:
        conn.execute("INSERT INTO items (text) VALUES ('kept')")
    assert [r[0] for r in db.conn.execute("SELECT text FROM items")] == ["kept"]


def test_a_full_database_raises_its_own_error_and_recovers(db):
    """SQLITE_FULL rolls the transaction back inside SQLite: the error raised is the disk-full
    one (not the ROLLBACK's 'no transaction is active'), and writing works once there is room."""
    pages = db.conn.execute("PRAGMA page_count").fetchone()[0]
    db.conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(sqlite3.OperationalError, match="full"), db.transaction() as conn:
        for _ in range(50):
            conn.execute("INSERT INTO items (text) VALUES (?)", ("x" * 4000,))
    assert not db.conn.in_transaction
    db.conn.execute("PRAGMA max_page_count = 1000000")
    with db.transaction() as conn:
        conn.execute("INSERT INTO items (text) VALUES ('fits')")
    assert db.conn.execute("SELECT count(*) FROM items").fetchone()[0] == 1


def test_an_error_inside_the_block_rolls_back(db):
    with pytest.raises(ZeroDivisionError), db.transaction() as conn:
        conn.execute("INSERT INTO items (text) VALUES ('gone')")
        _ = 1 / 0
    assert db.conn.execute("SELECT count(*) FROM items").fetchone()[0] == 0
    assert not db.conn.in_transaction
