"""From score rows to the outbox, over a real store: objects ingested through Intake, a model
version in a real model store (a fake weights file, a real manifest), the SRs and PDF checked by
dciodvfy and read back by highdicom, and our SRs fed back through Intake as a PACS returns them.

The builders' Patient has its slide and its US image in two studies: an SR placed in the
pathology study then gets a twin in the US study (the one where a viewer can draw the region).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import builders
import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from validators import PRIVATE_SCHEME_WARNING, dciodvfy

from exporters.outbox import ExportConflict, ExportRow, Outbox
from exporters.publish import PublishSettings, ResultPublisher, series_uid_of
from exporters.sr import tracking_uid
from model_store import ModelStore
from mrrp_pacs.cases import case_inputs
from mrrp_pacs.config import Config
from mrrp_pacs.daemon import Pipeline
from mrrp_pacs.identity import patient_key
from mrrp_pacs.intake import Intake, Outcome
from mrrp_pacs.model.train import MODEL_KIND
from mrrp_pacs.results import EvidenceRef, RiskResult, UsRegion
from mrrp_pacs.scoring import ScoreOutcome, reinstate
from mrrp_pacs.store import Store

MODEL_NAME = "mrrp"
SECRET = "publish-test-secret"
SETTINGS = PublishSettings(uid_secret=SECRET)
BOX = (10.0, 12.0, 40.0, 44.0)


def save_model(models: ModelStore, weights: bytes) -> str:
    """A stored model version whose manifest holds what the PDF needs; returns its version.

    Different ``weights`` give different versions even within one second.
    """
    rng = np.random.default_rng(11)
    risk = rng.normal(size=60)
    latent = rng.exponential(90.0 * np.exp(-risk))
    censor = rng.uniform(24.0, 120.0, risk.size)
    manifest = {"training_outcomes": {"time_months": np.minimum(latent, censor).tolist(),
                                      "event": (latent <= censor).astype(int).tolist(),
                                      "risk": risk.tolist()},
                "risk_cutoff": float(np.median(risk))}
    return models.save(MODEL_KIND, MODEL_NAME, {"weights.safetensors": weights},
                       manifest).version


def ingest(intake: Intake, folder: Path, patient: builders.Patient,
           slide: bool = True) -> dict[str, Dataset]:
    """Slide (optional), US image and the sonographer's ROI SR, stored through Intake."""
    us = builders.us_image(patient)
    objects = {"wsi": builders.wsi_image(patient)} if slide else {}
    objects |= {"us_image": us, "us_roi": builders.us_roi_sr(patient, us, BOX)}
    for role, ds in objects.items():
        path = builders.write(ds, folder / patient.patient_id / f"{role}.dcm")
        received = intake.receive_dicom(path, f"file:{path}")
        assert received.outcome is Outcome.NEW, received.reason
    return objects


def make_result(store: Store, config: Config, objects: dict[str, Dataset], version: str,
                **changes: object) -> RiskResult:
    """A result over ``objects`` as the scorer writes one: evidence from the instances table."""
    evidence = []
    for role, ds in objects.items():
        row = store.conn.execute(
            "SELECT study_instance_uid, series_instance_uid, sop_class_uid, sha256 "
            "FROM instances WHERE sop_instance_uid = ?", (ds.SOPInstanceUID,)).fetchone()
        evidence.append(EvidenceRef(role, row[0], row[1], ds.SOPInstanceUID, row[2], row[3]))
    us = objects["us_image"]
    key = patient_key(us.PatientID, us.IssuerOfPatientID, config.identity)
    assert key is not None and key in case_inputs(store, config)
    slide = "wsi" in objects
    result = RiskResult(
        patient_key=key, model_name=MODEL_NAME, model_version=version,
        inputs_hash="ab" * 32, risk=1.234567, percentile=81.5, group="high", cutoff=0.125,
        rfs_probability={"36": 0.9123, "60": 0.8345, "84": 0.7012},
        modalities_used=["wsi", "us", "clinical"] if slide else ["us", "clinical"],
        compensated=[] if slide else ["wsi"],
        clinical_attention=[("ki67", 0.5), ("age", 0.3), ("grade", 0.2)],
        evidence=evidence, us_region=UsRegion(us.SOPInstanceUID, BOX, "sr"),
        algorithm_parameters={"cutoff": "0.125"}, scored_at="2026-01-12T10:00:00Z")
    return dataclasses.replace(result, **changes)


