"""The outbox over a real SQLite store, sending to a real Orthanc and a real pynetdicom SCP."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from builders import Patient, encode, us_image, us_roi_sr
from clocks import SteppingClock
from hl7apy import parser as hl7apy_parser
from orthanc import LOOPBACK, Orthanc, free_port, running_orthanc
from pydicom.dataset import Dataset
from storage_peer import storage_scp

from exporters.dicom_sender import DicomSender, DicomSession
from exporters.hl7_result import MllpSender, build_oru_r01
from exporters.outbox import DrainSummary, Enqueued, ExportRow, Outbox, SendSession
from listeners.mllp import MllpServer
from mrrp_pacs.config import load_config
from mrrp_pacs.hl7.message import parse_message
from mrrp_pacs.intake import Intake
from mrrp_pacs.results import RiskResult
from mrrp_pacs.store import Store

T0 = datetime(2026, 1, 6, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def sr_object(patient_id: str = "OBX001") -> Dataset:
    patient = Patient(patient_id)
    return us_roi_sr(patient, us_image(patient), (10.0, 12.0, 40.0, 30.0))


def queue_sr(outbox: Outbox, ds: Dataset, destination: str = "pacs") -> Enqueued:
    return outbox.enqueue(None, score_id=None, kind="sr", destination=destination,
                          data=encode(ds), sop_instance_uid=ds.SOPInstanceUID)


def held_uids(server: Orthanc) -> set[str]:
    return {i["MainDicomTags"]["SOPInstanceUID"] for i in server.get("/instances?expand")}


def only_row(outbox: Outbox) -> ExportRow:
    (row,) = outbox.rows()
    return row


@pytest.fixture
def clock() -> SteppingClock:
    """The store's clock (conftest's ``store`` fixture reads it), at T0 until a test moves it."""
    return SteppingClock(T0)


@pytest.fixture
def outbox(store: Store) -> Outbox:
    return Outbox(store)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), aet="PACS") as server:
        yield server


def test_enqueue_records_the_object_and_a_pending_row_once(
        outbox: Outbox, store: Store, clock: SteppingClock) -> None:
    ds = sr_object()
    data = encode(ds)
    with store.transaction() as conn:
        score_id = store.insert(conn, "scores", {
            "patient_key": "OBX001^^^HOSP", "model_version": "1", "inputs_hash": "h",
            "outputs": "{}", "created_at": "2026-01-06T11:59:00Z"})
    first = outbox.enqueue(None, score_id=score_id, kind="sr", destination="pacs", data=data,
                           sop_instance_uid=ds.SOPInstanceUID)
    clock.set(at(60))
    again = outbox.enqueue(None, score_id=score_id, kind="sr", destination="pacs", data=data,
                           sop_instance_uid=ds.SOPInstanceUID)

    assert first.created and again == Enqueued(first.row_id, created=False)
    row = only_row(outbox)
    assert (row.id, row.score_id, row.kind, row.destination, row.sop_instance_uid) == (
        first.row_id, score_id, "sr", "pacs", ds.SOPInstanceUID)
    assert (row.state, row.attempts, row.last_error, row.sent_at) == ("pending", 0, None, None)
    assert row.next_attempt_at == row.created_at == "2026-01-06T12:00:00Z"
    assert row.object_sha256 is not None
    assert store.objects.read_bytes(row.object_sha256) == data
    assert outbox.due() == [row]
    clock.set(at(-1))
    assert outbox.due() == []
    clock.set(at(60))

    other = queue_sr(outbox, ds, destination="archive")
    assert other.created
    assert [(r.destination, r.object_sha256) for r in outbox.rows()] == [
        ("pacs", row.object_sha256), ("archive", row.object_sha256)]


def test_enqueue_commits_with_the_callers_transaction(outbox: Outbox, store: Store) -> None:
    ds = sr_object()
    with pytest.raises(RuntimeError, match="scoring failed"), store.transaction() as conn:
        outbox.enqueue(conn, score_id=None, kind="sr", destination="pacs", data=encode(ds),
                       sop_instance_uid=ds.SOPInstanceUID)
        raise RuntimeError("scoring failed")
    assert outbox.rows() == []

    with store.transaction() as conn:
        queued = outbox.enqueue(conn, score_id=None, kind="sr", destination="pacs",
                                data=encode(ds), sop_instance_uid=ds.SOPInstanceUID)
    assert [r.id for r in outbox.rows(["pending"])] == [queued.row_id]


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"kind": "png"}, "export kind 'png'"),
    ({"destination": "PACS 1"}, "destination name"),
    ({"sop_instance_uid": None}, "needs a valid SOP Instance UID"),
    ({"sop_instance_uid": "1.2.abc"}, "needs a valid SOP Instance UID"),
    ({"data": b""}, "empty object"),
])
def test_enqueue_refuses_bad_arguments(outbox: Outbox, kwargs: dict[str, object],
                                       words: str) -> None:
    request: dict[str, object] = {"score_id": None, "kind": "sr", "destination": "pacs",
                                  "data": b"DICM", "sop_instance_uid": "1.2.3"}
    with pytest.raises(ValueError, match=words):
        outbox.enqueue(None, **(request | kwargs))  # type: ignore[arg-type]
    assert outbox.rows() == []


@pytest.mark.needs_tool("Orthanc")
def test_drain_delivers_to_orthanc_and_a_second_drain_sends_nothing(
        outbox: Outbox, orthanc: Orthanc, clock: SteppingClock) -> None:
    objects = [sr_object("OBX002"), sr_object("OBX003")]
    for ds in objects:
        queue_sr(outbox, ds)
    senders = {"pacs": DicomSender(LOOPBACK, orthanc.dicom_port, "PACS", timeout_s=10)}

    clock.set(at(1))
    assert outbox.drain(senders) == DrainSummary(sent=2)
    assert {ds.SOPInstanceUID for ds in objects} <= held_uids(orthanc)
    rows = outbox.rows()
    assert [(r.state, r.attempts, r.last_error, r.next_attempt_at, r.sent_at) for r in rows] == [
        ("sent", 1, None, None, "2026-01-06T12:00:01Z")] * 2

    clock.set(at(3600))
    assert outbox.drain(senders) == DrainSummary()
    assert outbox.rows() == rows
    assert outbox.counts() == {"pending": 0, "sent": 2, "dead": 0}


@pytest.mark.needs_tool("Orthanc")
def test_pacs_down_backs_off_dies_keeps_everything_then_retry_delivers_once(
        outbox: Outbox, store: Store, tmp_path: Path, clock: SteppingClock) -> None:
    ds = sr_object("OBX004")
    queued = queue_sr(outbox, ds)
    down_port = free_port()  # nothing listens there
    down = {"pacs": DicomSender(LOOPBACK, down_port, "PACS", timeout_s=5)}
    policy: dict[str, Any] = {"max_attempts": 4, "backoff_s": 10.0, "max_backoff_s": 25.0}

    history = []
    for seconds in (0, 9, 10, 29, 30, 55):
        clock.set(at(seconds))
        summary = outbox.drain(down, **policy)
        row = only_row(outbox)
        history.append((seconds, summary.retried, summary.dead, row.state, row.attempts,
                        row.next_attempt_at))
    assert history == [
        (0, 1, 0, "pending", 1, "2026-01-06T12:00:10Z"),   # +10 s
        (9, 0, 0, "pending", 1, "2026-01-06T12:00:10Z"),   # not due yet
        (10, 1, 0, "pending", 2, "2026-01-06T12:00:30Z"),  # +20 s
        (29, 0, 0, "pending", 2, "2026-01-06T12:00:30Z"),
        (30, 1, 0, "pending", 3, "2026-01-06T12:00:55Z"),  # +40 s, capped at 25 s
        (55, 0, 1, "dead", 4, None),
    ]
    dead = only_row(outbox)
    assert dead.id == queued.row_id
    assert dead.last_error == (f"no association with PACS@{LOOPBACK}:{down_port}: connection "
                               "refused, timed out or aborted (timeout 5 s)")
    assert dead.object_sha256 is not None and store.objects.contains(dead.object_sha256)
    clock.set(at(10**6))
    assert outbox.drain(down, **policy) == DrainSummary()

    with running_orthanc(tmp_path / "orthanc", aet="PACS") as server:
        up = {"pacs": DicomSender(LOOPBACK, server.dicom_port, "PACS", timeout_s=10)}
        assert held_uids(server) == set()
        clock.set(at(100))
        assert outbox.retry() == [queued.row_id]
        retried = only_row(outbox)
        assert (retried.state, retried.attempts, retried.next_attempt_at) == (
            "pending", 0, "2026-01-06T12:01:40Z")

        assert outbox.drain(up, **policy) == DrainSummary(sent=1)
        assert held_uids(server) == {ds.SOPInstanceUID}
        sent = only_row(outbox)
        assert (sent.state, sent.attempts, sent.last_error) == ("sent", 1, None)

        clock.set(at(200))
        assert outbox.drain(up, **policy) == DrainSummary()
        assert server.statistics()["CountInstances"] == 1
        assert only_row(outbox) == sent


@pytest.mark.needs_tool("Orthanc")
def test_called_ae_mismatch_is_recorded_readably(outbox: Outbox, orthanc: Orthanc) -> None:
    queue_sr(outbox, sr_object("OBX005"))
    wrong = {"pacs": DicomSender(LOOPBACK, orthanc.dicom_port, "WRONGAE", "MRRP", timeout_s=10)}
    # rejected-permanent: trying again cannot help until someone changes a configuration
    assert outbox.drain(wrong) == DrainSummary(dead=1)
    row = only_row(outbox)
    assert (row.state, row.attempts, row.next_attempt_at) == ("dead", 1, None)
    assert row.last_error == (f"association rejected by WRONGAE@{LOOPBACK}:{orthanc.dicom_port}: "
                              "Called AE title not recognised (Rejected Permanent, from "
                              "Service User; calling AE MRRP)")
    assert "OBX005" not in row.summary()


def test_permanent_refusal_is_dead_at_once_and_retry_by_id_resends(
        outbox: Outbox, clock: SteppingClock) -> None:
    ds = sr_object("OBX006")
    queued = queue_sr(outbox, ds)
    with storage_scp([0xC000]) as peer:
        senders = {"pacs": DicomSender(LOOPBACK, peer.port, "TESTSCP", timeout_s=10)}
        assert outbox.drain(senders) == DrainSummary(dead=1)
        dead = only_row(outbox)
        assert (dead.state, dead.attempts, dead.next_attempt_at) == ("dead", 1, None)
        assert dead.summary() == (
            f"{queued.row_id:>6}  dead    sr  pacs  attempts=1  since 2026-01-06T12:00:00Z  "
            f"sop={ds.SOPInstanceUID}  error: C-STORE refused by TESTSCP@{LOOPBACK}:{peer.port}: "
            "status 0xC000 (Cannot Understand)")

        clock.set(at(5))
        assert outbox.retry([queued.row_id]) == [queued.row_id]
        assert outbox.drain(senders) == DrainSummary(sent=1)
        assert peer.received == [ds.SOPInstanceUID] * 2

        # an operator can send a delivered object again (e.g. the PACS lost it)
        clock.set(at(9))
        assert outbox.retry([queued.row_id]) == [queued.row_id]
        assert outbox.drain(senders) == DrainSummary(sent=1)
        assert peer.received == [ds.SOPInstanceUID] * 3
    with pytest.raises(ValueError, match="no export rows with id 999"):
        outbox.retry([queued.row_id, 999])
    assert outbox.retry() == []


def test_out_of_resources_is_retried(outbox: Outbox, clock: SteppingClock) -> None:
    queue_sr(outbox, sr_object("OBX007"))
    with storage_scp([0xA700]) as peer:
        senders = {"pacs": DicomSender(LOOPBACK, peer.port, "TESTSCP", timeout_s=10)}
        assert outbox.drain(senders, backoff_s=30) == DrainSummary(retried=1)
        assert only_row(outbox).next_attempt_at == "2026-01-06T12:00:30Z"
        clock.set(at(30))
        assert outbox.drain(senders, backoff_s=30) == DrainSummary(sent=1)
        assert len(peer.received) == 2


def test_rows_without_a_sender_wait_and_missing_objects_die(outbox: Outbox,
                                                            store: Store) -> None:
    waiting = queue_sr(outbox, sr_object("OBX008"), destination="archive")
    lost = queue_sr(outbox, sr_object("OBX009"))
    lost_sha = outbox.rows()[1].object_sha256
    assert lost_sha is not None
    store.objects.path_for(lost_sha).unlink()
    senders = {"pacs": DicomSender(LOOPBACK, free_port(), "PACS", timeout_s=5)}

    assert outbox.drain(senders) == DrainSummary(dead=1, skipped=1)
    by_id = {r.id: r for r in outbox.rows()}
    assert (by_id[waiting.row_id].state, by_id[waiting.row_id].attempts) == ("pending", 0)
    assert by_id[lost.row_id].state == "dead"
    assert by_id[lost.row_id].last_error == (
        f"object {lost_sha[:12]} is missing from the object store")


class DrainWhileSending:
    """A sender that runs a second outbox's drain in the middle of each of its own sends."""

    def __init__(self, inner: DicomSender, other: Outbox) -> None:
        self.inner = inner
        self.other = other
        self.other_summaries: list[DrainSummary] = []

    @property
    def peer(self) -> str:
        return self.inner.peer

    @contextmanager
    def session(self) -> Iterator[SendSession]:
        with self.inner.session() as session:
            yield self._Session(self, session)

    @dataclass
    class _Session:
        outer: DrainWhileSending
        session: DicomSession

        def send(self, data: bytes) -> None:
            outer = self.outer
            outer.other_summaries.append(outer.other.drain({"pacs": outer.inner}))
            self.session.send(data)


