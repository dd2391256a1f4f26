"""Ceilings of the two load targets of issue 17, measured side by side with the daemon.

Run: ``PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_load_ceiling.py`` (5 rounds, 2,000
instances, 6 s per HL7 run: 9 to 14 min on 2 shared cores) or ``... --quick`` (2 rounds,
400 instances, 3 s per HL7 run: 1.5 to 3 min, a smoke run). ``--help`` lists the options.
Figures and what they prove: docs/daemon.md, "Load", "The ceiling".

A. C-STORE: ``--instances`` 78 kB US images (``bench_load.write_instances``: the benchmark's
   own, unique UIDs) over ``--associations`` concurrent dcmtk ``storescu`` processes (the same
   C++ sender for every server; ``bench_load.storescu_args``), into a server started fresh
   for each run:

   - ``bare``: a pynetdicom SCP whose C-STORE handler returns 0x0000 and does nothing else
     (no decoding, no disk); AE settings as our ``StorageScp`` (storage SOP classes and
     transfer syntaxes, max PDU, timeouts, ``max_associations``, AE title checks) and our
     two polling changes (``DUL_IDLE_POLL_S``, ``REACTOR_WAIT_S``), which only save CPU;
   - ``bare+fsync``: the same, the handler writing the received bytes to a file of their own
     and fsyncing it;
   - ``daemon``: ``mrrp-pacs serve`` (fresh data folder, no model, export off): our
     ``StorageScp`` into the real object store and database (group commit);
   - ``storescp``: dcmtk's C++ ``storescp --fork`` writing each object to a file (no fsync):
     what the senders, loopback and the machine can do at all;
   - ``2 x bare`` (not in the default set; ``--servers``): two bare processes on one port
     (``SO_REUSEPORT``).

   Every server under two conditions: the other core idle, and busy (a process spinning in a
   pure-Python loop). Measured: instances/s (first sender started to last sender ended), CPU
   of the SCP process per instance (``/proc/PID/stat``, reaped children included), CPU of the
   senders per instance (``RUSAGE_CHILDREN``), objects received vs sent.

B. HL7 ACK: ``--hl7-rate`` (100) messages/s in total from ``--hl7-connections`` (10)
   threads for ``--hl7-seconds``, each on ``bench_load.hl7_flood``'s schedule, latency from
   the moment a thread starts a message to the moment it is durable / acknowledged:

   - ``commit FULL``: a bare SQLite ``BEGIN IMMEDIATE; INSERT; COMMIT`` of 2 kB in WAL mode,
     ``synchronous = FULL`` (one WAL fsync per commit), one connection per thread, the
     commits serialised by a lock (no busy-handler sleeps);
   - ``commit NORMAL``: the same with ``synchronous = NORMAL`` (no fsync at COMMIT: *not*
     durable, what giving up persist-before-acknowledge would give);
   - ``sequence FULL``: what the daemon does per message, bare: the message into our
     ``ObjectStore`` (file + fsync, rename, folder fsync(s)) then the ``commit FULL`` above;
   - ``daemon``: ``bench_load.hl7_flood`` against ``mrrp-pacs serve`` (fresh data folder):
     ORU^R01 messages over MLLP, the ACK read back.

   Run with the other core idle (``--hl7-core busy`` or ``both`` adds the spinning process).

Rounds alternate: in each round every C-STORE server runs under both conditions (the order of
servers rotated and of conditions swapped from round to round), then every HL7 arm (order
rotated). Medians over the rounds and ratios are printed in one table, with each run's figure
and the load average (1 min) before and after each run; the load average at start and end.
Exit status 0 (a measurement); non-zero with a message when a server could not be started.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_load import (
    BENCH_AE,
    DAEMON_AE,
    LOOPBACK,
    MRRP,
    TARGET_ACK_P99_MS,
    TARGET_CSTORE_PER_S,
    free_port,
    healthy,
    hl7_flood,
    percentile,
    query,
    storescu_args,
    write_instances,
)

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}

BARE_SCP = r"""
import itertools, json, os, signal, socket, sys, threading
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationServer
from listeners.dicom_scp import (DEFAULT_ACSE_TIMEOUT_S, DEFAULT_DIMSE_TIMEOUT_S,
    DEFAULT_MAX_PDU, DEFAULT_NETWORK_TIMEOUT_S, DUL_IDLE_POLL_S, REACTOR_WAIT_S,
    STORAGE_SOP_CLASSES, _waiting_get_msg, transfer_syntaxes_for)
