"""Load figures of the daemon (issue 17): HL7 ACK latency, C-STORE throughput, RSS with a slide.

Run: ``PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_load.py [--quick] [options]``
(``--help`` lists them; ``--keep DIR`` keeps the prepared folders and reuses the trained model).

What it does, against a real ``mrrp-pacs serve`` started as a subprocess on a temporary data
folder (every listener on 127.0.0.1, free ports):

0. Setup. A *training* phantom (its own folder and database) is ingested, its US encoder
   trained, its features extracted and the MRRP model trained (``--max-epochs 2 --no-tune``)
   and promoted: the hospital's history. A second, *daemon* phantom of ``--patients`` patients
   is ingested into the daemon's database **without extracting anything**, so the ``process``
   job that runs when the daemon starts extracts (in its worker process) and scores every
   ready case for real: the full scoring run the figures are taken under. The benchmark waits
   until that job's row says ``running`` and records, before and after each phase, whether it
   still was (and how many scores it had written).
1. HL7 flood: ``--hl7-rate`` messages/s in total over ``--hl7-connections`` MLLP connections
   for ``--hl7-seconds``; each connection sends on a fixed schedule and waits for each ACK
   (a late message goes as soon as the previous ACK came). Messages are ORU^R01 pathology
   results for new patients (3 in 4) and corrected results for patients already sent (1 in 4),
   built with :mod:`mrrp_pacs.phantom.messages`. Latency: from the first byte written to the
   whole ACK read.
2. C-STORE: ``--instances`` small ultrasound images (unique SOP Instance UIDs, built with
   :func:`mrrp_pacs.phantom.dicom_objects.ultrasound_image`) over ``--associations``
   concurrent associations, one dcmtk ``storescu`` process each. Failures = instances sent
   minus instances the daemon's database holds afterwards (the ground truth: a 0x0000 is
   only answered once stored), plus the senders' exit codes.
3. RSS: one slide (a VL Whole Slide Microscopy instance of JPEG tiles, ``--slide-gb`` GB,
   written streaming to disk) sent by ``storescu``; the daemon's resident set is read from
   ``/proc/PID/status`` every 100 ms. Baseline = median over the 2 s before, peak = the
   maximum from the send until 2 s after.

Prints one table with the issue's targets beside the figures, the load average of the machine
during each phase (the figures are only as quiet as the machine), and whether the scoring run
was in progress. Exit status 0 whether or not targets are met (it is a measurement); 2 when
the setup or the daemon failed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEGBaseline8Bit, VLWholeSlideMicroscopyImageStorage, generate_uid

from mrrp_pacs.phantom.dicom_objects import Demographics, StudyInfo, ultrasound_image
from mrrp_pacs.phantom.messages import MessageContext, pathology_result

LOOPBACK = "127.0.0.1"
MRRP = [sys.executable, "-m", "mrrp_pacs"]
BENCH_AE = "BENCH"
DAEMON_AE = "MRRP"
VT, FS, CR = b"\x0b", b"\x1c", b"\x0d"

TARGET_ACK_P99_MS = 50.0
TARGET_CSTORE_PER_S = 200.0


# -- helpers ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def run(args: list[str], what: str, timeout_s: float = 3600, env: dict[str, str] | None = None
        ) -> str:
    started = time.monotonic()
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        print(f"{what} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n"
              f"{done.stderr[-3000:]}", file=sys.stderr)
        raise SystemExit(2)
    print(f"  {what}: {time.monotonic() - started:.0f} s", flush=True)
    return done.stdout


def query(db: Path, sql: str, args: tuple[object, ...] = ()) -> list[tuple]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, args).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# -- setup -----------------------------------------------------------------------------------

def prepare_training(root: Path, patients: int, max_tiles: int) -> Path:
    """Train (once per ``root``) and return the model store holding encoder and model."""
    db = root / "state" / "db.sqlite3"
    models = db.parent / "models"
    marker = root / "trained.ok"
    if marker.exists():
        print(f"  training: reusing the model in {models}", flush=True)
        return models
    if root.exists():
        shutil.rmtree(root)
    env = {"MRRP__FEATURES__MAX_TILES": str(max_tiles), "MRRP__FEATURES__WORKERS": "1"}
    dbargs = ["--db", str(db)]
    run([*MRRP, "phantom", "--patients", str(patients), "--seed", "101", "--slide-px", "1024",
         "--out", str(root / "phantom"), "--workers", "2"], "training phantom")
    run([*MRRP, "ingest", *dbargs, str(root / "phantom" / "dicom"),
         str(root / "phantom" / "hl7")], "training ingest")
    run([*MRRP, "train-encoder", "us", "--epochs", "2", *dbargs], "US encoder", env=env)
    run([*MRRP, "extract", *dbargs], "training extract", env=env)
    outcomes = root / "outcomes.csv"
    with (root / "phantom" / "truth.csv").open() as source, outcomes.open("w",
                                                                          newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["patient_id", "time_months", "event", "split"])
        for row in csv.DictReader(source):
            writer.writerow([row["patient_id"], row["time_months"], row["event"], row["split"]])
    run([*MRRP, "train", *dbargs, "--outcomes", str(outcomes), "--max-epochs", "2",
         "--no-tune"], "train MRRP (2 epochs, no tuning)", env=env)
    marker.write_text("ok\n")
    return models


def prepare_daemon(root: Path, patients: int, models: Path, max_tiles: int,
                   ports: dict[str, int], associations: int, hl7_connections: int
                   ) -> tuple[Path, Path]:
    """The daemon's phantom ingested (not extracted) and its config; (config, db).

    Differences from the defaults, all said in the output: ``[dicom] max_associations`` is
    raised to ``associations`` (the default, 10, rejects the rest) and so is
    ``max_unassociated_per_address`` (every sender is 127.0.0.1), ``[hl7]
    max_connections_per_address`` to ``hl7_connections`` (the default, 8, closes the 9th and
    10th flood connections), export is off (no PACS),
    ``scoring.wait_hours = 0`` (every case with one modality is ready at once).
    """
    data = root / "daemon"
    if root.exists():
        shutil.rmtree(root)
    run([*MRRP, "phantom", "--patients", str(patients), "--seed", "202", "--slide-px", "1024",
         "--out", str(root / "phantom"), "--workers", "2"], f"daemon phantom ({patients})")
    db = data / "mrrp.sqlite3"
    run([*MRRP, "ingest", "--db", str(db), str(root / "phantom" / "dicom"),
         str(root / "phantom" / "hl7")], "daemon ingest (no extraction)")
    config = root / "mrrp.toml"
    config.write_text(f"""