def test_two_drains_at_once_send_each_row_once(outbox: Outbox, store: Store) -> None:
    objects = [sr_object("OBX010"), sr_object("OBX011")]
    for ds in objects:
        queue_sr(outbox, ds)
    with Store(store.db_path, store.objects.root, clock=store.clock) as second_store, \
            storage_scp() as peer:
        sender = DicomSender(LOOPBACK, peer.port, "TESTSCP", timeout_s=10)
        racing = DrainWhileSending(sender, Outbox(second_store))
        first = outbox.drain({"pacs": racing})
        # the second drain, run while row 1 was being sent, found row 1 claimed and sent row 2;
        # the first then found row 2 taken and skipped it
        assert first == DrainSummary(sent=1)
        assert racing.other_summaries == [DrainSummary(sent=1)]
        assert sorted(peer.received) == sorted(ds.SOPInstanceUID for ds in objects)
    assert [r.state for r in outbox.rows()] == ["sent", "sent"]


def test_a_sender_bug_is_recorded_not_raised(outbox: Outbox) -> None:
    class Broken:
        peer = "BROKEN@nowhere:0"

        @contextmanager
        def session(self) -> Iterator[SendSession]:
            yield self

        def send(self, data: bytes) -> None:
            raise sqlite3.InterfaceError("bug")

    queue_sr(outbox, sr_object("OBX012"))
    assert outbox.drain({"pacs": Broken()}) == DrainSummary(retried=1)
    assert only_row(outbox).last_error == (
        "unexpected InterfaceError while sending to BROKEN@nowhere:0")