port, mode, out, reuse, max_assoc = (int(sys.argv[1]), sys.argv[2], sys.argv[3],
                                     sys.argv[4] == "1", int(sys.argv[5]))
if reuse:
    bind = AssociationServer.server_bind
    def server_bind(self):
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        bind(self)
    AssociationServer.server_bind = server_bind
counter = itertools.count(1)
received = [0]
lock = threading.Lock()
def on_store(event):
    n = next(counter)
    if mode == "fsync":
        with open(os.path.join(out, f"{os.getpid()}-{n}.dcm"), "wb") as f:
            f.write(event.encoded_dataset()); f.flush(); os.fsync(f.fileno())
    with lock:
        received[0] += 1
    return 0x0000
def on_connection(event):  # our StorageScp's two polling changes (they only save CPU)
    event.assoc.dul._run_loop_delay = DUL_IDLE_POLL_S
    event.assoc.dimse.get_msg = _waiting_get_msg(event.assoc.dimse, REACTOR_WAIT_S)
ae = AE(ae_title="MRRP")
ae.maximum_pdu_size = DEFAULT_MAX_PDU
ae.maximum_associations = max_assoc
ae.network_timeout = DEFAULT_NETWORK_TIMEOUT_S
ae.acse_timeout = DEFAULT_ACSE_TIMEOUT_S
ae.dimse_timeout = DEFAULT_DIMSE_TIMEOUT_S
ae.require_called_aet = True
ae.require_calling_aet = ["BENCH"]
for sop_class in STORAGE_SOP_CLASSES:
    ae.add_supported_context(sop_class, list(transfer_syntaxes_for(sop_class)))
ae.add_supported_context(Verification)
def stop(*_):
    sys.stdout.write(json.dumps({"received": received[0]}) + "\n"); sys.stdout.flush()
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[
    (evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, on_connection)])
sys.stdout.write("ready\n"); sys.stdout.flush()
while True:
    signal.pause()
"""

SPIN = "while True:\n    pass\n"

HL7_BARE = r"""
import json, os, sqlite3, sys, threading, time
from pathlib import Path
folder, mode = Path(sys.argv[1]), sys.argv[2]
rate, connections, seconds = float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
sync = "NORMAL" if mode == "normal" else "FULL"
db_path = folder / "bare.sqlite3"
setup = sqlite3.connect(db_path, isolation_level=None)
setup.execute("PRAGMA journal_mode = WAL")
setup.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, name TEXT, body BLOB)")
setup.close()
objects = None
if mode == "sequence":
    from mrrp_pacs.store.objects import ObjectStore
    objects = ObjectStore(folder / "objects")
lock = threading.Lock()
body = os.urandom(2000)
interval = connections / rate
per_connection = int(seconds * rate / connections)
start_at = time.monotonic() + 0.5
results = {"latency": [], "commit": [], "object": []}
def worker(c):
    conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA synchronous = {sync}")
    latency, commit, obj = [], [], []
    for n in range(per_connection):
        due = start_at + (c / connections + n) * interval
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        name = f"m-{c}-{n}"
        t0 = time.perf_counter()
        if objects is not None:
            objects.put_bytes(name.encode() + body)
            obj.append(time.perf_counter() - t0)
        with lock:
            t1 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO messages (name, body) VALUES (?, ?)", (name, body))
            conn.execute("COMMIT")
            t2 = time.perf_counter()
        commit.append(t2 - t1)
        latency.append(t2 - t0)
    conn.close()
    with lock:
        results["latency"] += latency; results["commit"] += commit; results["object"] += obj
