"""GroupCommitter against real SQLite: shared transactions, and who is told what on failure."""

import sqlite3
import threading
import time

import pytest
from builders import Patient, encode, pathology_result, us_image

from mrrp_pacs.intake import Intake, Outcome
from mrrp_pacs.store import Store
from mrrp_pacs.store.groupcommit import CommitterClosed, GroupCommitter


@pytest.fixture
def db_path(tmp_path):
    with Store(tmp_path / "db.sqlite3", tmp_path / "objects") as store:
        store.conn.executescript(
            "CREATE TABLE items (id INTEGER PRIMARY KEY, text TEXT);"
            # a row 'bad' fails the COMMIT, not its statement: its deferred foreign key points
            # at nothing (SQLite checks it at COMMIT and keeps the transaction open)
            "CREATE TABLE targets (id INTEGER PRIMARY KEY);"
            "CREATE TABLE dangling (target INTEGER REFERENCES targets(id) "
            "DEFERRABLE INITIALLY DEFERRED);"
            "CREATE TRIGGER fault AFTER INSERT ON items WHEN NEW.text = 'bad' BEGIN "
            "INSERT INTO dangling (target) VALUES (404); END;")
    return tmp_path / "db.sqlite3"


@pytest.fixture
def committer(db_path):
    opened = GroupCommitter(lambda: Store(db_path, db_path.parent / "objects", migrate=False))
    yield opened
    opened.stop()


def _texts(db_path) -> list[str]:
    with Store(db_path, db_path.parent / "objects", migrate=False) as store:
        return sorted(r[0] for r in store.conn.execute("SELECT text FROM items"))


def _insert(text):
    def write(conn):
        return conn.execute("INSERT INTO items (text) VALUES (?)", (text,)).lastrowid
    return write


def _one_batch(committer, writes):
    """Submit ``writes`` from threads of their own so that they form one batch: the first
    write holds the writer until the others are queued. Returns (results, errors) by index."""
    results, errors = {}, {}
    queued = threading.Event()

    def hold(conn):
        deadline = time.monotonic() + 10
        while committer._queue.qsize() < len(writes) and time.monotonic() < deadline:
            time.sleep(0.005)
        queued.set()
        return "held"

    def call(i, write):
        try:
            results[i] = committer.submit(write)
        except Exception as exc:  # what the caller of submit sees
            errors[i] = exc

    first = threading.Thread(target=call, args=(-1, hold))
    first.start()
    while committer._queue.qsize() or not first.is_alive():  # the writer holds `hold`
        time.sleep(0.005)
    threads = [threading.Thread(target=call, args=(i, w)) for i, w in enumerate(writes)]
    for thread in threads:
        thread.start()
    for thread in [first, *threads]:
        thread.join(20)
    assert queued.is_set()
    return results, errors


def test_concurrent_writes_share_one_transaction_and_all_commit(committer, db_path):
    committer.start()
    results, errors = _one_batch(committer, [_insert(f"row {i}") for i in range(10)])
    assert errors == {}
    assert len({results[i] for i in range(10)}) == 10  # each got its own row id back
    assert _texts(db_path) == sorted(f"row {i}" for i in range(10))
    # `hold` in a batch of its own, then the ten writes together
    assert committer.writes == 11 and committer.batches == 2


def test_a_failed_commit_fails_every_write_of_the_batch(committer, db_path):
    committer.start()
    results, errors = _one_batch(committer, [_insert("good 1"), _insert("bad"),
                                             _insert("good 2")])
    assert set(errors) == {0, 1, 2}, "no write of a failed COMMIT may be reported stored"
    assert set(results) == {-1}  # only `hold`, committed in the batch before
    assert all(isinstance(e, sqlite3.IntegrityError) for e in errors.values())
    assert _texts(db_path) == []
    # the writer's connection was rolled back: the next batch commits
    assert committer.submit(_insert("after")) is not None
    assert _texts(db_path) == ["after"]


def test_one_failing_write_does_not_fail_the_others(committer, db_path):
    committer.start()

    def broken(conn):
        conn.execute("INSERT INTO items (text) VALUES ('half')")  # undone with its savepoint
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    def refuses(conn):
        raise ValueError("not this one")

    results, errors = _one_batch(committer, [_insert("a"), broken, refuses, _insert("b")])
    assert set(errors) == {1, 2}
    assert isinstance(errors[1], sqlite3.OperationalError)
    assert isinstance(errors[2], ValueError)
    assert set(results) == {-1, 0, 3}
    assert _texts(db_path) == ["a", "b"]


def test_submit_after_stop_is_refused_until_started_again(committer, db_path):
    assert committer.submit(_insert("lazy start")) is not None
    committer.stop()
    assert not committer.running
    with pytest.raises(CommitterClosed):
        committer.submit(_insert("refused"))
    committer.start()
    assert committer.submit(_insert("again")) is not None
    assert _texts(db_path) == ["again", "lazy start"]


def test_a_store_that_cannot_be_opened_fails_start(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    committer = GroupCommitter(lambda: Store(blocked / "db.sqlite3", tmp_path / "o"))
    with pytest.raises(NotADirectoryError):
        committer.start()


def test_intake_through_a_committer_stores_what_each_thread_received(store, config):
    committer = GroupCommitter(lambda: Store(config.paths.db_file, config.paths.objects_dir,
                                             migrate=False))
    results = []
    lock = threading.Lock()

    def receive(i):
        with Store(config.paths.db_file, config.paths.objects_dir, migrate=False) as own:
            intake = Intake(own, config, committer=committer)
            patient = Patient()
            got = [intake.receive_hl7(pathology_result(patient, control_id=f"C{i}"),
                                      origin="mllp:test"),
                   intake.receive_dicom(encode(us_image(patient)), origin="dicom:TEST")]
        with lock:
            results.extend(got)

    try:
        threads = [threading.Thread(target=receive, args=(i,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        committer.stop()
    assert [r.outcome for r in results] == [Outcome.NEW] * 24
    count = store.conn.execute
    assert count("SELECT count(*) FROM hl7_messages").fetchone()[0] == 12
    assert count("SELECT count(*) FROM instances").fetchone()[0] == 12
    assert count("SELECT count(*) FROM clinical_values").fetchone()[0] > 0
    ids = {r.row_id for r in results if r.kind == "hl7"}
    assert len(ids) == 12
    assert committer.writes == 24