def test_drain_refuses_a_bad_policy(outbox: Outbox) -> None:
    with pytest.raises(ValueError, match="max_attempts >= 1"):
        outbox.drain({}, max_attempts=0)
    with pytest.raises(ValueError, match="max_backoff_s >= backoff_s"):
        outbox.drain({}, backoff_s=60, max_backoff_s=10)
    with pytest.raises(ValueError, match="not a valid ExportState"):
        outbox.rows(["lost"])


# -- HL7 results over MLLP -------------------------------------------------------------------

def risk_result(patient_key: str = "OBX100^^^HOSP") -> RiskResult:
    return RiskResult(
        patient_key=patient_key, model_name="mrrp", model_version="3", inputs_hash="abc",
        risk=0.41234, percentile=72.46, group="high", cutoff=0.0,
        rfs_probability={"60": 0.8123, "36": 0.9012, "84": 0.7431},
        modalities_used=["clinical", "us"], compensated=["wsi"],
        clinical_attention=[("age", 0.6), ("grade", 0.4)], evidence=[], us_region=None,
        scored_at="2026-01-06T11:30:00Z")


def test_oru_r01_reads_back_with_our_reader_and_hl7apy() -> None:
    raw = build_oru_r01(risk_result("A|B&C^^^HOSP~1"), control_id="MRRP17",
                        message_time=T0, receiving_application="RIS")
    message = parse_message(raw)
    assert message.get("MSH-9") == "ORU" and message.get("MSH-10") == "MRRP17"
    assert message.get("MSH-7") == "20260106120000+0000"
    assert (message.get("PID-3.1"), message.get("PID-3.4")) == ("A|B&C", "HOSP~1")
    assert message.get("OBR-4") == "MRRP" and message.get("OBR-25") == "F"
    obx = [(message.component(s, 3), message.component(s, 5), message.component(s, 6))
           for s in message.segments if s.name == "OBX"]
    assert obx == [("MRRP-RISK", "0.4123", ""), ("MRRP-PCT", "72.5", "%"),
                   ("MRRP-GROUP", "high", ""), ("MRRP-RFS-36", "0.9012", ""),
                   ("MRRP-RFS-60", "0.8123", ""), ("MRRP-RFS-84", "0.7431", ""),
                   ("MRRP-MODEL", "mrrp@3", ""), ("MRRP-COMP", "wsi", "")]

    reference = hl7apy_parser.parse_message(raw.decode().replace("\r", "\n").strip()
                                            .replace("\n", "\r"), find_groups=False)
    assert reference.msh.msh_12.value == "2.5.1"
    assert [o.obx_14.value for o in reference.obx] == ["20260106113000+0000"] * 8