def record_score(store: Store, result: RiskResult) -> ScoreOutcome:
    """Insert the ``scores`` row of ``result`` as the scorer does (superseding the current)."""
    with store.transaction() as conn:
        score_id = store.insert(conn, "scores", {
            "patient_key": result.patient_key, "model_version": result.model_version,
            "inputs_hash": result.inputs_hash, "outputs": result.to_json(),
            "created_at": result.scored_at, "arrivals": "digest"})
        conn.execute("UPDATE scores SET superseded_by = ? WHERE patient_key = ? AND id != ? "
                     "AND superseded_by IS NULL", (score_id, result.patient_key, score_id))
    return ScoreOutcome(result.patient_key, "scored", score_id, result=result)


def queued(store: Store, score_id: int, kind: str) -> tuple[ExportRow, Dataset]:
    """The one ``kind`` row of a score and its object as stored."""
    (row,) = [r for r in Outbox(store).rows() if r.score_id == score_id and r.kind == kind]
    assert row.object_sha256 is not None
    return row, pydicom.dcmread(store.objects.path_for(row.object_sha256))


def queued_srs(store: Store, score_id: int | None, objects: dict[str, Dataset],
               revision: int = 0) -> dict[str, Dataset]:
    """The SRs of a score (of one revision) by the role (``wsi``, ``us_image``) of the study
    each is placed in."""
    roles = {str(ds.StudyInstanceUID): role for role, ds in objects.items() if role != "us_roi"}
    srs = [pydicom.dcmread(store.objects.path_for(r.object_sha256)) for r in Outbox(store).rows()
           if r.score_id == score_id and r.kind == "sr" and r.object_sha256 is not None
           and r.revision == revision]
    placed: dict[str, Dataset] = {roles[str(ds.StudyInstanceUID)]: ds for ds in srs}
    assert len(placed) == len(srs), "two SRs of one score in one study"
    return placed


def tracking(sr: Dataset) -> str:
    """The Tracking UID shared by every measurement group of ``sr``, with its identifier."""
    content = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    groups = [*content.get_planar_roi_measurement_groups(),
              *content.get_image_measurement_groups()]
    (shared,) = {(str(g.tracking_uid), g.tracking_identifier) for g in groups}
    assert shared[1] == "MRRP recurrence risk"
    return shared[0]


def predecessor_of(sr: Dataset) -> tuple[str, str, str]:
    """(study, series, SOP instance) UIDs in the Predecessor Documents Sequence."""
    (study,) = sr.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (instance,) = series.ReferencedSOPSequence
    return (study.StudyInstanceUID, series.SeriesInstanceUID,
            instance.ReferencedSOPInstanceUID)


def identity(ds: Dataset) -> tuple[str, str, str]:
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


