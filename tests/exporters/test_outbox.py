"""The outbox over a real SQLite store, sending to a real Orthanc and a real pynetdicom SCP."""

from __future__ import annotations

import contextlib
import dataclasses
import random
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
from exporters.outbox import (
    DrainSummary,
    Enqueued,
    ExportConflict,
    ExportRow,
    Outbox,
    SendSession,
)
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


def test_one_sop_instance_uid_per_destination_same_bytes_or_refused(
        outbox: Outbox, store: Store, caplog: pytest.LogCaptureFixture) -> None:
    ds = sr_object("OBX013")
    first = queue_sr(outbox, ds)
    assert queue_sr(outbox, ds) == Enqueued(first.row_id, created=False)

    changed = encode(ds)
    ds.SeriesDescription = "another document under the same UID"
    with pytest.raises(ExportConflict) as caught:
        queue_sr(outbox, ds)
    assert changed != encode(ds)
    assert caught.value.uid == ds.SOPInstanceUID
    assert f"SOP Instance UID {ds.SOPInstanceUID} is already queued for pacs" in str(caught.value)
    assert [r.id for r in outbox.rows()] == [first.row_id]
    assert "OBX013" not in caplog.text and ds.SOPInstanceUID not in caplog.text
    assert f"export {first.row_id} holds the same SOP Instance UID" in caplog.text

    # refused inside the caller's transaction: nothing of it is queued
    other = sr_object("OBX014")
    with pytest.raises(ExportConflict), store.transaction() as conn:
        outbox.enqueue(conn, score_id=None, kind="sr", destination="pacs",
                       data=encode(other), sop_instance_uid=other.SOPInstanceUID)
        outbox.enqueue(conn, score_id=None, kind="sr", destination="pacs",
                       data=encode(ds), sop_instance_uid=ds.SOPInstanceUID)
    assert [r.id for r in outbox.rows()] == [first.row_id]
    # another destination is another row
    assert queue_sr(outbox, ds, destination="archive").created


def test_hl7_results_are_keyed_by_their_control_id(outbox: Outbox) -> None:
    def queue(control_id: str, risk: float) -> Enqueued:
        message = build_oru_r01(dataclasses.replace(risk_result(), risk=risk),
                                control_id=control_id, message_time=T0)
        return outbox.enqueue(None, score_id=None, kind="hl7", destination="his",
                              data=message, sop_instance_uid=None)

    first = queue("MRRP7", 0.5)
    assert queue("MRRP7", 0.5) == Enqueued(first.row_id, created=False)
    with pytest.raises(ExportConflict, match="HL7 control id hl7:MRRP7 is already queued"):
        queue("MRRP7", 0.9)
    assert queue("MRRP7R1", 0.9).created
    assert [r.object_key for r in outbox.rows()] == ["hl7:MRRP7", "hl7:MRRP7R1"]
    with pytest.raises(ValueError, match="control id"):
        outbox.enqueue(None, score_id=None, kind="hl7", destination="his",
                       data=b"MSH|^~\\&|MRRP\r", sop_instance_uid=None)


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


def next_try(row: ExportRow) -> datetime:
    assert row.next_attempt_at is not None
    return datetime.fromisoformat(row.next_attempt_at)


