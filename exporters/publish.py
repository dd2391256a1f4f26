"""From a new score to queued objects: SRs and a PDF companion (and an HL7 result) in the outbox.

One SR goes into the pathology study, or the ultrasound study (``sr_study``); a patient without
the chosen one gets it in the other. When the ultrasound image the lesion region is drawn on
lies in another study, a second SR (same content and Tracking UID) goes into that study, since
viewers draw a region only on images of the study they show. The PDF goes into the chosen
study.

A score is published in **one transaction**: every object is built first, then all its outbox
rows are inserted together with ``scores.published_revision``, so a crash leaves all of them
queued or none, and the next scoring run publishes a current score whose ``published_revision``
is not its ``revision`` (``mrrp_pacs.daemon.Pipeline._unpublished``).

A *publication* is one (score, revision). A score made current again after being superseded
(model v2 rolled back to v1, inputs A → B → A; :mod:`mrrp_pacs.scoring`) has a higher revision
and is published anew, as new documents: their SOP Instance UIDs include the revision
(:func:`exporters.sr.result_uid`), their predecessor is the newest SR in that study, whichever
score it reported, and their instance number is one above the earlier ones of their series, so
the reverted result is the newest in the viewer. Re-sending the old objects would not do: the
viewer would keep showing the newer (rolled-back) one, and the old UID's bytes cannot change.

Each SR's predecessor is the patient's SR of an earlier publication in the same study, found in
the outbox (whose rows are never deleted). Objects are deterministic, so queuing the same
publication twice writes one outbox row per object.
"""

from __future__ import annotations

import io
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from exporters.hl7_result import build_oru_r01
from exporters.outbox import Outbox
from exporters.pdf import TrainingKM, build_companion_pdf, build_encapsulated_pdf
from exporters.sr import DEFAULT_UID_SECRET, build_risk_sr, series_uid
from model_store import ModelStore
from mrrp_pacs.model.train import MODEL_KIND
from mrrp_pacs.results import EvidenceRef, RiskResult
from mrrp_pacs.scoring import ScoreOutcome
from mrrp_pacs.store import Store

LOGGER = logging.getLogger(__name__)

DESTINATION = "pacs"  # the outbox name of the configured PACS destination
HL7_DESTINATION = "his"  # the outbox name of the HL7 result receiver
SR_SERIES_NUMBER = 9901
PDF_SERIES_NUMBER = 9902


@dataclass(frozen=True)
class PublishSettings:
    sr_study: str = "pathology"  # pathology | ultrasound
    pdf: bool = True
    uid_secret: str = DEFAULT_UID_SECRET
    manufacturer: str = "mrrp-pacs"
    institution_name: str | None = None
    hl7: bool = False  # also queue an ORU^R01 for the HIS
    hl7_receiving_application: str = ""
    hl7_receiving_facility: str = ""