threads = [threading.Thread(target=worker, args=(c,)) for c in range(connections)]
for t in threads:
    t.start()
for t in threads:
    t.join()
results["elapsed"] = time.monotonic() - start_at
sys.stdout.write(json.dumps(results))
"""


# -- helpers ---------------------------------------------------------------------------------

def load1() -> float:
    return os.getloadavg()[0]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and of its children it has reaped."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_until(what: str, condition: Callable[[], bool], timeout_s: float,
               procs: list[subprocess.Popen[bytes]], log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
                raise SystemExit(f"{what}: the server exited ({proc.returncode})\n{tail}")
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: timed out")
        time.sleep(0.1)


def echo_ok(port: int) -> bool:
    done = subprocess.run(["echoscu", "-aet", BENCH_AE, "-aec", DAEMON_AE, LOOPBACK, str(port)],
                          capture_output=True, timeout=30)
    return done.returncode == 0


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 60
         ) -> bytes:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or b""


class Busy:
    """The other core kept busy (or not): one process spinning in a pure-Python loop."""

    def __init__(self, on: bool) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SPIN]) if on else None
        time.sleep(0.5)

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc, signal.SIGKILL)


def count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


# -- A. C-STORE servers ----------------------------------------------------------------------

@dataclass
class Server:
    """A running storage SCP: its processes, and how to count what it received."""

    procs: list[subprocess.Popen[bytes]]
    port: int
    count: Callable[[], int | None]
    cleanup: Callable[[], None] = lambda: None


def start_bare(work: Path, mode: str, processes: int, associations: int) -> Server:
    port = free_port()
    out = work / "received"
    out.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", BARE_SCP, str(port), mode, str(out),
                               "1" if processes > 1 else "0", str(associations)],
                              stdout=subprocess.PIPE, env=ENV) for _ in range(processes)]
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise SystemExit(f"bare SCP did not start: {line!r}")
    received: list[int] = []

    def cleanup() -> None:
        for proc in procs:
            text = stop(proc).decode().strip().splitlines()
            received.append(json.loads(text[-1])["received"] if text else 0)
    return Server(procs, port, lambda: sum(received) if received else None, cleanup)


def start_storescp(work: Path) -> Server:
    port = free_port()
    out = work / "received"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "--fork", "-aet", DAEMON_AE, "-od", str(out),
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until("storescp", lambda: echo_ok(port), 30, [proc])
    counted: list[int] = []

    def cleanup() -> None:
        time.sleep(0.3)  # the last forked children finish writing
        counted.append(count_files(out))
        stop(proc)
    return Server([proc], port, lambda: counted[0] if counted else None, cleanup)


def daemon_config(work: Path, associations: int, hl7_connections: int
                  ) -> tuple[Path, dict[str, int], Path]:
    """Differs from the defaults where every sender comes from 127.0.0.1: ``[dicom]
    max_associations`` and ``max_unassociated_per_address``, ``[hl7]
    max_connections_per_address`` (8: the 9th and 10th flood connections were closed)."""
    ports = {"dicom": free_port(), "hl7": free_port(), "http": free_port()}
    data = work / "data"
    config = work / "mrrp.toml"
    config.write_text(f"""
