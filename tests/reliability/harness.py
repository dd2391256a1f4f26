"""The fault harness: a real daemon under real senders, killed with SIGKILL at named points.

A *chain* runs the daemon once per kill point, each time with ``MRRP_FAULTS`` set so that the
daemon SIGKILLs itself the N-th time it passes that point (:mod:`mrrp_pacs.faults`), then once
more without faults until everything is done. The senders behave as a hospital's do: an HL7
interface engine resends every message it holds no AA for, a modality resends every instance it
holds no success status for, and the PACS (a private Orthanc) keeps the slides the daemon pulls
and receives the results it exports.

After each kill: every HL7 message answered AA and every instance answered 0x0000 is stored.
At the end: every message and instance is stored, each (patient, model, inputs) is scored
exactly once and each patient has one current score, no outbox row is pending or dead, no
patient failed, and the SRs in Orthanc (C-FIND) are exactly the SRs the outbox sent, once each.
:func:`print_table` prints one table of totals.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from daemon_proc import daemon_config, find_instances, query, serve, wait_for
from orthanc import LOOPBACK, Orthanc, free_port, storescu
from pynetdicom import AE

from exporters.mllp_client import send_messages
from exporters.sr import SERIES_DESCRIPTION as SR_SERIES
from mrrp_pacs.hl7.ack import read_header
from mrrp_pacs.phantom.generator import PhantomSpec

SENDER_AE = "MODALITY"  # the harness's storage SCU, allowed by the daemon's config
SOAK = os.environ.get("MRRP_SOAK") == "1"
# the hospital's patients: each with a slide, an ultrasound study and both reports
HOSPITAL = PhantomSpec(patients=6 if SOAK else 4, seed=11, slide_px=1024, missing_wsi=0.0,
                       missing_us=0.0, missing_report=0.0)
# a PACS that hangs, is down or fails must cost time, not results: short timeouts and backoffs
# so that the outage is noticed and recovered from within a test
OUTAGE_SETTINGS: dict[str, dict[str, object]] = {
    "pacs": {"timeout_s": 3, "retrieve_timeout_s": 10, "retry_backoff_s": 1,
             "retry_max_backoff_s": 4},
    "export": {"timeout_s": 3, "max_backoff_s": 4},
}

# Every kill point of the product (fault_point calls in the code) and the largest N-th pass
# that a chain over the harness's phantom reaches: the seeded chains pick N in 1..max.
POINTS: dict[str, int] = {
    "intake.hl7.before_commit": 6,  # rows written, transaction open, no ACK sent
    "intake.hl7.committed": 6,  # stored, ACK not yet sent
    "intake.dicom.before_commit": 6,  # object file written, its row not committed
    "intake.dicom.committed": 6,  # stored, C-STORE response not yet sent (also mid-C-MOVE)
    "pull.series": 3,  # a series retrieved, the next one of the C-MOVE not yet asked for
    "score.committed": 3,  # a score row committed, its results not yet queued
    "publish.committed": 3,  # a score's objects queued, the next patient not yet begun
    "outbox.sent": 4,  # C-STORE of a result succeeded, the row not yet marked sent
}


@dataclass(frozen=True)
class KillPoint:
    point: str
    nth: int

    @property
    def env(self) -> dict[str, str]:
        return {"MRRP_FAULTS": f"{self.point}=kill#{self.nth}"}

    def __str__(self) -> str:
        return f"{self.point}#{self.nth}"


def seeded_points(seed: int, count: int) -> list[KillPoint]:
    """``count`` kill points (every named point before any repeats), N drawn with ``seed``."""
    rng = random.Random(seed)
    names = list(POINTS)
    chosen = []
    while len(chosen) < count:
        rng.shuffle(names)
        chosen.extend(names)
    return [KillPoint(name, rng.randint(1, POINTS[name])) for name in chosen[:count]]


@dataclass
class Senders:
    """What the hospital's senders hold: messages and instances, and which were answered."""

    hl7: dict[str, bytes]  # control id → message
    instances: dict[str, Path]  # SOP Instance UID → file (sent by C-STORE to the daemon)
    acked: set[str] = field(default_factory=set)  # control ids answered AA
    stored: set[str] = field(default_factory=set)  # SOP UIDs answered 0x0000

    def feed(self, ports: dict[str, int], daemon: subprocess.Popen[bytes]) -> None:
        """Send what holds no positive answer yet, until done or the daemon is gone."""
        # the MLLP port only: a bare TCP connect to the DICOM port holds one of the storage
        # SCP's [dicom] max_associations for its ACSE timeout (pynetdicom waits for an
        # A-ASSOCIATE-RQ), and probes every second lock every sender out; an association
        # attempt while it does not listen yet just fails
        if not wait_port(ports["hl7"], daemon):
            return
        waiting = [raw for cid, raw in self.hl7.items() if cid not in self.acked]
        try:
            for ack in send_messages(LOOPBACK, ports["hl7"], waiting, timeout_s=30):
                if ack.code == "AA":
                    self.acked.add(ack.control_id)
        except OSError:
            return
        self._store(ports["dicom"])

    def _store(self, port: int) -> None:
        files = {uid: path for uid, path in self.instances.items() if uid not in self.stored}
        if not files:
            return
        datasets = {uid: pydicom.dcmread(path) for uid, path in files.items()}
        ae = AE(ae_title=SENDER_AE)
        for pair in {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
                     for ds in datasets.values()}:
            ae.add_requested_context(*pair)
        assoc = ae.associate(LOOPBACK, port, ae_title="MRRP")
        if not assoc.is_established:
            return
        try:
            for uid, ds in datasets.items():
                status = assoc.send_c_store(ds)
                if not assoc.is_established:
                    return
                if status is not None and getattr(status, "Status", None) == 0x0000:
                    self.stored.add(uid)
        finally:
            if assoc.is_established:
                assoc.release()


