"""Group commit: many listeners' writes in one SQLite transaction, one WAL fsync for all.

Each received message or object used to commit its own transaction: every listener thread
took SQLite's write lock (``BEGIN IMMEDIATE``, whose busy handler polls with sleeps of 1 to
100 ms) and paid one WAL fsync (``synchronous = FULL``). Under 20 concurrent writers the
lock waits had a p99 of 2.2 s. A :class:`GroupCommitter` owns one connection and one writer
thread; a caller hands it a *write* (a function of the connection) and blocks until that
write is durable. The writer takes every write pending at that moment, runs each inside a
``SAVEPOINT`` of one ``BEGIN IMMEDIATE`` transaction, commits once, then answers each.

Durability is unchanged: :meth:`GroupCommitter.submit` returns only after the ``COMMIT``
that holds the write returned (the WAL fsynced), so a caller acknowledges nothing earlier.

Failure isolation:

* a write that raises is rolled back to its savepoint; the caller gets its exception and the
  other writes of the batch commit;
* when the ``COMMIT`` fails (an I/O error, a full disk), or a write's error made SQLite roll
  back the whole transaction (``SQLITE_FULL`` does), every write of the batch not yet
  committed gets that error: none of them may be acknowledged.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mrrp_pacs.store.database import Store

LOGGER = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_BATCH = 128
"""Writes committed together at most (a batch waits for nothing: it is what is pending)."""


class CommitterClosed(sqlite3.OperationalError):
    """The committer was stopped (or its writer thread died): nothing was written."""


@dataclass
class _Pending:
    write: Callable[[sqlite3.Connection], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


_STOP = object()


class GroupCommitter:
    """One writer thread committing the writes of every caller in shared transactions.

    Parameters
    ----------
    open_store
        Opens the writer's :class:`Store` (called once, in the writer thread).
    max_batch
        Most writes in one transaction.
    name
        The writer thread's name.
    """

    def __init__(self, open_store: Callable[[], Store], *, max_batch: int = DEFAULT_MAX_BATCH,
                 name: str = "intake-writer") -> None:
        if max_batch <= 0:
            raise ValueError(f"max_batch must be positive, not {max_batch}")
        self.open_store = open_store
        self.max_batch = max_batch
        self.name = name
        self._queue: queue.SimpleQueue[_Pending | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.batches = 0
        self.writes = 0

    @property
    def running(self) -> bool:
        """The writer thread is alive (or not started yet and able to start)."""
        if self._closed:
            return False
        return self._thread is None or self._thread.is_alive()

    @property
    def started(self) -> bool:
        """The writer thread was started (by :meth:`start` or a first :meth:`submit`) and
        has not been stopped since."""
        return self._thread is not None

    def start(self) -> None:
        """Start the writer thread (:meth:`submit` starts it too, unless stopped); also after
        :meth:`stop`.

        Raises
        ------
        Exception
            The writer's store could not be opened.
        """
        with self._lock:
            self._closed = False
            if self._thread is None:
                ready = threading.Event()
                failure: list[BaseException] = []
                thread = threading.Thread(target=self._run, args=(ready, failure),
                                          name=self.name, daemon=True)
                thread.start()
                ready.wait()
                if failure:
                    thread.join()
                    raise failure[0]
                self._thread = thread

    def stop(self) -> None:
        """Commit what is pending, then end the writer thread; idempotent. Later calls to
        :meth:`submit` raise :class:`CommitterClosed` until :meth:`start`."""
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(_STOP)
                thread.join()

    def submit(self, write: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``write`` inside a transaction of the writer; return once it is committed.

        Raises
        ------
        BaseException
            Whatever ``write`` raised (its rows were rolled back), or the error that failed
            the batch's ``COMMIT`` (nothing of it was recorded), or :class:`CommitterClosed`.
        """
        if self._closed:
            raise CommitterClosed("the intake writer is stopped")
        thread = self._thread
        if thread is None:
            self.start()
            thread = self._thread
            assert thread is not None
        pending = _Pending(write)
        self._queue.put(pending)
        while not pending.done.wait(1.0):
            if not thread.is_alive():
                raise CommitterClosed("the intake writer thread has ended")
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[no-any-return]

    # -- the writer thread ---------------------------------------------------------------------

    def _run(self, ready: threading.Event, failure: list[BaseException]) -> None:
        try:
            store = self.open_store()
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            return
        ready.set()
        stopping = False
        try:
            while not stopping:
                first = self._queue.get()
                batch: list[_Pending] = []
                if first is _STOP:
                    stopping = True
                else:
                    assert isinstance(first, _Pending)
                    batch.append(first)
                while len(batch) < self.max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stopping = True
                        continue
                    assert isinstance(item, _Pending)
                    batch.append(item)
                if batch:
                    self._commit(store, batch)
            # anything submitted after the stop request was queued behind it
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Pending):
                    item.error = CommitterClosed("the intake writer is stopped")
                    item.done.set()
        finally:
            store.close()

    def _commit(self, store: Store, batch: list[_Pending]) -> None:
        conn = store.conn
        done: list[_Pending] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for pending in batch:
                if not conn.in_transaction:
                    # an earlier write's error ended the transaction: start the rest afresh
                    conn.execute("BEGIN IMMEDIATE")
                conn.execute("SAVEPOINT write")
                try:
                    pending.result = pending.write(conn)
                except BaseException as exc:
                    pending.error = exc
                    if conn.in_transaction:
                        conn.execute("ROLLBACK TO write")
                        conn.execute("RELEASE write")
                    else:
                        # SQLite rolled the whole transaction back: the writes before this
                        # one are lost with it, and must not be acknowledged
                        for lost in done:
                            lost.result, lost.error = None, exc
                        done.clear()
                    continue
                conn.execute("RELEASE write")
                done.append(pending)
            if conn.in_transaction:
                conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as rollback_error:
                    LOGGER.error("ROLLBACK failed after a failed group commit: %s",
                                 rollback_error)
            LOGGER.error("group commit of %d write(s) failed: %s: %s", len(batch),
                         type(exc).__name__, exc)
            for pending in batch:
                if pending.error is None:
                    pending.result, pending.error = None, exc
        self.batches += 1
        self.writes += len(batch)
        for pending in batch:
            pending.done.set()