[paths]
data_dir = "{data}"
model_store = "{models}"
[features]
max_tiles = {max_tiles}
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
wait_hours = 0
[export]
enabled = false
""")
    return config, db


# -- the daemon and its scoring run ----------------------------------------------------------

@dataclass
class ScoringState:
    running: bool
    scores: int
    job_id: int | None

    def text(self) -> str:
        return f"{'running' if self.running else 'NOT running'}, {self.scores} scores"


def scoring_state(db: Path) -> ScoringState:
    rows = query(db, "SELECT id, state FROM jobs WHERE kind = 'process' ORDER BY id DESC "
                     "LIMIT 1")
    scores = query(db, "SELECT COUNT(*) FROM scores")
    running = bool(rows) and rows[0][1] == "running"
    return ScoringState(running, scores[0][0] if scores else 0, rows[0][0] if rows else None)


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float,
             daemon: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if daemon.poll() is not None:
            print(f"the daemon exited while waiting for {what}:\n{log.read_text()[-3000:]}",
                  file=sys.stderr)
            raise SystemExit(2)
        if time.monotonic() > deadline:
            print(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}", file=sys.stderr)
            raise SystemExit(2)
        time.sleep(0.2)


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/healthz", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


@dataclass
class Phase:
    name: str
    before: ScoringState
    after: ScoringState | None = None
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    wall_start: float = 0.0
    wall_end: float = 0.0

    def scoring(self) -> str:
        assert self.after is not None
        if self.before.running and self.after.running \
                and self.before.job_id == self.after.job_id:
            return (f"yes (process job {self.before.job_id} running before and after; "
                    f"scores {self.before.scores} -> {self.after.scores})")
        return f"NO (before: {self.before.text()}; after: {self.after.text()})"


def begin(name: str, db: Path) -> Phase:
    return Phase(name, scoring_state(db), load_before=os.getloadavg(), wall_start=time.time())


def end(phase: Phase, db: Path) -> Phase:
    phase.after = scoring_state(db)
    phase.load_after = os.getloadavg()
    phase.wall_end = time.time()
    return phase


# -- 1. HL7 flood ----------------------------------------------------------------------------

CLINICAL = {"age_years": 55, "tumour_size_mm": 18, "grade": 2, "positive_nodes": 1,
            "er_percent": 90, "pr_percent": 60, "her2_ihc": "1+", "ki67_percent": 15,
            "subtype": "luminal_a"}


def flood_message(connection: int, n: int) -> bytes:
    """Message ``n`` of one connection: a new patient, or (1 in 4) a corrected result."""
    patient = n - 1 if n % 4 == 3 else n
    pid = f"LOAD{connection:02d}{patient:05d}"
    ctx = MessageContext(pid, "HOSP", f"LOAD^{pid}", "19700101", "F", "R")
    clinical = dict(CLINICAL, tumour_size_mm=10 + n % 30, ki67_percent=5 + n % 40)
    return pathology_result(ctx, f"LOAD-{connection}-{n}-{time.time_ns()}",
                            f"PA-{pid}", "20260110", clinical)


@dataclass
class FloodResult:
    latencies_ms: list[float] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    sent: int = 0
    elapsed_s: float = 0.0


def _read_ack(sock: socket.socket, buffer: bytearray) -> bytes:
    while True:
        end_at = buffer.find(FS + CR)
        if end_at >= 0:
            start = buffer.find(VT)
            frame = bytes(buffer[start + 1:end_at])
            del buffer[:end_at + 2]
            return frame
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the ACK")
        buffer.extend(chunk)


def _ack_code(frame: bytes) -> str:
    for segment in frame.split(b"\r"):
        if segment.startswith(b"MSA"):
            return segment.split(b"|")[1].decode("ascii", "replace")
    return "?"


def hl7_flood(port: int, connections: int, rate: float, seconds: float) -> FloodResult:
    result = FloodResult()
    lock = threading.Lock()
    interval = connections / rate  # each connection's share of the rate
    per_connection = int(seconds * rate / connections)
    messages = [[flood_message(c, n) for n in range(per_connection)] for c in range(connections)]
    start_at = time.monotonic() + 0.5

    def sender(c: int) -> None:
        latencies: list[float] = []
        codes: dict[str, int] = {}
        sent = 0
        try:
            with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buffer = bytearray()
                for n, message in enumerate(messages[c]):
                    due = start_at + (c / connections + n) * interval
                    pause = due - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    t0 = time.perf_counter()
                    sock.sendall(VT + message + FS + CR)
                    code = _ack_code(_read_ack(sock, buffer))
                    latencies.append((time.perf_counter() - t0) * 1000.0)
                    codes[code] = codes.get(code, 0) + 1
                    sent += 1
        except OSError as exc:
            with lock:
                result.errors.append(f"connection {c}: {type(exc).__name__}: {exc}")
        with lock:
            result.latencies_ms.extend(latencies)
            for code, count in codes.items():
                result.codes[code] = result.codes.get(code, 0) + count
            result.sent += sent

    threads = [threading.Thread(target=sender, args=(c,)) for c in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.elapsed_s = time.monotonic() - start_at
    return result


# -- 2. C-STORE throughput -------------------------------------------------------------------

def write_instances(folder: Path, count: int, associations: int, rows: int = 240,
                    columns: int = 320) -> list[Path]:
    """``count`` US images (unique UIDs) spread over one folder per association."""
    rng = np.random.default_rng(17)
    base = rng.integers(0, 256, size=(rows, columns), dtype=np.uint8)
    folders = [folder / f"a{a:02d}" for a in range(associations)]
    for f in folders:
        f.mkdir(parents=True)
    run_id = time.time_ns()
    for i in range(count):
        patient = f"LOADUS{i // 20:05d}"
        who = Demographics(patient, "HOSP", f"LOAD^{patient}", "19700101", "F")
        study = StudyInfo(generate_uid(entropy_srcs=[str(run_id), patient, "study"]),
                          f"US-{patient}", "1", "20260105", "101500", "US breast")
        pixels = np.roll(base, i, axis=1)
        ds = ultrasound_image(pixels, 0.1, who, study, "R", f"load-{run_id}-{i}")
        ds.InstanceNumber = i % 20 + 1
        dcmwrite(folders[i % associations] / f"{i:05d}.dcm", ds, enforce_file_format=True)
    return folders


def storescu_args(port: int, *paths: Path) -> list[str]:
    storescu = shutil.which("storescu")
    if storescu is None:
        raise SystemExit("dcmtk storescu is needed (apt-get install dcmtk)")
    # -R: propose only the SOP classes found; -xy: JPEG baseline in a context of its own (the
    # slide's tiles go as they are, not to be transcoded); +sd: scan a folder; generous timeouts
    return [storescu, "-aet", BENCH_AE, "-aec", DAEMON_AE, "-R", "-xy", "-to", "120", "-ta", "120",
            "-td", "600", "+sd", LOOPBACK, str(port), *map(str, paths)]


@dataclass
class StoreResult:
    sent: int
    stored: int
    elapsed_s: float
    exit_codes: list[int]
    rejected_associations: int
    stderr_tail: str


def c_store_burst(port: int, folders: list[Path], db: Path) -> StoreResult:
    before = query(db, "SELECT COUNT(*) FROM instances WHERE patient_id LIKE 'LOADUS%'")[0][0]
    sent = sum(len(list(f.iterdir())) for f in folders)
    start = time.monotonic()
    procs = [subprocess.Popen(storescu_args(port, f), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for f in folders]
    outputs = [p.communicate()[0].decode("utf-8", "replace") for p in procs]
    elapsed = time.monotonic() - start
    after = query(db, "SELECT COUNT(*) FROM instances WHERE patient_id LIKE 'LOADUS%'")[0][0]
    rejected = sum("Association Rejected" in out for out in outputs)
    tail = "\n".join(out.strip().splitlines()[-1] for out in outputs
                     if out.strip() and "E:" in out)[-1500:]
    return StoreResult(sent, after - before, elapsed, [p.returncode for p in procs], rejected,
                       tail)


# -- 3. one large slide ----------------------------------------------------------------------

def write_large_slide(path: Path, gigabytes: float, tile_px: int = 512) -> int:
    """A VL WSI instance of JPEG tiles (one noisy tile repeated), streamed to ``path``.

    Returns its size in bytes. The pixel data element is written by hand (encapsulated,
    undefined length) so that no more than one tile is ever in memory.
    """
    rng = np.random.default_rng(5)
    tile = rng.integers(120, 255, size=(tile_px, tile_px, 3), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(tile).save(encoded, format="JPEG", quality=90, subsampling=1)
    jpeg = encoded.getvalue()
    if len(jpeg) % 2:
        jpeg += b"\x00"
    frames = max(1, int(gigabytes * 1e9 / (len(jpeg) + 8)))
    columns = tile_px * int(np.ceil(np.sqrt(frames)))
    rows_tiles = int(np.ceil(frames / (columns // tile_px)))
    frames = rows_tiles * (columns // tile_px)  # TILED_FULL: whole rows of tiles
    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = "LOADWSI", "HOSP", "LOAD^WSI"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260110", "101500", "PA-LOADWSI"
    ds.Modality = "SM"
    ds.FrameOfReferenceUID = generate_uid()
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = tile_px
    ds.TotalPixelMatrixColumns = columns
    ds.TotalPixelMatrixRows = rows_tiles * tile_px
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.LossyImageCompression = "01"
    with path.open("wb") as out:
        dcmwrite(out, ds, enforce_file_format=True)
        # (7FE0,0010) OB, undefined length; empty basic offset table; one item per frame
        out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
        out.write(struct.pack("<HHI", 0xFFFE, 0xE000, 0))
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(jpeg)) + jpeg
        batch = 64
        for done in range(0, frames, batch):
            out.write(item * min(batch, frames - done))
        out.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return path.stat().st_size


@dataclass
class RssResult:
    baseline_kib: float
    peak_kib: int
    samples: int
    elapsed_s: float
    stored: bool
    exit_code: int
    slide_bytes: int
    output_tail: str


def slide_rss(port: int, slide: Path, pid: int, db: Path) -> RssResult:
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            value = rss_kib(pid)
            if value is not None:
                samples.append((time.monotonic(), value))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(2.0)
    start = time.monotonic()
    done = subprocess.run(storescu_args(port, slide), capture_output=True, text=True,
                          timeout=3600)
    elapsed = time.monotonic() - start
    time.sleep(2.0)
    stop.set()
    sampler.join()
    baseline = statistics.median(v for t, v in samples if t < start)
    peak = max(v for t, v in samples if t >= start)
    stored = bool(query(db, "SELECT COUNT(*) FROM instances WHERE patient_id = 'LOADWSI'")[0][0])
    return RssResult(baseline, peak, len(samples), elapsed, stored, done.returncode,
                     slide.stat().st_size, (done.stdout + done.stderr)[-800:])


# -- --profile: where the time goes -----------------------------------------------------------

TICKER = """
import json, os, signal, sys, tempfile, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # not ignored in a background job
late, syncs = [], []
def fsyncs():
    with tempfile.NamedTemporaryFile(dir=sys.argv[1]) as f:
        while True:
            f.write(b"x" * 512); f.flush()
            t0 = time.time(); os.fsync(f.fileno()); syncs.append((t0, time.time() - t0))
            time.sleep(0.05)