class ResultPublisher:
    """Builds and queues the objects of new scores (the daemon's ``exporter`` hook)."""

    def __init__(self, models: ModelStore, settings: PublishSettings) -> None:
        self.models = models
        self.settings = settings
        self._km: dict[str, TrainingKM] = {}

    def __call__(self, store: Store, outcomes: Sequence[ScoreOutcome]) -> dict[str, int]:
        """Queue the objects of each outcome that has a result, one transaction per score.

        Returns how many new outbox rows each kind got.

        Raises
        ------
        ExportConflict
            An object's SOP Instance UID (or HL7 control id) is queued with other bytes;
            nothing of that score is queued. Scores before it in ``outcomes`` stay queued.
        """
        queued = {"sr": 0, "pdf": 0, **({"hl7": 0} if self.settings.hl7 else {})}
        outbox = Outbox(store)
        for outcome in outcomes:
            if outcome.result is None or outcome.score_id is None:
                continue
            revision = score_revision(store, outcome.score_id)
            # everything is built before the transaction, so it holds the write lock briefly
            items: list[tuple[str, str, bytes, str | None]] = [
                (kind, DESTINATION, _encode(dataset), str(dataset.SOPInstanceUID))
                for kind, dataset in self.objects(store, outcome.result, revision)]
            if self.settings.hl7:
                items.append(("hl7", HL7_DESTINATION,
                              self.hl7_message(outcome.score_id, outcome.result, revision),
                              None))
            created: list[str] = []
            with store.transaction() as tx:
                if score_revision(tx, outcome.score_id) != revision:
                    # made current again meanwhile: the next run publishes the new revision
                    LOGGER.warning("score %d changed while its results were built; left to "
                                   "the next run", outcome.score_id)
                    continue
                for kind, destination, data, uid in items:
                    if outbox.enqueue(tx, score_id=outcome.score_id, kind=kind,
                                      destination=destination, data=data,
                                      sop_instance_uid=uid, revision=revision).created:
                        created.append(kind)
                tx.execute("UPDATE scores SET published_revision = ? WHERE id = ?",
                           (revision, outcome.score_id))
            for kind in created:
                queued[kind] += 1
        return queued

    def hl7_message(self, score_id: int, result: RiskResult, revision: int = 0) -> bytes:
        """The ORU^R01 of one score; its control id (``MRRP<score id>``, ``R<revision>``
        appended after a revert) and time are those of the score, so a rebuilt message is the
        same bytes (queued once)."""
        return build_oru_r01(
            result, control_id=f"MRRP{score_id}" + (f"R{revision}" if revision else ""),
            message_time=datetime.fromisoformat(result.scored_at).astimezone(UTC),
            receiving_application=self.settings.hl7_receiving_application,
            receiving_facility=self.settings.hl7_receiving_facility)

    def objects(self, store: Store, result: RiskResult,
                revision: int | None = None) -> list[tuple[str, Dataset]]:
        """The SRs and (optionally) the encapsulated PDF of one result.

        ``revision`` is the score's (``scores.revision``); None reads it from the score row
        of ``result`` (0 without one).

        One SR goes into the chosen study; when the ultrasound image the region is drawn on
        lies in another study, a second SR (same content, same Tracking UID) goes into that
        study too, because viewers draw a region only on images of the study they show (OHIF
        measured, deploy/viewer/README.md). The PDF goes into the chosen study only.
        """
        headers = {e.sop_instance_uid: _header(store, e) for e in result.evidence}
        study = self._study(result, headers)
        us_image = (headers.get(result.us_region.sop_instance_uid)
                    if result.us_region is not None else None)
        targets = [study]
        if us_image is not None and us_image.StudyInstanceUID != study.StudyInstanceUID:
            targets.append(us_image)
        publication = _publication(store, result, revision)
        earlier = _earlier(store, result, "sr", publication)
        made: list[tuple[str, Dataset]] = []
        for target in targets:
            in_study = [ds for ds in earlier if ds.StudyInstanceUID == target.StudyInstanceUID]
            made.append(("sr", build_risk_sr(
                result, list(headers.values()), study=target, series_number=SR_SERIES_NUMBER,
                # viewers show the SR of highest instance number in a series
                instance_number=1 + sum(ds.SeriesInstanceUID == series_uid_of(target, result,
                                                                               self.settings)
                                        for ds in in_study),
                predecessor=in_study[0] if in_study else None, us_image=us_image,
                uid_secret=self.settings.uid_secret, revision=publication[1],
                manufacturer=self.settings.manufacturer,
                institution_name=self.settings.institution_name)))
        if self.settings.pdf:
            pdf = build_companion_pdf(result, self._training(result),
                                      patient_id=str(study.get("PatientID", "")) or None)
            pdf_series = series_uid("pdf", result, str(study.StudyInstanceUID),
                                    self.settings.uid_secret)
            made.append(("pdf", build_encapsulated_pdf(
                pdf, study, result=result, series_number=PDF_SERIES_NUMBER,
                instance_number=1 + sum(ds.SeriesInstanceUID == pdf_series
                                        for ds in _earlier(store, result, "pdf", publication)),
                uid_secret=self.settings.uid_secret, revision=publication[1],
                manufacturer=self.settings.manufacturer,
                institution_name=self.settings.institution_name)))
        return made

    def _study(self, result: RiskResult, headers: dict[str, Dataset]) -> Dataset:
        order = ("wsi", "us_image") if self.settings.sr_study == "pathology" \
            else ("us_image", "wsi")
        for role in order:
            for ref in result.evidence:
                if ref.role == role:
                    return headers[ref.sop_instance_uid]
        raise ValueError(f"score of model {result.model_label} lists no slide or ultrasound "
                         "image to place its report in")

    def _training(self, result: RiskResult) -> TrainingKM:
        # by label: two model names may share a version string
        if result.model_label not in self._km:
            version = self.models.load(MODEL_KIND, result.model_name, result.model_version)
            self._km[result.model_label] = TrainingKM.from_manifest(version.manifest)
        return self._km[result.model_label]