@pytest.mark.needs_tool("Orthanc")
def test_pacs_down_backs_off_with_jitter_until_its_time_budget_then_retry_delivers_once(
        store: Store, tmp_path: Path, clock: SteppingClock) -> None:
    outbox = Outbox(store, rng=random.Random(4))
    ds = sr_object("OBX004")
    queued = queue_sr(outbox, ds)
    down_port = free_port()  # nothing listens there
    down = {"pacs": DicomSender(LOOPBACK, down_port, "PACS", timeout_s=5)}
    policy: dict[str, Any] = {"retry_hours": 100 / 3600, "backoff_s": 10.0,
                              "max_backoff_s": 25.0}
    deadline = at(100)  # the budget counts from the first failure, at T0

    now, delays = at(0), []
    while True:
        clock.set(now)
        summary = outbox.drain(down, **policy)
        row = only_row(outbox)
        if row.state == "dead":
            break
        assert summary == DrainSummary(retried=1)
        assert row.failing_since == "2026-01-06T12:00:00Z"
        due = next_try(row)
        delay = (due - now).total_seconds()
        ceiling = min(10.0 * 2 ** (row.attempts - 1), 25.0)
        # jittered into the upper half of the capped exponential delay (stamps in whole
        # seconds), or cut short by the end of the budget
        assert ceiling / 2 - 1 <= delay <= ceiling or due == deadline, (row.attempts, delay)
        assert due <= deadline
        clock.set(due - timedelta(seconds=1))
        assert outbox.drain(down, **policy) == DrainSummary()  # not due yet
        delays.append(delay)
        now = due
    assert summary == DrainSummary(dead=1)
    assert now == deadline  # the last try is at the end of the budget, and it died then
    assert row.attempts == len(delays) + 1 >= 5
    assert len(set(delays)) > 2  # exponential, jittered: not one fixed step
    assert row.id == queued.row_id
    assert row.last_error == (f"no association with PACS@{LOOPBACK}:{down_port}: connection "
                              "refused, timed out or aborted (timeout 5 s)")
    assert row.object_sha256 is not None and store.objects.contains(row.object_sha256)
    clock.set(at(10**6))
    assert outbox.drain(down, **policy) == DrainSummary()

    with running_orthanc(tmp_path / "orthanc", aet="PACS") as server:
        up = {"pacs": DicomSender(LOOPBACK, server.dicom_port, "PACS", timeout_s=10)}
        assert held_uids(server) == set()
        clock.set(at(200))
        assert outbox.retry() == [queued.row_id]
        retried = only_row(outbox)
        assert (retried.state, retried.attempts, retried.next_attempt_at,
                retried.failing_since) == ("pending", 0, "2026-01-06T12:03:20Z", None)

        assert outbox.drain(up, **policy) == DrainSummary(sent=1)
        assert held_uids(server) == {ds.SOPInstanceUID}
        sent = only_row(outbox)
        assert (sent.state, sent.attempts, sent.last_error, sent.failing_since) == (
            "sent", 1, None, None)

        clock.set(at(300))
        assert outbox.drain(up, **policy) == DrainSummary()
        assert server.statistics()["CountInstances"] == 1
        assert only_row(outbox) == sent


def test_a_pacs_failing_with_cannot_understand_for_hours_dead_letters_nothing(
        outbox: Outbox, clock: SteppingClock) -> None:
    """A PACS in trouble answering 0xC000 to every C-STORE for 6 hours (tried ~15 times,
    backed off up to the hour): nothing is dead, and the result is delivered once it is well."""
    ds = sr_object("OBX022")
    queue_sr(outbox, ds)
    with storage_scp([0xC000] * 1000) as peer:
        senders = {"pacs": DicomSender(LOOPBACK, peer.port, "TESTSCP", timeout_s=10)}
        now = at(0)
        while now < at(6 * 3600):
            clock.set(now)
            assert outbox.drain(senders) == DrainSummary(retried=1)
            now = next_try(only_row(outbox))
        failed = only_row(outbox)
        assert failed.state == "pending" and 8 < failed.attempts < 20, failed.attempts
        assert failed.last_error is not None and "0xC000" in failed.last_error
        peer.statuses.clear()  # well again
        clock.set(now)
        assert outbox.drain(senders) == DrainSummary(sent=1)
        assert peer.received == [ds.SOPInstanceUID] * (failed.attempts + 1)


def test_a_pacs_down_for_30_hours_loses_nothing_with_the_default_budget(
        outbox: Outbox, clock: SteppingClock) -> None:
    """A long maintenance window: tried all along (every 30-60 min once backed off), nothing dead;
    delivered once the PACS is back. (The old policy, 8 attempts, gave up after about 2 h.)"""
    objects = [sr_object("OBX020"), sr_object("OBX021")]
    for ds in objects:
        queue_sr(outbox, ds)
    down = {"pacs": DicomSender(LOOPBACK, free_port(), "PACS", timeout_s=5)}
    back = at(30 * 3600)
    now = at(0)
    while now < back:
        clock.set(now)
        summary = outbox.drain(down)
        assert summary.dead == 0 and summary.sent == 0
        rows = outbox.rows()
        assert {r.state for r in rows} == {"pending"}
        now = min(next_try(r) for r in rows)
    attempts = [r.attempts for r in outbox.rows()]
    assert all(30 < n < 70 for n in attempts), attempts  # every 30-60 min after ~2 h

    with storage_scp() as peer:
        clock.set(max(now, max(next_try(r) for r in outbox.rows())))
        up = {"pacs": DicomSender(LOOPBACK, peer.port, "TESTSCP", timeout_s=10)}
        assert outbox.drain(up) == DrainSummary(sent=2)
        assert sorted(peer.received) == sorted(ds.SOPInstanceUID for ds in objects)