def test_hl7_result_is_delivered_to_an_mllp_listener_that_persists_it(
        outbox: Outbox, tmp_path: Path, clock: SteppingClock) -> None:
    config = load_config(None, environ={}).with_db(tmp_path / "ris" / "db.sqlite3")
    server = MllpServer(lambda: Intake(Store(config.paths.db_file, config.paths.objects_dir),
                                       config), port=0, workers=1, idle_timeout_s=10)
    handle = server.run_in_thread()
    try:
        queued = outbox.enqueue(None, score_id=None, kind="hl7", destination="ris",
                                data=build_oru_r01(risk_result(), control_id="MRRP1",
                                                   message_time=T0),
                                sop_instance_uid=None)
        senders = {"ris": MllpSender(LOOPBACK, handle.port, timeout_s=10)}
        assert outbox.drain(senders) == DrainSummary(sent=1)
        clock.set(at(60))
        assert outbox.drain(senders) == DrainSummary()
    finally:
        handle.stop()
    assert only_row(outbox).id == queued.row_id
    with Store(config.paths.db_file, config.paths.objects_dir) as received:
        (message,) = received.conn.execute(
            "SELECT message_type, control_id, patient_id FROM hl7_messages").fetchall()
        assert tuple(message) == ("ORU^R01", "MRRP1", "OBX100")
        values = dict(received.conn.execute("SELECT code, value FROM observations").fetchall())
    assert values["MRRP-RISK"] == "0.4123" and values["MRRP-GROUP"] == "high"