def score_revision(store: Store | sqlite3.Connection, score_id: int) -> int:
    """``scores.revision`` of one score row (0 when there is no such row)."""
    conn = store if isinstance(store, sqlite3.Connection) else store.conn
    row = conn.execute("SELECT revision FROM scores WHERE id = ?", (score_id,)).fetchone()
    return int(row[0]) if row is not None else 0


def _publication(store: Store, result: RiskResult, revision: int | None) -> tuple[int, int]:
    """(score id, revision) of ``result``: its score row by patient, model version and inputs
    (-1 without one), and ``revision`` or else the row's."""
    row = store.conn.execute(
        "SELECT id, revision FROM scores WHERE patient_key = ? AND model_version = ? "
        "AND inputs_hash = ?",
        (result.patient_key, result.model_version, result.inputs_hash)).fetchone()
    if row is None:
        return -1, revision or 0
    return int(row[0]), int(row[1]) if revision is None else revision


def _earlier(store: Store, result: RiskResult, kind: str,
             publication: tuple[int, int]) -> list[Dataset]:
    """Headers of the patient's objects of ``kind`` queued by earlier publications, newest
    first (one per SOP Instance UID).

    Earlier in the outbox, not "any other": a publication built again after a newer one was
    queued (a crash, a second call) must get back the same bytes, else its SOP Instance UID
    would name two different documents; so once a publication has rows, only rows queued
    before its first one count. A publication without rows yet is the newest.
    """
    score_id, revision = publication
    rows = store.conn.execute(
        "SELECT e.object_sha256 FROM exports e JOIN scores s ON s.id = e.score_id "
        "WHERE s.patient_key = ? AND e.kind = ? AND NOT (e.score_id = ? AND e.revision = ?) "
        "AND e.id < coalesce((SELECT min(id) FROM exports WHERE score_id = ? "
        "AND revision = ?), 9223372036854775807) "
        "ORDER BY e.id DESC",
        (result.patient_key, kind, score_id, revision, score_id, revision)).fetchall()
    found: dict[str, Dataset] = {}
    for (sha,) in rows:
        header = pydicom.dcmread(store.objects.path_for(sha), stop_before_pixels=True)
        found.setdefault(str(header.SOPInstanceUID), header)
    return list(found.values())


def series_uid_of(study: Dataset, result: RiskResult, settings: PublishSettings) -> str:
    """The SR series of ``result``'s model version in ``study``."""
    return series_uid("sr", result, str(study.StudyInstanceUID), settings.uid_secret)


def _header(store: Store, ref: EvidenceRef) -> Dataset:
    return pydicom.dcmread(store.objects.path_for(ref.sha256), stop_before_pixels=True)


def _encode(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def settings_from_config(export: Any) -> PublishSettings:
    """:class:`PublishSettings` from the ``[export]`` section."""
    return PublishSettings(sr_study=export.sr_study, pdf=export.pdf,
                           uid_secret=export.uid_secret, manufacturer=export.manufacturer,
                           institution_name=export.institution_name or None,
                           hl7=bool(export.hl7_host),
                           hl7_receiving_application=export.hl7_receiving_application,
                           hl7_receiving_facility=export.hl7_receiving_facility)
