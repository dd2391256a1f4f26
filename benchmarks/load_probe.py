"""``mrrp-pacs`` with timing probes, for ``bench_load.py --profile`` (diagnosis only).

Run as ``python benchmarks/load_probe.py OUT.json --config FILE serve``: the daemon runs
unchanged except that these are timed, each event stamped with the wall clock and the name of
the thread it ran on, and written to ``OUT.json`` when the process exits:

- ``answer``: an MLLP frame from the start of ``MllpServer._answer`` to its ACK written
  (on the event loop);
- ``persist``: ``MllpServer._persist`` in its executor thread (so ``answer - persist`` is the
  wait for a free executor thread plus the event loop's own delays);
- ``begin`` / ``body`` / ``commit``: ``Store.transaction``: ``BEGIN IMMEDIATE`` (waiting for
  SQLite's write lock: its busy handler polls with sleeps of 1, 2, 5, … up to 100 ms), the
  statements, ``COMMIT`` (the WAL fsync with synchronous = FULL);
- ``object``: ``ObjectStore._put`` (writing an object file, its fsync and the folder fsync);
- ``group`` / ``group_size``: one batch of the listeners' group commit
  (``GroupCommitter._commit``: its statements and its one COMMIT) and how many writes it held;
- ``tick``: how late a thread that sleeps 1 ms wakes up (every 1 ms): the time it waited for
  the GIL (and a core), i.e. what any thread of the daemon waits before it can run Python;
- ``cpu``: CPU seconds per thread group (threads alive at the sample), sampled every second
  from ``/proc/self/task``, and of the whole process (``process``, threads gone included).

Semantics are unchanged (same statements, same order, same durability); only timers around
them. Not for production.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EVENTS: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
CPU: dict[str, list[tuple[float, dict[str, float]]]] = {"samples": []}
LOCK = threading.Lock()


def record(kind: str, started: float, seconds: float) -> None:
    name = threading.current_thread().name
    with LOCK:
        EVENTS[kind].append((started, seconds, name))


def group(name: str) -> str:
    """Thread groups: the daemon's threads by role (pynetdicom's by their class)."""
    for prefix, label in (("mllp-intake", "mllp-intake"), ("mllp-listener", "mllp-loop"),
                          ("ThreadPoolExecutor", "scheduler-executors"),
                          ("MainThread", "main"), ("load-probe", "probe")):
        if name.startswith(prefix):
            return label
    if "Acceptor" in name or "Association" in name or "DUL" in name or "Thread-" in name:
        return "dicom/other"
    return name


def install() -> None:
    from listeners.mllp import MllpServer
    from mrrp_pacs.store.database import Store
    from mrrp_pacs.store.groupcommit import GroupCommitter
    from mrrp_pacs.store.objects import ObjectStore

    persist, answer, put = MllpServer._persist, MllpServer._answer, ObjectStore._put
    group_commit = GroupCommitter._commit

    def timed_group_commit(self: Any, store: Any, batch: list[Any]) -> Any:
        t0 = time.time()
        try:
            return group_commit(self, store, batch)
        finally:
            record("group", t0, time.time() - t0)
            record("group_size", t0, float(len(batch)))  # a count, not seconds

    def timed_persist(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        try:
            return persist(self, *args, **kwargs)
        finally:
            record("persist", t0, time.time() - t0)

    async def timed_answer(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        try:
            return await answer(self, *args, **kwargs)
        finally:
            record("answer", t0, time.time() - t0)

    def timed_put(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        try:
            return put(self, *args, **kwargs)
        finally:
            record("object", t0, time.time() - t0)

    @contextmanager
    def timed_transaction(self: Any) -> Iterator[Any]:
        # Store.transaction's steps, each timed (keep in step with mrrp_pacs/store/database.py)
        t0 = time.time()
        self.conn.execute("BEGIN IMMEDIATE")
        t1 = time.time()
        record("begin", t0, t1 - t0)
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            t2 = time.time()
            record("body", t1, t2 - t1)
            self.conn.execute("COMMIT")
            record("commit", t2, time.time() - t2)

    MllpServer._persist = timed_persist  # type: ignore[method-assign]
    MllpServer._answer = timed_answer  # type: ignore[method-assign]
    ObjectStore._put = timed_put  # type: ignore[method-assign]
    Store.transaction = timed_transaction  # type: ignore[method-assign]
    GroupCommitter._commit = timed_group_commit  # type: ignore[method-assign]


def probe() -> None:
    last_cpu = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    while True:
        t0 = time.time()
        time.sleep(0.001)
        late = time.time() - t0 - 0.001
        with LOCK:
            EVENTS["tick"].append((t0, late, "probe"))
        if t0 - last_cpu >= 1.0:
            last_cpu = t0
            by_group: dict[str, float] = defaultdict(float)
            for thread in threading.enumerate():
                try:
                    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
                except OSError:
                    continue
                parts = fields.rsplit(")", 1)[1].split()
                by_group[group(thread.name)] += (int(parts[11]) + int(parts[12])) / tick
            parts = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            by_group["process"] = (int(parts[11]) + int(parts[12])) / tick
            with LOCK:
                CPU["samples"].append((t0, dict(by_group)))


def dump(out: Path) -> None:
    with LOCK:
        out.write_text(json.dumps({"events": EVENTS, "cpu": CPU["samples"]}))


def main() -> None:
    out = Path(sys.argv.pop(1))
    install()
    atexit.register(dump, out)
    threading.Thread(target=probe, name="load-probe", daemon=True).start()
    from mrrp_pacs.cli import main as cli

    cli(prog_name="mrrp-pacs")


if __name__ == "__main__":
    main()