threading.Thread(target=fsyncs, daemon=True).start()
try:
    while True:
        t0 = time.time(); time.sleep(0.001); late.append((t0, time.time() - t0 - 0.001))
except KeyboardInterrupt:
    sys.stdout.write(json.dumps([late, syncs]))
"""


class Ticker:
    """A process of its own that sleeps 1 ms in a loop: how late the OS wakes a thread that
    has no GIL to wait for (the machine's share of the daemon's ``tick``); and that fsyncs a
    small write every 50 ms in ``folder`` (on the daemon's disk): what one fsync costs there."""

    def __init__(self, folder: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", TICKER, str(folder)],
                                        stdout=subprocess.PIPE, text=True)

    def stop(self) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        self.process.send_signal(signal.SIGINT)
        out, _ = self.process.communicate(timeout=60)
        if not out:
            return [], []
        late, syncs = json.loads(out)
        return [(t, v) for t, v in late], [(t, v) for t, v in syncs]


def _stats_ms(values: list[float]) -> str:
    if not values:
        return "-"
    ms = np.asarray(values) * 1000.0
    return (f"n={len(ms)} p50 {np.percentile(ms, 50):.1f} p99 {np.percentile(ms, 99):.1f} "
            f"max {ms.max():.0f} ms")


def report_profile(profile: dict, ticks: list[tuple[float, float]],
                   syncs: list[tuple[float, float]], phases: tuple[Phase, Phase, Phase]
                   ) -> None:
    events = profile["events"]
    print("\n--profile: where the time goes (daemon timers, ms)")
    for phase in phases:
        def within(kind: str, threads: str | None = None, exclude: str | None = None,
                   phase: Phase = phase) -> list[float]:
            return [d for t, d, name in events.get(kind, [])
                    if phase.wall_start <= t <= phase.wall_end
                    and (threads is None or name.startswith(threads))
                    and (exclude is None or not name.startswith(exclude))]

        span = phase.wall_end - phase.wall_start
        print(f"{phase.name} ({span:.0f} s):")
        if phase.name == "HL7":
            answer, persist = within("answer"), within("persist")
            print(f"  ACK written - frame read (answer): {_stats_ms(answer)}")
            print(f"  persist in executor thread:        {_stats_ms(persist)}")
            if answer and persist:
                print(f"  => waiting for an executor thread / the event loop: answer p99 "
                      f"{np.percentile(answer, 99) * 1000:.1f} vs persist p99 "
                      f"{np.percentile(persist, 99) * 1000:.1f} ms")
            who = "mllp-intake"
        else:
            who = "AcceptorThread"  # pynetdicom's association threads (C-STORE handlers)
        for kind, label in (("begin", "BEGIN IMMEDIATE (SQLite busy wait)"),
                            ("body", "statements"), ("commit", "COMMIT (WAL fsync)"),
                            ("object", "object file + fsyncs")):
            print(f"  {label:34} listener: {_stats_ms(within(kind, who))}; scheduler: "
                  f"{_stats_ms(within(kind, 'ThreadPoolExecutor'))}")
        group, sizes = within("group"), within("group_size")
        if group:
            print(f"  {'group commit (one batch)':34} {_stats_ms(group)}; writes per batch: "
                  f"mean {np.mean(sizes):.1f}, max {max(sizes):.0f}")
        daemon_ticks = within("tick")
        machine = [late for t, late in ticks if phase.wall_start <= t <= phase.wall_end]
        print(f"  1 ms sleep, lateness in the daemon (GIL + CPU): {_stats_ms(daemon_ticks)}")
        print(f"  1 ms sleep, lateness in a separate process (CPU): {_stats_ms(machine)}")
        disk = [d for t, d in syncs if phase.wall_start <= t <= phase.wall_end]
        print(f"  fsync of 512 bytes by a separate process, same disk: {_stats_ms(disk)}")
        samples = profile["cpu"]
        first = [c for t, c in samples if t <= phase.wall_start][-1:] or samples[:1]
        last = [c for t, c in samples if t <= phase.wall_end][-1:]
        if first and last:
            share = {g: (last[0].get(g, 0.0) - first[0].get(g, 0.0)) / span for g in last[0]}
            print("  daemon CPU, cores busy by thread group: " + ", ".join(
                f"{g} {v:.2f}" for g, v in sorted(share.items(), key=lambda kv: -kv[1])
                if v >= 0.01))


# -- main ------------------------------------------------------------------------------------

def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 12 patients, 10 s flood, 200 instances, 0.2 GB slide")
    parser.add_argument("--patients", type=int, help="daemon phantom size (default 60)")
    parser.add_argument("--training-patients", type=int, default=16)
    parser.add_argument("--max-tiles", type=int, default=64,
                        help="[features] max_tiles of training and daemon (default 64)")
    parser.add_argument("--hl7-seconds", type=float)
    parser.add_argument("--hl7-rate", type=float, default=100.0, help="messages/s in total")
    parser.add_argument("--hl7-connections", type=int, default=10)
    parser.add_argument("--instances", type=int)
    parser.add_argument("--associations", type=int, default=20)
    parser.add_argument("--slide-gb", type=float)
    parser.add_argument("--profile", action="store_true",
                        help="run the daemon through benchmarks/load_probe.py and print where "
                        "the time goes in each phase (timers around persist, SQLite lock and "
                        "commit, object fsync; GIL wait; CPU per thread)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (the "
                        "trained model in it is reused by the next run)")
    args = parser.parse_args()
    quick = args.quick
    args.patients = args.patients or (12 if quick else 60)
    args.hl7_seconds = args.hl7_seconds or (10.0 if quick else 60.0)
    args.instances = args.instances or (200 if quick else 2000)
    args.slide_gb = args.slide_gb or (0.2 if quick else 2.0)
    return args


def main() -> None:
    args = options()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        work = args.keep
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    print(f"bench_load: {args.patients} patients, {args.hl7_rate:g} msg/s over "
          f"{args.hl7_connections} connections for {args.hl7_seconds:g} s, {args.instances} "
          f"instances over {args.associations} associations, {args.slide_gb:g} GB slide; "
          f"{os.cpu_count()} CPUs; work folder {work}", flush=True)
    ports = {"dicom": free_port(), "hl7": free_port(), "http": free_port()}
    daemon: subprocess.Popen[bytes] | None = None
    try:
        print("setup:", flush=True)
        models = prepare_training(work / "training", args.training_patients, args.max_tiles)
        config, db = prepare_daemon(work / "run", args.patients, models, args.max_tiles, ports,
                                    args.associations, args.hl7_connections)
        ready = query(db, "SELECT COUNT(*) FROM instances")[0][0]
        print(f"  daemon database: {ready} instances, no features; config differs from the "
              f"defaults in [dicom] max_associations = {args.associations} (default 10) and "
              f"max_unassociated_per_address (8), [hl7] max_connections_per_address = "
              f"{args.hl7_connections} (8), "
              "[export] enabled = false, [scoring] wait_hours = 0", flush=True)
        folders = write_instances(work / "run" / "us", args.instances, args.associations)
        slide = work / "run" / "slide.dcm"
        slide_bytes = write_large_slide(slide, args.slide_gb)
        print(f"  {args.instances} US instances and a {slide_bytes / 1e9:.2f} GB slide written",
              flush=True)

        log = work / "run" / "daemon.log"
        probe_out = work / "run" / "probe.json"
        launcher = [sys.executable, str(Path(__file__).with_name("load_probe.py")),
                    str(probe_out)] if args.profile else MRRP
        daemon = subprocess.Popen([*launcher, "--config", str(config), "serve"],
                                  stdout=log.open("ab"), stderr=subprocess.STDOUT)
        ticker = Ticker(db.parent) if args.profile else None
        wait_for("/healthz 200", lambda: healthy(ports["http"]), 120, daemon, log)
        wait_for("the process job running", lambda: scoring_state(db).running, 120, daemon,
                 log)
        time.sleep(3.0)  # into the run: the worker has started extracting
        print(f"daemon pid {daemon.pid} up; scoring run: {scoring_state(db).text()}",
              flush=True)

        phase1 = begin("HL7", db)
        flood = hl7_flood(ports["hl7"], args.hl7_connections, args.hl7_rate, args.hl7_seconds)
        end(phase1, db)
        print(f"HL7 flood done: {flood.sent} messages in {flood.elapsed_s:.1f} s", flush=True)

        phase2 = begin("C-STORE", db)
        store = c_store_burst(ports["dicom"], folders, db)
        end(phase2, db)
        print(f"C-STORE done: {store.stored}/{store.sent} in {store.elapsed_s:.1f} s",
              flush=True)

        phase3 = begin("slide", db)
        rss = slide_rss(ports["dicom"], slide, daemon.pid, db)
        end(phase3, db)
        print(f"slide done in {rss.elapsed_s:.1f} s", flush=True)
        final = scoring_state(db)
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=120)
            except subprocess.TimeoutExpired:
                daemon.kill()
        ticks, syncs = ticker.stop() if ticker is not None else ([], [])
        profile = json.loads(probe_out.read_text()) if args.profile and probe_out.exists() \
            else None
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(args, flood, store, rss, (phase1, phase2, phase3), final)
    if args.profile:
        if profile is None:
            print("--profile: the probe wrote nothing (did the daemon exit cleanly?)")
        else:
            report_profile(profile, ticks, syncs, (phase1, phase2, phase3))