def test_rows_that_fail_together_come_back_spread_out(outbox: Outbox) -> None:
    for index in range(12):
        queue_sr(outbox, sr_object(f"OBX03{index:02d}"))
    down = {"pacs": DicomSender(LOOPBACK, free_port(), "PACS", timeout_s=5)}
    assert outbox.drain(down, backoff_s=60) == DrainSummary(retried=12)
    delays = [(next_try(r) - T0).total_seconds() for r in outbox.rows()]
    assert all(29 <= d <= 60 for d in delays), delays
    assert len(set(delays)) >= 6, delays  # not all back in the same second


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
    with storage_scp([0xA900]) as peer:
        senders = {"pacs": DicomSender(LOOPBACK, peer.port, "TESTSCP", timeout_s=10)}
        assert outbox.drain(senders) == DrainSummary(dead=1)
        dead = only_row(outbox)
        assert (dead.state, dead.attempts, dead.next_attempt_at) == ("dead", 1, None)
        assert dead.summary() == (
            f"{queued.row_id:>6}  dead    sr  pacs  attempts=1  since 2026-01-06T12:00:00Z  "
            f"sop={ds.SOPInstanceUID}  error: C-STORE refused by TESTSCP@{LOOPBACK}:{peer.port}: "
            "status 0xA900 (Data Set Does Not Match SOP Class)")

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


@pytest.mark.parametrize("status", [0xA700, 0xC000])
def test_out_of_resources_is_retried(outbox: Outbox, clock: SteppingClock, status: int) -> None:
    """Out of resources, and 'cannot understand', which PACSs in trouble answer as well."""
    queue_sr(outbox, sr_object("OBX007"))
    with storage_scp([status]) as peer:
        senders = {"pacs": DicomSender(LOOPBACK, peer.port, "TESTSCP", timeout_s=10)}
        assert outbox.drain(senders, backoff_s=30) == DrainSummary(retried=1)
        due = next_try(only_row(outbox))
        assert at(15) <= due <= at(30)
        clock.set(due)
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
    with pytest.raises(ValueError, match="max_attempts >= 0"):
        outbox.drain({}, max_attempts=-1)
    with pytest.raises(ValueError, match="retry_hours > 0"):
        outbox.drain({}, retry_hours=0)
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


def test_a_row_claimed_by_a_killed_process_is_sent_at_the_next_drain(
        outbox: Outbox, store: Store) -> None:
    """A daemon killed while sending leaves its row claimed for claim_s (15 min): the next
    drain on this host releases it, because the claiming process is gone. A claim of a live
    process, or of another host, is left to run out."""
    import subprocess
    import sys

    from exporters.outbox import process_token
    from mrrp_pacs.clock import iso_utc

    objects = [sr_object("OBX020"), sr_object("OBX021"), sr_object("OBX022")]
    for ds in objects:
        queue_sr(outbox, ds)
    dead = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tokens = [process_token(dead.pid), process_token(alive.pid),
                  f"another-host:{alive.pid}:1"]
        dead.kill()
        dead.wait()
        later = iso_utc(store.clock() + timedelta(minutes=15))
        with store.transaction() as tx:
            for row, token in zip(outbox.rows(), tokens, strict=True):
                tx.execute("UPDATE exports SET next_attempt_at = ?, claimed_by = ? WHERE id = ?",
                           (later, token, row.id))
        with storage_scp() as peer:
            sent = outbox.drain({"pacs": DicomSender(LOOPBACK, peer.port, "TESTSCP",
                                                     timeout_s=10)})
            assert sent == DrainSummary(sent=1)
            assert peer.received == [objects[0].SOPInstanceUID]
        assert [r.state for r in outbox.rows()] == ["sent", "pending", "pending"]
    finally:
        alive.kill()
        alive.wait()