[paths]
data_dir = "{data}"
[dicom]
port = {ports['dicom']}
bind = "{LOOPBACK}"
allowed_aes = ["{BENCH_AE}"]
max_associations = {associations}
max_unassociated_per_address = {associations}
[hl7]
port = {ports['hl7']}
bind = "{LOOPBACK}"
max_connections_per_address = {hl7_connections}
[http]
port = {ports['http']}
bind = "{LOOPBACK}"
[scoring]
interval_s = 3600
[export]
enabled = false
""")
    return config, ports, data / "mrrp.sqlite3"


def start_daemon(work: Path, associations: int, hl7_connections: int
                 ) -> tuple[subprocess.Popen[bytes], dict[str, int], Path]:
    config, ports, db = daemon_config(work, associations, hl7_connections)
    log = work / "daemon.log"
    proc = subprocess.Popen([*MRRP, "--config", str(config), "serve"], stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, env=ENV)
    wait_until("daemon /healthz", lambda: healthy(ports["http"]), 120, [proc], log)
    time.sleep(1.0)  # the start-up jobs (no model: nothing to extract) settle
    return proc, ports, db


def start_our_daemon(work: Path, associations: int) -> Server:
    proc, ports, db = start_daemon(work, associations, 10)
    counted: list[int] = []

    def cleanup() -> None:
        counted.append(query(db, "SELECT COUNT(*) FROM instances WHERE patient_id LIKE "
                                 "'LOADUS%'")[0][0])
        stop(proc, signal.SIGKILL)  # counted; its data folder is thrown away
    return Server([proc], ports["dicom"], lambda: counted[0] if counted else None, cleanup)


SERVERS = ("bare", "bare+fsync", "daemon", "storescp", "2 x bare")
DEFAULT_SERVERS = ("bare", "bare+fsync", "daemon", "storescp")


def start_server(name: str, work: Path, associations: int) -> Server:
    if name == "bare":
        return start_bare(work, "bare", 1, associations)
    if name == "bare+fsync":
        return start_bare(work, "fsync", 1, associations)
    if name == "2 x bare":
        return start_bare(work, "bare", 2, associations)
    if name == "daemon":
        return start_our_daemon(work, associations)
    if name == "storescp":
        return start_storescp(work)
    raise ValueError(name)


@dataclass
class StoreRun:
    server: str
    busy: bool
    per_s: float
    sent: int
    received: int | None
    failed_senders: int
    scp_cpu_ms: float  # per instance
    client_cpu_ms: float
    load: tuple[float, float]
    seconds: float = 0.0
    errors: str = ""


def store_run(name: str, busy: bool, folders: list[Path], work: Path, associations: int
              ) -> StoreRun:
    work.mkdir(parents=True)
    server = start_server(name, work, associations)
    sent = sum(len(list(f.iterdir())) for f in folders)
    load_before = load1()
    cpu0 = [cpu_seconds(p.pid) for p in server.procs]
    clients0 = children_cpu()
    start = time.monotonic()
    senders = [subprocess.Popen(storescu_args(server.port, f), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT) for f in folders]
    outputs = [p.communicate(timeout=600)[0].decode("utf-8", "replace") for p in senders]
    elapsed = time.monotonic() - start
    clients = children_cpu() - clients0
    if name == "storescp":
        time.sleep(0.3)  # its forked children reaped
    cpu1 = [cpu_seconds(p.pid) for p in server.procs]
    load_after = load1()
    server.cleanup()
    failed = sum(p.returncode != 0 or "E:" in out for p, out in zip(senders, outputs, strict=True))
    scp_cpu = sum(b - a for a, b in zip(cpu0, cpu1, strict=True))
    errors = " | ".join(out.strip().splitlines()[-1] for out in outputs
                        if out.strip() and "E:" in out)[-600:]
    log = work / "daemon.log"
    if failed and log.exists():  # why the daemon refused or aborted (its own words)
        errors += "\n    daemon: " + "\n    daemon: ".join(
            line for line in log.read_text(errors="replace").splitlines()
            if " WARNING " in line or " ERROR " in line or "Traceback" in line)[-3000:]
    received = server.count()
    # the rate counts what the server received (a failed sender's objects are not counted)
    done = sent if received is None else received
    return StoreRun(name, busy, done / elapsed, sent, received, failed,
                    scp_cpu / sent * 1000, clients / sent * 1000, (load_before, load_after),
                    elapsed, errors)


# -- B. HL7: the durable floor beside the daemon's ACK ---------------------------------------

HL7_ARMS = ("commit FULL", "commit NORMAL", "sequence FULL", "daemon")


@dataclass
class Hl7Run:
    arm: str
    busy: bool
    latency_ms: list[float]
    commit_ms: list[float] = field(default_factory=list)
    object_ms: list[float] = field(default_factory=list)
    sent_per_s: float = 0.0
    not_aa: int = 0
    load: tuple[float, float] = (0.0, 0.0)
    detail: str = ""


def hl7_run(arm: str, busy: bool, work: Path, args: argparse.Namespace) -> Hl7Run:
    work.mkdir(parents=True)
    if arm == "daemon":
        daemon, ports, _ = start_daemon(work, args.associations, args.hl7_connections)
        try:
            load_before = load1()
            flood = hl7_flood(ports["hl7"], args.hl7_connections, args.hl7_rate,
                              args.hl7_seconds)
            load_after = load1()
        finally:
            stop(daemon, signal.SIGKILL)  # its data folder is thrown away
        not_aa = sum(n for code, n in flood.codes.items() if code != "AA") + len(flood.errors)
        return Hl7Run(arm, busy, flood.latencies_ms,
                      sent_per_s=flood.sent / flood.elapsed_s if flood.elapsed_s else 0.0,
                      not_aa=not_aa, load=(load_before, load_after),
                      detail=f"answers {flood.codes}" + "".join(f"; {e}" for e in flood.errors[:3]))
    mode = {"commit FULL": "full", "commit NORMAL": "normal", "sequence FULL": "sequence"}[arm]
    load_before = load1()
    done = subprocess.run([sys.executable, "-c", HL7_BARE, str(work), mode, str(args.hl7_rate),
                           str(args.hl7_connections), str(args.hl7_seconds)],
                          capture_output=True, env=ENV, timeout=600)
    load_after = load1()
    if done.returncode != 0:
        raise SystemExit(f"HL7 {arm}: {done.stderr.decode()[-2000:]}")
    out = json.loads(done.stdout)
    return Hl7Run(arm, busy, [v * 1000 for v in out["latency"]],
                  [v * 1000 for v in out["commit"]], [v * 1000 for v in out["object"]],
                  len(out["latency"]) / out["elapsed"], 0, (load_before, load_after))


# -- report ----------------------------------------------------------------------------------

def med(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else float("nan")


def cond(busy: bool) -> str:
    return "busy" if busy else "idle"


def loads(values: list[tuple[float, float]]) -> str:
    flat = [x for pair in values for x in pair]
    return f"{min(flat):.1f}-{max(flat):.1f}" if flat else "-"


def report(stores: list[StoreRun], hl7: list[Hl7Run], args: argparse.Namespace,
           load_start: tuple[float, ...], load_end: tuple[float, ...]) -> dict[str, object]:
    summary: dict[str, object] = {}
    print(f"\nThe ceiling, {args.rounds} rounds alternating; medians over rounds; load average "
          f"(1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in load_start)}, at end "
          f"{'/'.join(f'{x:.2f}' for x in load_end)}; {os.cpu_count()} CPUs")
    if stores:
        report_stores(stores, args, summary)
    if hl7:
        report_hl7(hl7, args, summary)
    return summary


def report_stores(stores: list[StoreRun], args: argparse.Namespace,
                  summary: dict[str, object]) -> None:
    print(f"\nA. C-STORE: {args.instances} US instances (78 kB) over {args.associations} "
          f"associations, sender dcmtk storescu (one process per association) for every "
          f"server; target >= {TARGET_CSTORE_PER_S:g}/s")
    print(f"{'server':<11} {'core':<4} {'inst/s':>6} {'/target':>7} {'/bare':>5} "
          f"{'each run':<28} {'SCP CPU':>7} {'send CPU':>8} {'max/s 1 core':>12} "
          f"{'recv/sent':>11} {'fail':>4} load")
    by: dict[tuple[str, bool], float] = {}
    for name in SERVERS:
        for busy in (False, True):
            runs = [r for r in stores if r.server == name and r.busy == busy]
            if runs:
                by[(name, busy)] = med([r.per_s for r in runs])
    for (name, busy), rate in by.items():
        runs = [r for r in stores if r.server == name and r.busy == busy]
        received = [r.received for r in runs]
        got = "?" if any(x is None for x in received) else \
            f"{min(x for x in received if x is not None)}/{runs[0].sent}"
        scp_ms = med([r.scp_cpu_ms for r in runs])
        bare = by.get(("bare", busy), float("nan"))
        print(f"{name:<11} {cond(busy):<4} {rate:>6.0f} {rate / TARGET_CSTORE_PER_S:>7.2f} "
              f"{rate / bare:>5.2f} {' '.join(f'{r.per_s:.0f}' for r in runs):<28} "
              f"{scp_ms:>7.1f} {med([r.client_cpu_ms for r in runs]):>8.1f} "
              f"{1000 / scp_ms if scp_ms > 0 else float('nan'):>12.0f} {got:>11} "
              f"{sum(r.failed_senders for r in runs):>4} {loads([r.load for r in runs])}")
        summary[f"cstore {name} {cond(busy)}"] = {
            "per_s_median": rate, "per_s": [r.per_s for r in runs],
            "scp_cpu_ms_per_instance": scp_ms, "received_min": got}
    print("(SCP / send CPU: ms of CPU per instance in the server / in all senders; max/s "
          "1 core = 1000 / SCP CPU ms: the rate one fully available core would give)")


def report_hl7(hl7: list[Hl7Run], args: argparse.Namespace, summary: dict[str, object]
               ) -> None:
    if hl7:
        print(f"\nB. HL7: {args.hl7_rate:g} msg/s over {args.hl7_connections} connections "
              f"(threads) for {args.hl7_seconds:g} s per run; latency from a message's start "
              f"to durable (bare arms) / ACK read (daemon), ms; target p99 <= "
              f"{TARGET_ACK_P99_MS:g}")
        print(f"{'arm':<14} {'core':<4} {'p50':>6} {'p99':>7} {'p99/target':>10} "
              f"{'max':>7} {'each run p99':<36} {'commit p99':>10} {'object p99':>10} "
              f"{'msg/s':>6} {'notAA':>5} load")
        for arm in HL7_ARMS:
            for busy in (False, True):
                arm_runs = [r for r in hl7 if r.arm == arm and r.busy == busy]
                if not arm_runs:
                    continue
                p99 = med([percentile(r.latency_ms, 99) for r in arm_runs])
                print(f"{arm:<14} {cond(busy):<4} "
                      f"{med([percentile(r.latency_ms, 50) for r in arm_runs]):>6.1f} "
                      f"{p99:>7.1f} {p99 / TARGET_ACK_P99_MS:>10.2f} "
                      f"{med([max(r.latency_ms, default=float('nan')) for r in arm_runs]):>7.0f} "
                      f"{' '.join(f'{percentile(r.latency_ms, 99):.1f}' for r in arm_runs):<36} "
                      f"{med([percentile(r.commit_ms, 99) for r in arm_runs]):>10.1f} "
                      f"{med([percentile(r.object_ms, 99) for r in arm_runs]):>10.1f} "
                      f"{med([r.sent_per_s for r in arm_runs]):>6.1f} "
                      f"{sum(r.not_aa for r in arm_runs):>5} {loads([r.load for r in arm_runs])}")
                summary[f"hl7 {arm} {cond(busy)}"] = {
                    "p50_ms_median": med([percentile(r.latency_ms, 50) for r in arm_runs]),
                    "p99_ms_median": p99,
                    "p99_ms": [percentile(r.latency_ms, 99) for r in arm_runs]}
        print("(commit p99: the INSERT + COMMIT alone, lock held; object p99: ObjectStore."
              "put_bytes; medians of each run's p99)")


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="about 3 min: 2 rounds, 400 instances, 3 s per HL7 run")
    parser.add_argument("--rounds", type=int, help="repetitions of every arm (default 5)")
    parser.add_argument("--instances", type=int, help="default 2000")
    parser.add_argument("--associations", type=int, default=20)
    parser.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                        help=f"comma-separated subset of {', '.join(SERVERS)} (\"\": no part A)")
    parser.add_argument("--hl7-seconds", type=float,
                        help="length of each HL7 run (default 6; 0: no part B)")
    parser.add_argument("--hl7-rate", type=float, default=100.0)
    parser.add_argument("--hl7-connections", type=int, default=10)
    parser.add_argument("--hl7-arms", default=",".join(HL7_ARMS),
                        help=f"comma-separated subset of {', '.join(HL7_ARMS)}")
    parser.add_argument("--hl7-core", choices=("idle", "busy", "both"), default="idle",
                        help="the other core during the HL7 runs (default idle)")
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.instances = args.instances or (400 if args.quick else 2000)
    if args.hl7_seconds is None:
        args.hl7_seconds = 3.0 if args.quick else 6.0
    return args


def main() -> None:
    args = options()
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    arms = [s.strip() for s in args.hl7_arms.split(",") if s.strip()]
    unknown = (set(servers) - set(SERVERS)) | (set(arms) - set(HL7_ARMS))
    if unknown:
        raise SystemExit(f"unknown servers / arms: {', '.join(sorted(unknown))}")
    if args.hl7_seconds <= 0:
        arms = []
    for tool in ("storescu", "echoscu", "storescp"):
        if shutil.which(tool) is None:
            raise SystemExit(f"dcmtk {tool} is needed (apt-get install dcmtk)")
    load_start = os.getloadavg()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-ceiling-"))
    print(f"bench_load_ceiling: {args.rounds} rounds, servers {servers}, HL7 arms {arms} "
          f"(other core {args.hl7_core}); {os.cpu_count()} CPUs; load average "
          f"{'/'.join(f'{x:.2f}' for x in load_start)}; work folder {work}", flush=True)
    stores: list[StoreRun] = []
    hl7: list[Hl7Run] = []
    runs = 0
    hl7_conditions = {"idle": (False,), "busy": (True,), "both": (False, True)}[args.hl7_core]
    try:
        folders = write_instances(work / "us", args.instances, args.associations) \
            if servers else []
        for rnd in range(args.rounds):
            conditions = (False, True) if rnd % 2 == 0 else (True, False)
            for busy in conditions if servers else ():
                shift = rnd % len(servers)
                order = servers[shift:] + servers[:shift]
                hog = Busy(busy)
                try:
                    for name in order:
                        runs += 1
                        run = store_run(name, busy, folders, work / f"run{runs}",
                                        args.associations)
                        stores.append(run)
                        print(f"round {rnd + 1} {cond(busy)} {name}: {run.per_s:.0f}/s "
                              f"({run.seconds:.1f} s), SCP {run.scp_cpu_ms:.1f} ms CPU/inst, "
                              f"received {run.received}/{run.sent}, failed senders "
                              f"{run.failed_senders}, load {run.load[0]:.1f}->"
                              f"{run.load[1]:.1f} [{time.monotonic() - started:.0f} s]"
                              f"{' senders: ' + run.errors if run.errors else ''}", flush=True)
                        shutil.rmtree(work / f"run{runs}", ignore_errors=True)
                finally:
                    hog.close()
            for busy in hl7_conditions if arms else ():
                shift = rnd % len(arms)
                hog = Busy(busy)
                try:
                    for arm in arms[shift:] + arms[:shift]:
                        runs += 1
                        h = hl7_run(arm, busy, work / f"run{runs}", args)
                        hl7.append(h)
                        at = time.monotonic() - started
                        print(f"round {rnd + 1} {cond(busy)} HL7 {arm}: p50 "
                              f"{percentile(h.latency_ms, 50):.1f} p99 "
                              f"{percentile(h.latency_ms, 99):.1f} ms, {h.sent_per_s:.1f} msg/s"
                              f", not AA {h.not_aa}, load {h.load[0]:.1f}->{h.load[1]:.1f}"
                              f" [{at:.0f} s]"
                              f"{' ' + h.detail if h.not_aa else ''}",
                              flush=True)
                        shutil.rmtree(work / f"run{runs}", ignore_errors=True)
                finally:
                    hog.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = report(stores, hl7, args, load_start, os.getloadavg())
    print(f"\nwall time {time.monotonic() - started:.0f} s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
    sys.exit(0)