@contextmanager
def acknowledging(code: str) -> Iterator[int]:
    """An MLLP peer that answers every message with MSA-1 ``code``; yields its port."""
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError, IndexError), connection:
                connection.settimeout(5)
                data = b""
                while not data.endswith(b"\x1c\r"):
                    chunk = connection.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                control_id = data[1:].split(b"\r")[0].split(b"|")[9].decode()
                connection.sendall(
                    b"\x0bMSH|^~\\&|RIS|H|MRRP|H|20260106120000||ACK^R01^ACK|A1|P|2.5.1\r"
                    + f"MSA|{code}|{control_id}\r".encode() + b"\x1c\r")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(10)
        listener.close()


def test_hl7_rejection_is_permanent_and_application_error_transient(
        outbox: Outbox, clock: SteppingClock) -> None:
    data = build_oru_r01(risk_result(), control_id="MRRP2", message_time=T0)
    rejected = outbox.enqueue(None, score_id=None, kind="hl7", destination="ris-ar", data=data,
                              sop_instance_uid=None)
    erred = outbox.enqueue(None, score_id=None, kind="hl7", destination="ris-ae", data=data,
                           sop_instance_uid=None)
    with acknowledging("AR") as ar_port, acknowledging("AE") as ae_port:
        senders = {"ris-ar": MllpSender(LOOPBACK, ar_port, timeout_s=5),
                   "ris-ae": MllpSender(LOOPBACK, ae_port, timeout_s=5)}
        assert outbox.drain(senders) == DrainSummary(retried=1, dead=1)
    by_id = {r.id: r for r in outbox.rows()}
    assert (by_id[rejected.row_id].state, by_id[rejected.row_id].last_error) == (
        "dead", f"mllp://{LOOPBACK}:{ar_port} answered AR")
    assert (by_id[erred.row_id].state, by_id[erred.row_id].last_error) == (
        "pending", f"mllp://{LOOPBACK}:{ae_port} answered AE")

    closed = {"ris-ae": MllpSender(LOOPBACK, free_port(), timeout_s=5)}
    clock.set(at(60))
    assert outbox.drain(closed) == DrainSummary(retried=1)
    assert outbox.rows(["pending"])[0].last_error == (
        f"no MLLP connection to {closed['ris-ae'].peer} (ConnectionRefusedError)")
