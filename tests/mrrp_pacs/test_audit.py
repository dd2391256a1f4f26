"""The audit trail: one row per received, refused, scored and exported thing, written with it."""

from __future__ import annotations

import json
from datetime import UTC, timedelta

import pytest
from builders import Patient, encode, pathology_result, us_image, us_roi_sr, write
from click.testing import CliRunner
from clocks import SteppingClock
from orthanc import LOOPBACK
from storage_peer import storage_scp

from exporters.dicom_sender import DicomSender
from exporters.outbox import DrainSummary, Outbox
from mrrp_pacs import audit
from mrrp_pacs.cli import main
from mrrp_pacs.faults import VARIABLE, InjectedFault
from mrrp_pacs.intake import Intake, Outcome
from mrrp_pacs.intake.persist import same_source
from mrrp_pacs.scoring import reinstate
from mrrp_pacs.store import Store
from mrrp_pacs.store.groupcommit import GroupCommitter

KEY = "MRN001^^^HOSP"


def rows(store: Store) -> list[audit.AuditRow]:
    return audit.listing(store)


def test_a_received_dicom_object_leaves_one_row_naming_peer_uid_and_patient(intake, store):
    image = us_image(Patient())
    result = intake.receive_dicom(encode(image), origin="dicom:CT1@10.0.0.7")
    assert result.outcome is Outcome.NEW
    (row,) = rows(store)
    assert (row.event, row.who, row.what, row.patient_key) == (
        "received", "dicom:CT1@10.0.0.7", image.SOPInstanceUID, KEY)
    assert row.at == store.stamp()  # the store's clock (a SteppingClock standing still)
    assert row.detail is not None and f"instance {result.row_id}" in row.detail
    # an identical re-send is answered as a duplicate and records nothing
    assert intake.receive_dicom(encode(image), "dicom:CT1@10.0.0.7").outcome is Outcome.DUPLICATE
    assert len(rows(store)) == 1


def test_a_file_drop_names_its_folder(intake, store, tmp_path):
    image = us_image(Patient())
    path = write(image, tmp_path / "drop" / "day1" / "a.dcm")
    (result,) = intake.receive_path(path)
    assert result.outcome is Outcome.NEW
    (row,) = rows(store)
    assert (row.event, row.who, row.what) == (
        "received", f"file-drop:{(tmp_path / 'drop' / 'day1').absolute()}", image.SOPInstanceUID)