@dataclass
class Round:
    kill: KillPoint | None
    killed: bool
    seconds: float
    acked: int
    stored: int
    lost: list[str]


@dataclass
class Chain:
    """One chain: the phantom, the Orthanc it lives in, the daemon's folder and the senders."""

    root: Path
    phantom: Path
    models: Path
    orthanc: Orthanc
    ports: dict[str, int]
    patients: int
    rounds: list[Round] = field(default_factory=list)
    settings: dict[str, dict[str, object]] = field(default_factory=dict)  # config overrides
    version: str | None = None  # the model version every current score must have to be done

    @classmethod
    def start(cls, root: Path, phantom: Path, models: Path, orthanc: Orthanc,
              ports: dict[str, int], patients: int) -> tuple[Chain, Senders]:
        """Load the slides into Orthanc (the daemon pulls them); the ultrasound studies and the
        HL7 messages are the senders' to send."""
        slides = root / "pacs-load"
        for path in (phantom / "dicom").rglob("*.dcm"):
            if path.parent.name != "us":
                target = slides / path.relative_to(phantom / "dicom")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
        loaded = storescu(orthanc, slides)
        assert loaded.returncode == 0, loaded.stderr
        hl7 = {}
        for path in sorted((phantom / "hl7").glob("*.hl7")):
            raw = path.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
            header = read_header(raw)
            assert header is not None and header.control_id, path
            hl7[header.control_id] = raw
        instances = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                     for p in sorted((phantom / "dicom").rglob("us/*.dcm"))}
        chain = cls(root, phantom, models, orthanc, ports, patients)
        return chain, Senders(hl7, instances)

    @property
    def db(self) -> Path:
        return self.root / "daemon" / "mrrp.sqlite3"

    @property
    def log(self) -> Path:
        return self.root / "daemon.log"

    @property
    def config(self) -> Path:
        return daemon_config(self.root, str(self.models), self.ports, self.orthanc.dicom_port,
                             allowed_aes=(SENDER_AE,), settings=self.settings)

    def run(self, senders: Senders, kill: KillPoint | None, timeout_s: float = 600) -> Round:
        """Run the daemon until ``kill`` kills it (or, without one, until all is done)."""
        started = time.monotonic()
        daemon = serve(self.config, self.log, env=kill.env if kill else None)
        try:
            senders.feed(self.ports, daemon)
            if kill is None:
                wait_for("everything stored, scored and sent",
                         lambda: self.quiet(senders), timeout_s, daemon, self.log)
            else:
                deadline = time.monotonic() + timeout_s
                while daemon.poll() is None:
                    assert not self.quiet(senders), (
                        f"kill point {kill} was never reached: everything was done")
                    assert time.monotonic() < deadline, f"kill point {kill} not reached in time"
                    senders.feed(self.ports, daemon)
                    time.sleep(0.5)
                assert daemon.returncode == -signal.SIGKILL, (
                    f"the daemon ended with {daemon.returncode}, not by the kill at {kill}:\n"
                    f"{self.log.read_text()[-3000:]}")
        finally:
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                code = daemon.wait(timeout=120)
                assert code == 0, self.log.read_text()[-3000:]
        done = Round(kill, kill is not None, round(time.monotonic() - started, 1),
                     len(senders.acked), len(senders.stored), self._lost(senders))
        self.rounds.append(done)
        return done

    def _lost(self, senders: Senders) -> list[str]:
        """What was answered positively and is not stored (must be empty)."""
        controls = {c for (c,) in query(self.db, "SELECT control_id FROM hl7_messages")}
        uids = {u for (u,) in query(self.db, "SELECT sop_instance_uid FROM instances")}
        return ([f"HL7 {c}" for c in sorted(senders.acked - controls)]
                + [f"instance {u}" for u in sorted(senders.stored - uids)])

    def quiet(self, senders: Senders) -> bool:
        """Everything answered, stored, scored and sent."""
        if len(senders.acked) < len(senders.hl7) or len(senders.stored) < len(senders.instances):
            return False
        current = query(self.db, "SELECT COUNT(*) FROM scores WHERE superseded_by IS NULL")
        if current != [(self.patients,)]:
            return False
        if self.version is not None and query(
                self.db, "SELECT COUNT(*) FROM scores WHERE superseded_by IS NULL AND "
                         "model_version = ?", (self.version,)) != [(self.patients,)]:
            return False
        if query(self.db, "SELECT COUNT(*) FROM exports WHERE state = 'pending'") != [(0,)]:
            return False
        unsent = query(self.db, "SELECT COUNT(*) FROM scores s WHERE superseded_by IS NULL AND "
                                "NOT EXISTS (SELECT 1 FROM exports e WHERE e.score_id = s.id "
                                "AND e.kind = 'pdf' AND e.state = 'sent')")
        return unsent == [(0,)]

    def check(self, senders: Senders) -> dict[str, int]:
        """The end state's invariants; returns the totals for the table."""
        loaded = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                  for p in (self.root / "pacs-load").rglob("*.dcm")}
        held = {u for (u,) in query(self.db, "SELECT sop_instance_uid FROM instances")}
        ours = {u for (u,) in query(self.db, "SELECT sop_instance_uid FROM exports "
                                             "WHERE sop_instance_uid IS NOT NULL")}
        duplicates = query(self.db, "SELECT COUNT(*) FROM (SELECT 1 FROM scores GROUP BY "
                                    "patient_key, model_version, inputs_hash HAVING COUNT(*) > 1)")
        current = query(self.db, "SELECT patient_key, COUNT(*) FROM scores "
                                 "WHERE superseded_by IS NULL GROUP BY patient_key")
        states = dict(query(self.db, "SELECT state, COUNT(*) FROM exports GROUP BY state"))
        failed = query(self.db, "SELECT COUNT(*) FROM patient_failures")[0][0]
        sent_srs = [u for (u,) in query(self.db, "SELECT sop_instance_uid FROM exports "
                                                 "WHERE kind = 'sr' AND state = 'sent'")]
        in_pacs = [str(i.SOPInstanceUID) for i in find_instances(self.orthanc.dicom_port)
                   if i.SeriesDescription == SR_SERIES]
        totals = {
            "HL7 messages": len(senders.hl7), "HL7 answered AA": len(senders.acked),
            "instances sent": len(senders.instances), "instances answered 0x0000":
                len(senders.stored), "instances in the PACS": len(loaded),
            "instances stored": len(held & (loaded | set(senders.instances))),
            "our results pulled back": len(held & ours),
            "patients with one current score": sum(n == 1 for _, n in current),
            "duplicate scores (patient, model, inputs)": duplicates[0][0],
            "outbox sent": states.get("sent", 0), "outbox pending": states.get("pending", 0),
            "outbox dead": states.get("dead", 0), "patients failed": failed,
            "SRs in Orthanc": len(in_pacs), "SRs sent": len(sent_srs),
            "lost after a kill": sum(len(r.lost) for r in self.rounds),
        }
        assert totals["HL7 answered AA"] == totals["HL7 messages"], totals
        assert totals["instances answered 0x0000"] == totals["instances sent"], totals
        # everything is stored; besides, only our own results, which the puller fetches back
        # when they grow a study it watches
        assert loaded | set(senders.instances) <= held, totals
        assert held - loaded - set(senders.instances) <= ours, totals
        assert totals["patients with one current score"] == self.patients == len(current), totals
        assert totals["duplicate scores (patient, model, inputs)"] == 0, totals
        assert totals["outbox pending"] == totals["outbox dead"] == 0, totals
        assert failed == 0, totals
        assert sorted(in_pacs) == sorted(set(sent_srs)), (sorted(in_pacs), sorted(sent_srs))
        assert len(sent_srs) == len(set(sent_srs)), "an SR was queued twice"
        assert totals["lost after a kill"] == 0, [r.lost for r in self.rounds]
        return totals


