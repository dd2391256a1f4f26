import sqlite3

import pytest
from builders import (
    PATHOLOGY_VALUES,
    Patient,
    encode,
    mllp,
    pathology_result,
    tumour_annotation,
    us_image,
    us_report,
    us_roi_sr,
    write,
    wsi_image,
)

from mrrp_pacs.intake import Intake, Outcome
from mrrp_pacs.store import Store


def _count(store: Store, table: str) -> int:
    return store.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_dicom_file_is_copied_and_recorded(intake, store, tmp_path):
    image = us_image(Patient())
    path = write(image, tmp_path / "drop" / "image.bin")
    result = intake.receive_dicom(path, origin="file:x")
    assert result.outcome is Outcome.NEW
    row = store.conn.execute("SELECT * FROM instances WHERE id = ?", (result.row_id,)).fetchone()
    assert row["sop_instance_uid"] == image.SOPInstanceUID
    assert row["size_bytes"] == path.stat().st_size
    assert store.objects.read_bytes(row["sha256"]) == path.read_bytes()
    again = intake.receive_dicom(path, origin="file:x")
    assert again.outcome is Outcome.DUPLICATE
    assert _count(store, "instances") == 1


def test_dicom_bytes_and_rois(intake, store):
    patient = Patient()
    image, slide = us_image(patient), wsi_image(patient)
    sr = us_roi_sr(patient, image, (5, 6, 30, 20))
    ann = tumour_annotation(patient, slide, [(1, 1), (9, 1), (9, 9)])
    for ds in (image, slide, sr, ann):
        assert intake.receive_dicom(encode(ds), origin="dicom:TEST").outcome is Outcome.NEW
    rois = store.conn.execute("SELECT kind, graphic_type, referenced_sop_instance_uid FROM rois "
                              "ORDER BY kind").fetchall()
    assert [tuple(r) for r in rois] == [
        ("annotation_group", "POLYGON", slide.SOPInstanceUID),
        ("sr_scoord", "POLYLINE", image.SOPInstanceUID),
    ]


def test_same_sop_instance_with_new_content_supersedes(intake, store):
    image = us_image(Patient())
    first = intake.receive_dicom(encode(image), origin="dicom:A@10.0.0.1")
    image.InstanceNumber = 2
    # the same source sending a corrected object replaces the stored one
    second = intake.receive_dicom(encode(image), origin="dicom:A@10.0.0.1")
    assert second.outcome is Outcome.NEW and "replaces" in (second.reason or "")
    rows = store.conn.execute("SELECT id, superseded_by FROM instances ORDER BY id").fetchall()
    assert [tuple(r) for r in rows] == [(first.row_id, second.row_id), (second.row_id, None)]