def test_a_refused_object_leaves_one_refused_row_and_nothing_else(intake, store):
    data = encode(us_image(Patient()))
    result = intake.receive_dicom(data[: len(data) // 2], origin="dicom:CT1@10.0.0.7")
    assert result.outcome is Outcome.REJECTED
    (row,) = rows(store)
    assert (row.event, row.who, row.patient_key) == ("refused", "dicom:CT1@10.0.0.7", None)
    assert row.what.startswith("sha256:") and len(row.what) == len("sha256:") + 12
    assert store.conn.execute("SELECT count(*) FROM instances").fetchone()[0] == 0


def test_an_hl7_message_leaves_one_row_with_its_control_id_digest(intake, store):
    result = intake.receive_hl7(pathology_result(Patient()), origin="mllp:10.0.0.9")
    assert result.outcome is Outcome.NEW
    (row,) = rows(store)
    assert (row.event, row.who, row.what, row.patient_key) == (
        "received", "mllp:10.0.0.9", audit.control_digest("PA-0001"), KEY)
    assert row.what.startswith("c:") and len(row.what) == 12 and "PA-0001" not in row.what
    # the same control id with other content is kept (not processed): a row of its own
    again = intake.receive_hl7(pathology_result(Patient(), observed="20260111"), "mllp:10.0.0.9")
    assert again.outcome is Outcome.DUPLICATE and again.row_id is not None
    assert [r.event for r in rows(store)] == ["received", "received"]
    # a result naming no patient is refused: one refused row, no patient
    nobody = intake.receive_hl7(pathology_result(Patient(), "PA-0002").replace(
        b"PID|1||MRN001^^^HOSP^MR~99887^^^NATIONAL^NI|", b"PID|1|||"), "mllp:x")
    assert nobody.outcome is Outcome.REJECTED
    assert (rows(store)[-1].event, rows(store)[-1].what) == (
        "refused", audit.control_digest("PA-0002"))


def test_a_failed_transaction_leaves_no_audit_row(intake, store, monkeypatch):
    monkeypatch.setenv(VARIABLE, "intake.dicom.before_commit=raise")
    with pytest.raises(InjectedFault):
        intake.receive_dicom(encode(us_image(Patient())), origin="dicom:CT1@10.0.0.7")
    monkeypatch.setenv(VARIABLE, "intake.hl7.before_commit=raise")
    with pytest.raises(InjectedFault):
        intake.receive_hl7(pathology_result(Patient()), origin="mllp:10.0.0.9")
    assert rows(store) == []
    assert store.conn.execute("SELECT count(*) FROM instances").fetchone()[0] == 0
    assert store.conn.execute("SELECT count(*) FROM hl7_messages").fetchone()[0] == 0


def test_under_group_commit_a_failed_write_loses_its_row_and_the_others_keep_theirs(
        config, store, monkeypatch):
    committer = GroupCommitter(lambda: Store(config.paths.db_file, config.paths.objects_dir,
                                             migrate=False, clock=store.clock))
    try:
        shared = Intake(store, config, committer=committer)
        kept = us_image(Patient())
        assert shared.receive_dicom(encode(kept), "dicom:CT1@10.0.0.7").outcome is Outcome.NEW
        monkeypatch.setenv(VARIABLE, "intake.dicom.before_commit=raise")
        with pytest.raises(InjectedFault):
            shared.receive_dicom(encode(us_image(Patient("MRN002"))), "dicom:CT1@10.0.0.7")
    finally:
        committer.stop()
    assert [(r.event, r.what) for r in rows(store)] == [("received", kept.SOPInstanceUID)]


def test_a_score_leaves_a_row_naming_the_model_version(store):
    with store.transaction() as conn:
        first = store.insert(conn, "scores", {
            "patient_key": KEY, "model_version": "v1", "inputs_hash": "a",
            "outputs": json.dumps(_outputs()), "created_at": store.stamp()})
        second = store.insert(conn, "scores", {
            "patient_key": KEY, "model_version": "v2", "inputs_hash": "a",
            "outputs": json.dumps(_outputs()), "created_at": store.stamp()})
        conn.execute("UPDATE scores SET superseded_by = ? WHERE id = ?", (second, first))
    reinstate(store, first, None)  # model v1 promoted again: its score is current again
    (row,) = rows(store)
    assert (row.event, row.who, row.what, row.patient_key, row.detail) == (
        "scored", "model:v1", f"score:{first}", KEY, "current again")


def _outputs() -> dict[str, object]:
    return {"patient_key": KEY, "model_name": "mrrp", "model_version": "v1", "inputs_hash": "a",
            "risk": 0.1, "percentile": 50.0, "group": "low", "cutoff": 0.5,
            "rfs_probability": {"60": 0.9}, "modalities_used": ["clinical"],
            "compensated": [], "clinical_attention": [], "evidence": [], "us_region": None,
            "algorithm_parameters": {}, "scored_at": "2026-01-06T12:00:00Z"}


def test_an_export_sent_and_one_given_up_each_leave_one_row(store, clock):
    with store.transaction() as conn:
        score_id = store.insert(conn, "scores", {
            "patient_key": KEY, "model_version": "v1", "inputs_hash": "a",
            "outputs": "{}", "created_at": store.stamp()})
    outbox = Outbox(store)
    patient = Patient()
    sent, dead = (us_roi_sr(patient, us_image(patient), (1.0, 2.0, 30.0, 20.0))
                  for _ in range(2))
    for ds in (sent, dead):
        outbox.enqueue(None, score_id=score_id, kind="sr", destination="pacs",
                       data=encode(ds), sop_instance_uid=ds.SOPInstanceUID)
    with storage_scp([0x0000, 0xA900]) as peer:
        sender = DicomSender(LOOPBACK, peer.port, "TESTSCP", timeout_s=10)
        assert outbox.drain({"pacs": sender}) == DrainSummary(sent=1, dead=1)
    found = {r.what: r for r in rows(store)}
    assert len(rows(store)) == 2
    assert (found[sent.SOPInstanceUID].event, found[dead.SOPInstanceUID].event) == (
        "exported", "export-failed")
    for row in found.values():
        assert (row.who, row.patient_key) == (f"TESTSCP@{LOOPBACK}:{peer.port}", KEY)
        assert f"score {score_id}" in (row.detail or "")


def test_sources_that_may_replace_a_stored_instance():
    assert same_source("dicom:A@10.0.0.1", "dicom:A@10.0.0.1")
    assert not same_source("dicom:A@10.0.0.1", "dicom:B@10.0.0.1")
    assert not same_source("dicom:A@10.0.0.1", "dicom:A@10.0.0.2")
    # rows stored before addresses were recorded, and pulls, name the AE title alone
    assert same_source("dicom:A", "dicom:A@10.0.0.2") and same_source("dicom:A@10.0.0.1",
                                                                     "dicom:A")
    assert same_source("file:/drop/a.dcm", "file:/other/b.dcm")
    assert not same_source("file:/drop/a.dcm", "dicom:A@10.0.0.1")
    assert not same_source("dicom:A@10.0.0.1", "file:/drop/a.dcm")


def test_prune_keeps_rows_younger_than_keep_days(store, clock: SteppingClock):
    t0 = clock()
    with store.transaction() as conn:
        audit.record(conn, at=store.stamp(), event="received", who="x", what="old")
    clock.set(t0 + timedelta(days=10))
    with store.transaction() as conn:
        audit.record(conn, at=store.stamp(), event="received", who="x", what="new")
    assert audit.prune(store, 0, clock()) == 0
    assert audit.prune(store, 30, clock()) == 0
    assert audit.prune(store, 5, clock()) == 1
    assert [r.what for r in rows(store)] == ["new"]
    with pytest.raises(ValueError, match="unknown audit event"), store.transaction() as conn:
        audit.record(conn, at=store.stamp(), event="deleted", who="x", what="y")


def test_the_audit_command_prints_and_filters(intake, store, config, clock: SteppingClock):
    t0 = clock()
    intake.receive_dicom(encode(us_image(Patient())), origin="dicom:CT1@10.0.0.7")
    clock.set(t0 + timedelta(hours=2))
    intake.receive_hl7(pathology_result(Patient("MRN002")), origin="mllp:10.0.0.9")
    db = ["--db", str(config.paths.db_file)]
    runner = CliRunner()
    shown = runner.invoke(main, ["audit", *db])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].split() == ["id", "at", "event", "who", "what", "patient", "detail"]
    assert "dicom:CT1@10.0.0.7" in lines[1] and KEY in lines[1] and "received" in lines[1]
    assert "mllp:10.0.0.9" in lines[2] and audit.control_digest("PA-0001") in lines[2]
    assert lines[-1] == "2 audit rows"
    mine = runner.invoke(main, ["audit", *db, "--patient", "MRN002^^^HOSP", "--json"])
    assert [r["who"] for r in json.loads(mine.output)] == ["mllp:10.0.0.9"]
    since = (t0 + timedelta(hours=1)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    later = runner.invoke(main, ["audit", *db, "--since", since])
    assert later.output.splitlines()[-1] == "1 audit rows"
    newest = runner.invoke(main, ["audit", *db, "--limit", "1", "--json"])
    assert [r["who"] for r in json.loads(newest.output)] == ["mllp:10.0.0.9"]
    bad = runner.invoke(main, ["audit", *db, "--since", "yesterday"])
    assert bad.exit_code == 2 and "ISO 8601" in bad.output


def test_keep_days_must_not_be_negative(config):
    from mrrp_pacs.errors import ConfigError

    with pytest.raises(ConfigError, match=r"audit\.keep_days"):
        config.replace("audit", keep_days=-1).check()