def print_table(chains: list[Chain], totals: list[dict[str, int]]) -> str:
    """One table: each round (kill point, killed, seconds), then the totals of every chain."""
    lines = [f"{'kill point':<34} {'killed':>6} {'s':>6} {'AA':>4} {'0x0000':>6} {'lost':>4}"]
    for chain in chains:
        for r in chain.rounds:
            lines.append(f"{r.kill or '(recovery)'!s:<34} {'yes' if r.killed else '-':>6} "
                         f"{r.seconds:>6.1f} {r.acked:>4} {r.stored:>6} {len(r.lost):>4}")
    keys = list(totals[0]) if totals else []
    lines.append("")
    lines.extend(f"{key:<44} {sum(t[key] for t in totals):>6}" for key in keys)
    text = "\n".join(lines)
    print(text)
    return text


def subset(phantom: Path, root: Path, patients: int) -> Path:
    """A copy of ``phantom`` (its DICOM and HL7 folders) with its first ``patients`` patients
    only: the outage scenarios run on fewer patients than the kill chains in CI."""
    keep = sorted(p.name for p in (phantom / "dicom").iterdir())[:patients]
    target = root / "hospital"
    for patient in keep:
        shutil.copytree(phantom / "dicom" / patient, target / "dicom" / patient)
    (target / "hl7").mkdir(parents=True)
    for message in (phantom / "hl7").glob("*.hl7"):
        if any(message.name.startswith(f"{patient}-") for patient in keep):
            shutil.copy2(message, target / "hl7" / message.name)
    return target


def new_ports() -> dict[str, int]:
    return {"dicom": free_port(), "hl7": free_port(), "http": free_port()}


def wait_port(port: int, daemon: subprocess.Popen[bytes], timeout_s: float = 120) -> bool:
    """Whether the daemon listens on ``port`` (False when it died first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            return False
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.2)
    return False