def test_rejected_dicom_writes_nothing(intake, store):
    data = encode(us_image(Patient()))
    result = intake.receive_dicom(data[: len(data) // 2], origin="x")
    assert result.outcome is Outcome.REJECTED and "truncated" in (result.reason or "")
    assert _count(store, "instances") == 0
    assert not store.objects.root.exists() or not any(
        p.is_file() for p in store.objects.root.rglob("*"))


def test_hl7_result_fills_observations_reports_and_clinical_values(intake, store):
    patient = Patient()
    assert intake.receive_hl7(us_report(patient), "mllp:x").outcome is Outcome.NEW
    result = intake.receive_hl7(pathology_result(patient), "mllp:x")
    assert result.outcome is Outcome.NEW and result.control_id == "PA-0001"
    message = store.conn.execute("SELECT * FROM hl7_messages WHERE id = ?",
                                 (result.row_id,)).fetchone()
    assert (message["patient_id"], message["assigning_authority"]) == ("MRN001", "HOSP")
    assert message["message_type"] == "ORU^R01" and message["state"] == "parsed"
    assert _count(store, "observations") == 3 + len(PATHOLOGY_VALUES)
    (report,) = store.conn.execute("SELECT * FROM reports").fetchall()
    assert report["kind"] == "ultrasound" and report["accession_number"] == "US-MRN001"
    assert report["text"].splitlines()[-1] == "Assessment: BI-RADS 4C."
    values = {r["variable"]: (r["value_text"], r["value_num"], r["unit"], r["source"]) for r in
              store.conn.execute("SELECT * FROM clinical_values")}
    assert values["tumour_size_mm"] == ("18", 18.0, "mm", "OBX LN:21889-1")
    assert values["grade"] == ("2", None, "", "OBX L:MRRP-GRADE")
    assert values["her2_ihc"][0] == "1+"
    assert values["subtype"][0] == "luminal_a"
    # no age OBX: derived from PID-7 (1979-03-14) at the result date (2026-01-10)
    assert values["age_years"] == ("46", 46.0, "a", "PID-7")
    assert len(values) == 9


def test_mllp_framed_and_lf_messages_are_stored_alike(intake, store):
    assert intake.receive_hl7(mllp(us_report(Patient(), "F1")), "x").outcome is Outcome.NEW
    assert intake.receive_hl7(us_report(Patient(), "F2", end="\n"), "x").outcome is Outcome.NEW
    assert _count(store, "reports") == 2


def test_duplicate_control_id_is_kept_but_processed_once(intake, store):
    patient = Patient()
    first = intake.receive_hl7(pathology_result(patient, "SAME-1"), "x")
    identical = intake.receive_hl7(pathology_result(patient, "SAME-1"), "x")
    changed = intake.receive_hl7(pathology_result(patient, "SAME-1", observed="20260111"), "x")
    assert first.outcome is Outcome.NEW
    assert identical.outcome is Outcome.DUPLICATE and identical.row_id is None
    assert changed.outcome is Outcome.DUPLICATE and "already received" in (changed.reason or "")
    states = [r[0] for r in store.conn.execute("SELECT state FROM hl7_messages ORDER BY id")]
    assert states == ["parsed", "duplicate_control_id"]
    assert _count(store, "clinical_values") == 9  # the second copy added no values
    # the same id from another sender is a different message
    other = intake.receive_hl7(pathology_result(patient, "SAME-1").replace(b"|LIS|", b"|LIS2|"),
                               "x")
    assert other.outcome is Outcome.NEW


def test_corrected_result_supersedes_and_late_older_result_does_not(intake, store):
    patient = Patient()
    size = [("NM", "21889-1^Size Tumor^LN", "18", "mm")]
    intake.receive_hl7(pathology_result(patient, "R1", values=size, observed="20260110"), "x")
    corrected = [("NM", "21889-1^Size Tumor^LN", "21", "mm")]
    intake.receive_hl7(pathology_result(patient, "R2", status="C", values=corrected,
                                        observed="20260112"), "x")
    older = [("NM", "21889-1^Size Tumor^LN", "15", "mm")]
    intake.receive_hl7(pathology_result(patient, "R3", values=older, observed="20251201"), "x")
    current = store.conn.execute(
        "SELECT value_text FROM clinical_values WHERE variable = 'tumour_size_mm' "
        "AND superseded_by IS NULL").fetchall()
    assert [r[0] for r in current] == ["21"]
    assert _count(store, "clinical_values") - 3 == 3  # three sizes + three derived ages


def test_a_later_preliminary_value_does_not_displace_the_final_one(intake, store, config):
    from mrrp_pacs.cases import case_inputs

    patient = Patient()
    size = [("NM", "21889-1^Size Tumor^LN", "18", "mm")]
    intake.receive_hl7(pathology_result(patient, "F1", values=size, observed="20260110"), "x")
    draft = [("NM", "21889-1^Size Tumor^LN", "25", "mm")]
    intake.receive_hl7(pathology_result(patient, "P1", status="P", values=draft,
                                        observed="20260111"), "x")
    (case,) = case_inputs(store, config).values()
    assert case.clinical["tumour_size_mm"].value_text == "18"


def test_a_result_without_a_patient_is_rejected_and_other_types_are_kept_unread(intake, store):
    anonymous = pathology_result(Patient()).replace(
        b"PID|1||MRN001^^^HOSP^MR~99887^^^NATIONAL^NI|", b"PID|1|||")
    result = intake.receive_hl7(anonymous, "x")
    assert result.outcome is Outcome.REJECTED and "PID-3" in (result.reason or "")
    assert result.control_id == "PA-0001"
    admission = (b"MSH|^~\\&|ADT|HOSP|MRRP|HOSP|20260106120000||ADT^A01^ADT_A01|AD-1|P|2.5\r"
                 b"PID|1||MRN001^^^HOSP^MR||Doe^Jane\r")
    kept = intake.receive_hl7(admission, "x")
    assert kept.outcome is Outcome.NEW
    state, note = store.conn.execute("SELECT state, note FROM hl7_messages").fetchone()
    assert state == "ignored" and "ADT" in note
    assert _count(store, "clinical_values") == 0 and _count(store, "observations") == 0


def test_unparsable_hl7_is_rejected_with_reason(intake, store):
    result = intake.receive_hl7(b"MSH|^~\\&|A|B|C|D|2026||ORU^R01||P|2.5\r", "x")
    assert result.outcome is Outcome.REJECTED and "MSH-10" in (result.reason or "")
    assert _count(store, "hl7_messages") == 0


def test_oversized_message_is_rejected(store, config):
    small = Intake(store, config.replace("ingest", max_hl7_bytes=100))
    result = small.receive_hl7(us_report(Patient()), "x")
    assert result.outcome is Outcome.REJECTED and "max_hl7_bytes" in (result.reason or "")


def test_a_failing_transaction_leaves_no_half_written_rows(intake, store, monkeypatch):
    """The clinical value insert fails after the message row: everything rolls back."""
    real_insert = store.insert

    def failing(conn, table, row):
        if table == "clinical_values":
            raise sqlite3.OperationalError("disk I/O error")
        return real_insert(conn, table, row)

    monkeypatch.setattr(store, "insert", failing)
    with pytest.raises(sqlite3.OperationalError):
        intake.receive_hl7(pathology_result(Patient()), "x")
    for table in ("hl7_messages", "observations", "reports", "clinical_values"):
        assert _count(store, table) == 0
    monkeypatch.setattr(store, "insert", real_insert)
    assert intake.receive_hl7(pathology_result(Patient()), "x").outcome is Outcome.NEW


def _stored_bytes(store, uid):
    (sha,) = store.conn.execute("SELECT sha256 FROM instances WHERE sop_instance_uid = ? AND "
                                "superseded_by IS NULL", (uid,)).fetchone()
    return store.objects.read_bytes(sha)


def test_another_source_cannot_replace_a_stored_instance(intake, store):
    from mrrp_pacs import audit
    from mrrp_pacs.intake import refused

    image = us_image(Patient())
    original = encode(image)
    assert intake.receive_dicom(original, origin="dicom:A@10.0.0.1").outcome is Outcome.NEW
    image.InstanceNumber = 2
    other = encode(image)
    for origin in ("dicom:B@10.0.0.1", "dicom:A@10.0.0.2"):  # another AE; A from elsewhere
        result = intake.receive_dicom(other, origin=origin)
        assert result.outcome is Outcome.REJECTED
        assert "another source" in (result.reason or "")
    assert _stored_bytes(store, image.SOPInstanceUID) == original
    assert _count(store, "instances") == 1
    kept = refused.listing(store)
    assert [(k.kind, k.listener, k.peer) for k in kept] == [
        ("dicom", "dicom", "A@10.0.0.2"), ("dicom", "dicom", "B@10.0.0.1")]
    assert refused.raw_bytes(store, kept[0]) == other
    # the refused bytes are in the refused area only, not among the stored objects
    assert not store.objects.path_for(kept[0].sha256).exists()
    assert [(r.event, r.who) for r in audit.listing(store)] == [
        ("received", "dicom:A@10.0.0.1"), ("refused", "dicom:B@10.0.0.1"),
        ("refused", "dicom:A@10.0.0.2")]
    # an operator who decides the replacement is right reprocesses it: it replaces, as from
    # the source it came from, which may then send corrections of its own
    assert refused.reprocess(intake, kept[0].id).outcome is Outcome.NEW
    assert _stored_bytes(store, image.SOPInstanceUID) == other
    (row,) = store.conn.execute("SELECT source FROM instances WHERE superseded_by IS NULL")
    assert row["source"] == "dicom:A@10.0.0.2"
    last = audit.listing(store)[-1]
    assert (last.event, last.who) == ("received", "dicom:A@10.0.0.2")
    assert "accepted by the operator from quarantine:" in (last.detail or "")
    image.InstanceNumber = 3
    assert intake.receive_dicom(encode(image), "dicom:A@10.0.0.2").outcome is Outcome.NEW
    assert intake.receive_dicom(encode(image), "dicom:A@10.0.0.1").outcome is Outcome.DUPLICATE


def test_a_file_drop_cannot_replace_an_instance_received_over_dicom(intake, store, tmp_path):
    image = us_image(Patient())
    original = encode(image)
    assert intake.receive_dicom(original, origin="dicom:A@10.0.0.1").outcome is Outcome.NEW
    image.InstanceNumber = 2
    (result,) = intake.receive_path(write(image, tmp_path / "drop" / "a.dcm"))
    assert result.outcome is Outcome.REJECTED and "another source" in (result.reason or "")
    assert _stored_bytes(store, image.SOPInstanceUID) == original
    # nor the other way round; a file drop replaces what a file drop stored
    dropped = us_image(Patient("MRN002"))
    (first,) = intake.receive_path(write(dropped, tmp_path / "drop" / "b.dcm"))
    dropped.InstanceNumber = 2
    assert intake.receive_dicom(encode(dropped), "dicom:A@10.0.0.1").outcome is Outcome.REJECTED
    (second,) = intake.receive_path(write(dropped, tmp_path / "later" / "b.dcm"))
    assert (first.outcome, second.outcome) == (Outcome.NEW, Outcome.NEW)
    assert _stored_bytes(store, dropped.SOPInstanceUID) == encode(dropped)


def test_a_refused_replacement_larger_than_the_quarantine_is_refused_unkept(store, config):
    from mrrp_pacs.intake import refused

    small = Intake(store, config.replace("ingest", refused_keep_bytes=100))
    image = us_image(Patient())
    assert small.receive_dicom(encode(image), origin="dicom:A@h").outcome is Outcome.NEW
    image.InstanceNumber = 2
    result = small.receive_dicom(encode(image), origin="dicom:B@h")
    assert result.outcome is Outcome.REJECTED and result.row_id is None
    assert refused.listing(store) == []


def test_the_pacs_we_pull_from_may_replace_what_a_modality_sent(store, config):
    """The archive of record (its transcoded copy pulled by C-MOVE or C-GET) replaces; another
    address using its AE title does not."""
    pulling = Intake(store, config.replace("pacs", host="10.0.0.50", ae_title="PACS"))
    image = us_image(Patient())
    assert pulling.receive_dicom(encode(image), "dicom:US1@10.0.0.1").outcome is Outcome.NEW
    image.InstanceNumber = 2
    assert pulling.receive_dicom(encode(image), "dicom:PACS@10.0.0.66").outcome \
        is Outcome.REJECTED
    assert pulling.receive_dicom(encode(image), "dicom:PACS@10.0.0.50").outcome is Outcome.NEW
    image.InstanceNumber = 3
    assert pulling.receive_dicom(encode(image), "dicom:PACS").outcome is Outcome.NEW  # C-GET
    # without [pacs] host nothing is pulled, and the title alone is no archive
    assert Intake(store, config.replace("pacs", ae_title="PACS")).receive_dicom(
        encode(us_image(Patient("MRN002"))), "dicom:PACS@10.0.0.50").outcome is Outcome.NEW
    image.InstanceNumber = 4
    assert Intake(store, config.replace("pacs", ae_title="PACS")).receive_dicom(
        encode(image), "dicom:PACS@10.0.0.50").outcome is Outcome.NEW  # the same source
    image.InstanceNumber = 5
    assert Intake(store, config.replace("pacs", ae_title="PACS")).receive_dicom(
        encode(image), "dicom:US1@10.0.0.1").outcome is Outcome.REJECTED