def report(args: argparse.Namespace, flood: FloodResult, store: StoreResult, rss: RssResult,
           phases: tuple[Phase, Phase, Phase], final: ScoringState) -> None:
    lat = flood.latencies_ms
    p99 = percentile(lat, 99)
    rate = store.stored / store.elapsed_s if store.elapsed_s else 0.0
    other = {k: v for k, v in flood.codes.items() if k != "AA"}
    growth = (rss.peak_kib - rss.baseline_kib) * 1024
    lines = [
        ("HL7 messages sent/s (asked)",
         f"{flood.sent / flood.elapsed_s:.1f} ({args.hl7_rate:g})", "100", ""),
        ("HL7 ACK p50 / p95 ms", f"{percentile(lat, 50):.1f} / {percentile(lat, 95):.1f}", "",
         ""),
        ("HL7 ACK p99 ms", f"{p99:.1f}", f"<= {TARGET_ACK_P99_MS:g}",
         "met" if p99 <= TARGET_ACK_P99_MS else "MISSED"),
        ("HL7 ACK max ms", f"{max(lat) if lat else float('nan'):.1f}", "", ""),
        ("HL7 AA / other / conn. errors",
         f"{flood.codes.get('AA', 0)} / {sum(other.values())} {other or ''} / "
         f"{len(flood.errors)}", "all AA", "met" if not other and not flood.errors else "MISSED"),
        ("C-STORE US instances/s", f"{rate:.0f}", f">= {TARGET_CSTORE_PER_S:g}",
         "met" if rate >= TARGET_CSTORE_PER_S else "MISSED"),
        ("C-STORE stored / sent (failed)",
         f"{store.stored} / {store.sent} ({store.sent - store.stored})", "0 failed",
         "met" if store.stored == store.sent else "MISSED"),
        ("C-STORE associations rejected", f"{store.rejected_associations} of "
         f"{args.associations}", "0", "met" if not store.rejected_associations else "MISSED"),
        ("slide size GB", f"{rss.slide_bytes / 1e9:.2f} ({'stored' if rss.stored else 'NOT stored'}"
         f", storescu exit {rss.exit_code}, {rss.elapsed_s:.0f} s)", "", ""),
        ("daemon RSS baseline / peak MiB",
         f"{rss.baseline_kib / 1024:.0f} / {rss.peak_kib / 1024:.0f}", "", ""),
        ("daemon RSS peak - baseline MiB",
         f"{growth / 2**20:.0f} ({growth / rss.slide_bytes:.2f} x slide size)", "report",
         "SCALES with slide size" if growth > 0.5 * rss.slide_bytes else "flat"),
    ]
    width = max(len(a) for a, *_ in lines)
    print()
    print(f"{'figure':<{width}}  {'measured':<40} {'target':<10} verdict")
    for name, value, target, verdict in lines:
        print(f"{name:<{width}}  {value:<40} {target:<10} {verdict}")
    print()
    for phase in phases:
        print(f"{phase.name:8} scoring run in progress: {phase.scoring()}; load average "
              f"(1/5/15 min) before {'/'.join(f'{x:.2f}' for x in phase.load_before)}, after "
              f"{'/'.join(f'{x:.2f}' for x in phase.load_after)}")
    print(f"after all phases: scoring run {final.text()}")
    for error in flood.errors[:5]:
        print(f"HL7 connection error: {error}")
    if store.stderr_tail:
        print(f"storescu errors (last line of each failing sender):\n{store.stderr_tail}")
    if not rss.stored:
        print(f"slide storescu output: {rss.output_tail}")
    print(json.dumps({
        "hl7": {"sent": flood.sent, "seconds": round(flood.elapsed_s, 2), "codes": flood.codes,
                "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "p99_ms": p99,
                "max_ms": max(lat) if lat else None},
        "c_store": {"sent": store.sent, "stored": store.stored,
                    "seconds": round(store.elapsed_s, 2), "per_s": rate,
                    "rejected_associations": store.rejected_associations},
        "slide": {"bytes": rss.slide_bytes, "stored": rss.stored,
                  "rss_baseline_mib": rss.baseline_kib / 1024, "rss_peak_mib": rss.peak_kib / 1024},
    }))


if __name__ == "__main__":
    main()