@pytest.fixture
def models(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


@pytest.fixture
def version(models: ModelStore) -> str:
    return save_model(models, b"x")


@pytest.fixture
def objects(intake: Intake, tmp_path: Path) -> dict[str, Dataset]:
    return ingest(intake, tmp_path / "incoming", builders.Patient())


@pytest.fixture
def publisher(models: ModelStore) -> ResultPublisher:
    return ResultPublisher(models, SETTINGS)


@pytest.mark.parametrize(("sr_study", "slide", "region", "srs_in", "pdf_in"), [
    # the US image lies in another study than the slide: an SR in each
    ("pathology", True, True, ("wsi", "us_image"), "wsi"),
    ("ultrasound", True, True, ("us_image",), "us_image"),
    ("pathology", False, True, ("us_image",), "us_image"),  # no slide: the US study takes it
    ("pathology", True, False, ("wsi",), "wsi"),  # no region: nothing to draw in the US study
])
def test_a_new_score_queues_an_sr_in_each_study_it_reports_on_and_one_pdf(
        store, config, intake, models, version, tmp_path, sr_study, slide, region, srs_in,
        pdf_in):
    objects = ingest(intake, tmp_path / "incoming", builders.Patient(), slide=slide)
    result = make_result(store, config, objects, version,
                         **({} if region else {"us_region": None}))
    outcome = record_score(store, result)
    settings = PublishSettings(sr_study=sr_study, uid_secret=SECRET)
    publisher = ResultPublisher(models, settings)

    assert publisher(store, [outcome]) == {"sr": len(srs_in), "pdf": 1}

    rows = Outbox(store).rows()
    assert [(r.kind, r.destination, r.state, r.score_id, r.attempts) for r in rows] == [
        *[("sr", "pacs", "pending", outcome.score_id, 0)] * len(srs_in),
        ("pdf", "pacs", "pending", outcome.score_id, 0)]
    srs = queued_srs(store, outcome.score_id, objects)
    _, pdf = queued(store, outcome.score_id, "pdf")
    # the chosen study's SR first, then its twin
    assert [r.sop_instance_uid for r in rows] == [
        *[srs[role].SOPInstanceUID for role in srs_in], pdf.SOPInstanceUID]
    for ds, role in [*[(srs[role], role) for role in srs_in], (pdf, pdf_in)]:
        study = objects[role]
        assert (ds.StudyInstanceUID, ds.AccessionNumber, ds.PatientID) == (
            study.StudyInstanceUID, study.AccessionNumber, "MRN001")
    assert len({ds.SOPInstanceUID for ds in srs.values()}) == len(srs_in)
    assert {tracking(ds) for ds in srs.values()} == {tracking_uid(result.patient_key, SECRET)}
    for role, sr in srs.items():
        assert (sr.Modality, sr.SeriesNumber, sr.InstanceNumber) == ("SR", 9901, 1)
        assert sr.SeriesInstanceUID == series_uid_of(objects[role], result, settings)
        assert sr.SeriesInstanceUID != pdf.SeriesInstanceUID
        assert "PredecessorDocumentsSequence" not in sr
        referenced = {item.ReferencedSOPInstanceUID
                      for study_item in sr.CurrentRequestedProcedureEvidenceSequence
                      for series_item in study_item.ReferencedSeriesSequence
                      for item in series_item.ReferencedSOPSequence}
        assert referenced == {ds.SOPInstanceUID for ds in objects.values()}
        # the lesion region is drawn on the US image, whichever study holds the SR
        regions = hd.sr.Comprehensive3DSR.from_dataset(
            sr).content.get_planar_roi_measurement_groups()
        assert [g.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                for g in regions] == ([objects["us_image"].SOPInstanceUID] if region else [])
    # twins: the same document, told apart by where it is placed
    first, *twins = (srs[role] for role in srs_in)
    for twin in twins:
        assert twin.ContentSequence == first.ContentSequence
    assert (pdf.Modality, pdf.SeriesNumber) == ("DOC", 9902)
    assert pdf.EncapsulatedDocument.startswith(b"%PDF-")


def test_the_same_result_again_queues_nothing_new(store, config, objects, models, version,
                                                   publisher):
    result = make_result(store, config, objects, version)
    outcome = record_score(store, result)
    assert publisher(store, [outcome]) == {"sr": 2, "pdf": 1}
    first = Outbox(store).rows()

    # again, and from a fresh publisher (a restarted daemon): byte-identical objects
    assert publisher(store, [outcome]) == {"sr": 0, "pdf": 0}
    restarted = ResultPublisher(models, SETTINGS)
    assert restarted(store, [outcome]) == {"sr": 0, "pdf": 0}
    assert Outbox(store).rows() == first

    rebuilt = restarted.objects(store, result)
    assert [kind for kind, _ in rebuilt] == ["sr", "sr", "pdf"]
    for (kind, ds), row in zip(rebuilt, first, strict=True):
        data = builders.encode(ds)
        assert data == store.objects.read_bytes(row.object_sha256)
        again = Outbox(store).enqueue(None, score_id=outcome.score_id, kind=kind,
                                      destination="pacs", data=data,
                                      sop_instance_uid=ds.SOPInstanceUID)
        assert (again.row_id, again.created) == (row.id, False)
    assert Outbox(store).counts() == {"pending": 3, "sent": 0, "dead": 0}

    # outcomes without a new result (unchanged scores) are not published
    assert publisher(store, [ScoreOutcome(result.patient_key, "unchanged", outcome.score_id),
                             ScoreOutcome(result.patient_key, "failed", None, "no features")]
                     ) == {"sr": 0, "pdf": 0}
    assert len(Outbox(store).rows()) == 3


def test_changed_inputs_give_new_srs_that_each_succeed_the_first_of_their_study(
        store, config, objects, version, publisher):
    first = make_result(store, config, objects, version)
    first_outcome = record_score(store, first)
    publisher(store, [first_outcome])
    first_srs = queued_srs(store, first_outcome.score_id, objects)

    changed = dataclasses.replace(first, inputs_hash="cd" * 32, risk=-0.5, group="low",
                                  percentile=30.0, scored_at="2026-01-20T09:30:00Z")
    outcome = record_score(store, changed)
    assert store.conn.execute("SELECT superseded_by FROM scores WHERE id = ?",
                              (first_outcome.score_id,)).fetchone()[0] == outcome.score_id

    assert publisher(store, [outcome]) == {"sr": 2, "pdf": 1}
    assert len(Outbox(store).rows()) == 6
    srs = queued_srs(store, outcome.score_id, objects)
    assert srs.keys() == first_srs.keys() == {"wsi", "us_image"}
    for role, sr in srs.items():
        earlier = first_srs[role]
        assert predecessor_of(sr) == identity(earlier)
        assert sr.StudyInstanceUID == objects[role].StudyInstanceUID
        assert sr.SOPInstanceUID != earlier.SOPInstanceUID
        # one series per model version and study; the newest shows, being numbered highest
        assert sr.SeriesInstanceUID == earlier.SeriesInstanceUID
        assert (earlier.InstanceNumber, sr.InstanceNumber) == (1, 2)
        assert tracking(sr) == tracking(earlier) == tracking_uid(first.patient_key, SECRET)


def test_a_new_model_version_gives_new_srs_in_new_series_with_the_same_tracking_uid(
        store, config, objects, models, version, publisher):
    first = make_result(store, config, objects, version)
    changed = dataclasses.replace(first, inputs_hash="cd" * 32, scored_at="2026-01-20T09:30:00Z")
    outcomes = [record_score(store, result) for result in (first, changed)]
    for outcome in outcomes:
        publisher(store, [outcome])
    earlier = [queued_srs(store, o.score_id, objects) for o in outcomes]

    other_version = save_model(models, b"retrained")
    assert other_version != version
    retrained = dataclasses.replace(changed, model_version=other_version, risk=0.3,
                                    scored_at="2026-02-01T08:00:00Z")
    outcome = record_score(store, retrained)
    assert publisher(store, [outcome]) == {"sr": 2, "pdf": 1}
    srs = queued_srs(store, outcome.score_id, objects)

    old = {ds.SOPInstanceUID for placed in earlier for ds in placed.values()}
    assert len(old) == 4
    for role, sr in srs.items():
        latest = earlier[1][role]
        assert sr.SOPInstanceUID not in old
        assert sr.StudyInstanceUID == objects[role].StudyInstanceUID
        assert sr.SeriesInstanceUID != latest.SeriesInstanceUID
        assert sr.SeriesInstanceUID == series_uid_of(objects[role], retrained, SETTINGS)
        assert (earlier[0][role].InstanceNumber, latest.InstanceNumber,
                sr.InstanceNumber) == (1, 2, 1)
        assert predecessor_of(sr) == identity(latest)  # the latest of its study, not the first
        assert tracking(sr) == tracking(earlier[0][role]) == tracking(latest)
        assert sr.SoftwareVersions[1] == other_version


def test_a_result_made_current_again_is_published_anew_as_the_newest(
        store, config, objects, models, version, clock):
    """Model v1, then v2, then v1 again (a rollback): v1's score row is current again and gets
    new objects (new SOP Instance UIDs, the next instance number of v1's series, v2's SR as
    predecessor, content time of the rollback), not v1's old objects queued again, which the
    viewer would keep showing behind v2's."""
    publisher = ResultPublisher(models, dataclasses.replace(SETTINGS, hl7=True))
    first = make_result(store, config, objects, version)
    first_outcome = record_score(store, first)
    assert publisher(store, [first_outcome]) == {"sr": 2, "pdf": 1, "hl7": 1}
    v1_srs = queued_srs(store, first_outcome.score_id, objects)
    _, v1_pdf = queued(store, first_outcome.score_id, "pdf")
    other_version = save_model(models, b"retrained")
    second = dataclasses.replace(first, model_version=other_version, risk=0.3,
                                 scored_at="2026-02-01T08:00:00Z")
    second_outcome = record_score(store, second)
    assert publisher(store, [second_outcome]) == {"sr": 2, "pdf": 1, "hl7": 1}
    v2_srs = queued_srs(store, second_outcome.score_id, objects)
    before = {r.sop_instance_uid for r in Outbox(store).rows()}

    clock.advance(days=3)
    result = reinstate(store, first_outcome.score_id, "digest")
    assert result == dataclasses.replace(first, scored_at=store.stamp())
    scores = {row["id"]: tuple(row) for row in store.conn.execute(
        "SELECT id, superseded_by, revision, published_revision FROM scores")}
    assert scores == {first_outcome.score_id: (first_outcome.score_id, None, 1, 0),
                      second_outcome.score_id: (second_outcome.score_id,
                                                first_outcome.score_id, 0, 0)}
    outcome = ScoreOutcome(first.patient_key, "scored", first_outcome.score_id, result=result)
    assert publisher(store, [outcome]) == {"sr": 2, "pdf": 1, "hl7": 1}
    assert publisher(store, [outcome]) == {"sr": 0, "pdf": 0, "hl7": 0}
    assert store.conn.execute("SELECT published_revision FROM scores WHERE id = ?",
                              (first_outcome.score_id,)).fetchone()[0] == 1

    srs = queued_srs(store, first_outcome.score_id, objects, revision=1)
    assert srs.keys() == {"wsi", "us_image"}
    for role, sr in srs.items():
        old, latest = v1_srs[role], v2_srs[role]
        assert sr.SOPInstanceUID not in before
        assert sr.SeriesInstanceUID == old.SeriesInstanceUID  # v1's series
        assert (old.InstanceNumber, sr.InstanceNumber) == (1, 2)  # the newest of it
        assert predecessor_of(sr) == identity(latest)  # v2's SR in that study
        assert (sr.ContentDate + sr.ContentTime) > (latest.ContentDate + latest.ContentTime)
        assert sr.SoftwareVersions[1] == version
        assert tracking(sr) == tracking(old) == tracking(latest)
    (pdf_row,) = [r for r in Outbox(store).rows() if r.kind == "pdf" and r.revision == 1]
    pdf = pydicom.dcmread(store.objects.path_for(pdf_row.object_sha256))
    assert pdf.SOPInstanceUID not in before
    assert (pdf.SeriesInstanceUID, pdf.InstanceNumber) == (v1_pdf.SeriesInstanceUID, 2)
    controls = [r.object_key for r in Outbox(store).rows() if r.kind == "hl7"]
    assert controls == [f"hl7:MRRP{first_outcome.score_id}",
                        f"hl7:MRRP{second_outcome.score_id}",
                        f"hl7:MRRP{first_outcome.score_id}R1"]


def test_a_failed_publication_queues_nothing_of_its_score_and_is_redone(
        store, config, objects, models, version, publisher, clock, caplog):
    """One transaction per score: when one object cannot be queued (here its SOP Instance UID
    is already queued with other bytes), none of the score's objects is, and the next scoring
    run finds the score unpublished."""
    result = make_result(store, config, objects, version)
    outcome = record_score(store, result)
    (_, pdf), = [(kind, ds) for kind, ds in publisher.objects(store, result) if kind == "pdf"]
    pdf.InstanceNumber = 7  # another document under the PDF's UID
    squatter = Outbox(store).enqueue(None, score_id=None, kind="pdf", destination="pacs",
                                     data=builders.encode(pdf),
                                     sop_instance_uid=pdf.SOPInstanceUID)
    with pytest.raises(ExportConflict):
        publisher(store, [outcome])
    assert [r.id for r in Outbox(store).rows()] == [squatter.row_id]

    pipeline = Pipeline(config, exporter=publisher, clock=clock)
    try:
        (pending,) = pipeline._unpublished()
        assert (pending.score_id, pending.result) == (outcome.score_id, result)
        counts: dict[str, int] = {}
        pipeline._publish([pending], counts)
        assert counts == {"failed": 1}  # refused again, logged without the patient
        assert "MRN001" not in caplog.text and result.patient_key not in caplog.text
        # the squatting row gives up its key (as if it had never been queued)
        with store.transaction() as conn:
            conn.execute("UPDATE exports SET object_key = NULL WHERE id = ?",
                         (squatter.row_id,))
        pipeline._publish(pipeline._unpublished(), counts)
        assert counts == {"failed": 1, "sr": 2, "pdf": 1}
        assert pipeline._unpublished() == []
    finally:
        pipeline.close()
    assert [r.kind for r in Outbox(store).rows() if r.score_id == outcome.score_id] == [
        "sr", "sr", "pdf"]


def test_republishing_an_older_result_keeps_its_objects(store, config, objects, version,
                                                         publisher):
    """The predecessor is the SR of an earlier score only: a newer one must not change the
    bytes (hence the content under one SOP Instance UID) of an older result's SR."""
    first = make_result(store, config, objects, version)
    first_outcome = record_score(store, first)
    publisher(store, [first_outcome])
    later = record_score(store, dataclasses.replace(first, inputs_hash="cd" * 32))
    publisher(store, [later])
    rows = Outbox(store).rows()
    assert len(rows) == 6

    assert publisher(store, [first_outcome]) == {"sr": 0, "pdf": 0}
    assert Outbox(store).rows() == rows
    for sr in queued_srs(store, first_outcome.score_id, objects).values():
        assert "PredecessorDocumentsSequence" not in sr
        assert sr.InstanceNumber == 1


def test_our_srs_returned_by_the_pacs_are_stored_but_are_no_lesion_roi(store, config, intake,
                                                                       objects, version,
                                                                       publisher):
    outcome = record_score(store, make_result(store, config, objects, version))
    publisher(store, [outcome])
    rows = [r for r in Outbox(store).rows() if r.kind == "sr"]
    assert len(rows) == 2

    def rois_of(sop_instance_uid: str) -> int:
        return store.conn.execute(
            "SELECT count(*) FROM rois r JOIN instances i ON i.id = r.instance_id "
            "WHERE i.sop_instance_uid = ?", (sop_instance_uid,)).fetchone()[0]

    for row in rows:
        assert row.object_sha256 is not None
        received = intake.receive_dicom(store.objects.read_bytes(row.object_sha256),
                                        "dicom:PACS")
        assert received.outcome is Outcome.NEW, received.reason
        stored = store.conn.execute(
            "SELECT sop_instance_uid, sha256 FROM instances WHERE id = ?",
            (received.row_id,)).fetchone()
        assert tuple(stored) == (row.sop_instance_uid, row.object_sha256)
        # our SR holds a POLYLINE on the US image too, yet only the sonographer's SR is a ROI
        assert rois_of(row.sop_instance_uid) == 0
    assert rois_of(objects["us_roi"].SOPInstanceUID) == 1
    (case,) = case_inputs(store, config).values()
    assert [(ref.sop_instance_uid, image) for ref, image in case.us_rois] == [
        (objects["us_roi"].SOPInstanceUID, objects["us_image"].SOPInstanceUID)]


@pytest.mark.needs_tool("dciodvfy")
def test_queued_srs_and_pdf_pass_dciodvfy(store, config, objects, version, publisher):
    first = make_result(store, config, objects, version)
    outcomes = [record_score(store, first),
                record_score(store, dataclasses.replace(first, inputs_hash="cd" * 32))]
    for outcome in outcomes:
        publisher(store, [outcome])
    rows = Outbox(store).rows()
    # the second score's SRs have a predecessor; all four have the region group
    assert [r.kind for r in rows] == ["sr", "sr", "pdf"] * 2
    for row in rows:
        assert row.object_sha256 is not None
        errors, warnings = dciodvfy(store.objects.path_for(row.object_sha256))
        assert errors == [], (row.kind, errors)
        assert set(warnings) == {PRIVATE_SCHEME_WARNING}, (row.kind, warnings)


def test_without_pdf_only_the_srs_are_queued(store, config, objects, models, version):
    outcome = record_score(store, make_result(store, config, objects, version))
    publisher = ResultPublisher(models, PublishSettings(pdf=False, uid_secret=SECRET))
    assert publisher(store, [outcome]) == {"sr": 2, "pdf": 0}
    assert [r.kind for r in Outbox(store).rows()] == ["sr", "sr"]


def test_an_hl7_result_is_queued_for_the_his_once_when_configured(store, config, objects,
                                                                 models, version):
    from mrrp_pacs.hl7.message import parse_message

    outcome = record_score(store, make_result(store, config, objects, version))
    settings = PublishSettings(uid_secret=SECRET, hl7=True, hl7_receiving_application="HIS")
    publisher = ResultPublisher(models, settings)
    assert publisher(store, [outcome]) == {"sr": 2, "pdf": 1, "hl7": 1}
    assert publisher(store, [outcome]) == {"sr": 0, "pdf": 0, "hl7": 0}
    (row,) = [r for r in Outbox(store).rows() if r.kind == "hl7"]
    assert (row.destination, row.state, row.score_id) == ("his", "pending", outcome.score_id)
    message = parse_message(store.objects.read_bytes(row.object_sha256))
    msh = message.segments[0]
    assert message.field(msh, 10) == f"MRRP{outcome.score_id}"
    assert message.field(msh, 5) == "HIS"
    values = {message.component(s, 3, 1): message.field(s, 5)
              for s in message.segments if s.name == "OBX"}
    assert float(values["MRRP-RISK"]) == pytest.approx(outcome.result.risk, abs=1e-4)
    assert values["MRRP-GROUP"] == outcome.result.group
