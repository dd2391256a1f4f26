"""Pull new studies from a PACS: C-FIND what is there, then C-MOVE (or C-GET) what we lack.

Modelled on pynetdicom's ``findscu``/``movescu``/``getscu`` apps. One poll:

1. C-FIND at STUDY level (Study Root) for studies whose StudyDate lies in the rolling window
   and whose ModalitiesInStudy include one we read (Orthanc matches any of a multi-valued
   ModalitiesInStudy; a PACS that ignores the key returns more studies, filtered in step 2);
1b. the look-back: StudyDate is when the study began, not when the PACS received its
   objects, so a slide scanned a week after its study (or stored in the older ultrasound
   study) falls outside the window. DICOM query/retrieve has no standard "received" key
   (Orthanc keeps its ``LastUpdate`` in REST metadata only, not as a C-FIND key), so instead
   every patient we hold with a wanted imaging modality missing (ultrasound but no slide, a
   slide but no ultrasound, or a result but no image) is looked up by PatientID with no date
   limit: at most ``lookback_patients`` per poll, the longest unasked first, each at most once
   per ``lookback_interval_s``, and only for ``lookback_days`` after the patient's first
   arrival here (table ``pull_lookbacks``);
2. a study already retrieved completely is skipped, unless the PACS now counts more instances
   in it (NumberOfStudyRelatedInstances grew: it is retrieved again, intake deduplicates);
   a study whose last attempt failed waits for its next attempt time (backoff below);
3. C-FIND at SERIES level, keeping the series of the wanted modalities, so that a study mixing
   in CT or other objects we do not accept does not fail forever;
4. each wanted series is retrieved: C-MOVE to our storage SCP (the PACS must know our AE title
   as a destination: Orthanc's ``DicomModalities``), or C-GET on the same association, whose
   C-STORE sub-operations are persisted through ``Intake`` before they are acknowledged;
5. the study's outcome goes to the ``retrievals`` table. A study that failed is tried again
   after ``retry_backoff_s``, doubling at each consecutive failure up to
   ``retry_max_backoff_s``; studies never tried come first in a poll, so a failing study
   cannot starve the others. Once a study has been failing for ``retry_budget_s`` it is given
   up (state ``gave_up``, counted in the summary and logged) and retried only when the PACS
   counts more instances in it. The backoff reads the store's clock.

Nothing raises out of :meth:`PacsPuller.poll`: errors are returned in the summary. Logs carry
counts, AE titles and status codes, never UIDs or patient data.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import (
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_GET_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
)

from listeners.dicom_scp import (
    COMPRESSED_TRANSFER_SYNTAXES,
    DEFAULT_MAX_PDU,
    IMAGE_SOP_CLASSES,
    STORAGE_SOP_CLASSES,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    IntakeOpener,
    persist_c_store,
)
from mrrp_pacs.clock import iso_utc
from mrrp_pacs.errors import PullError
from mrrp_pacs.faults import fault_point
from mrrp_pacs.store import Store

LOGGER = logging.getLogger(__name__)

DEFAULT_MODALITIES = ("US", "SM", "SR", "ANN")
DEFAULT_WINDOW_DAYS = 7
DEFAULT_MAX_STUDIES_PER_POLL = 50
DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_QUERY_TIMEOUT_S = 60.0  # seconds to wait for each C-FIND response
# seconds to wait for each C-MOVE/C-GET response: the PACS answers after every sub-operation,
# and one sub-operation may carry a slide level of a gigabyte
DEFAULT_RETRIEVE_TIMEOUT_S = 600.0
DEFAULT_LOOKBACK_DAYS = 90  # days after a patient's first arrival that it is looked back for
DEFAULT_LOOKBACK_PATIENTS = 20  # patients looked back per poll
DEFAULT_LOOKBACK_INTERVAL_S = 6 * 3600.0  # a patient is looked back at most this often
DEFAULT_RETRY_BACKOFF_S = 300.0  # first wait after a failed study; doubles per failure
DEFAULT_RETRY_MAX_BACKOFF_S = 6 * 3600.0
DEFAULT_RETRY_BUDGET_S = 72 * 3600.0  # a study failing this long is given up
IMAGING_MODALITIES = ("US", "SM")  # a case wants both; the look-back asks for the missing one
MAX_FIND_MATCHES = 100_000  # a PACS answering more than this is misconfigured or hostile

PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
WARNING_SOME_FAILED = 0xB000
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CS = re.compile(r"^[A-Z0-9_ ]{1,16}$")
_WILDCARDS = ("*", "?", "\\")  # C-FIND wildcards, and the value separator, in a PatientID


@dataclass(frozen=True)
class RemotePacs:
    """The PACS queried: where it listens and its AE title."""

    host: str
    port: int
    ae_title: str


@dataclass(frozen=True)
class StudyMatch:
    study_instance_uid: str
    study_date: str | None
    modalities: tuple[str, ...]  # empty when the PACS did not say
    instances: int | None  # NumberOfStudyRelatedInstances; None when the PACS did not say


@dataclass(frozen=True)
class SeriesMatch:
    series_instance_uid: str
    modality: str | None
    instances: int | None


@dataclass
class SubOperations:
    """Counts of C-STORE sub-operations reported by the PACS for one retrieve."""

    completed: int = 0
    failed: int = 0
    warning: int = 0

    def add(self, other: SubOperations) -> None:
        self.completed += other.completed
        self.failed += other.failed
        self.warning += other.warning


@dataclass(frozen=True)
class StudyOutcome:
    study_instance_uid: str
    state: Literal["complete", "failed"]
    series: int  # series of the wanted modalities
    wanted_instances: int | None  # instances in them, as the PACS counted
    completed: int  # sub-operations completed (warnings included)
    failed: int
    error: str | None = None


@dataclass
class PullSummary:
    """What one poll did. ``errors`` holds failures of the poll itself (no study was tried)."""

    found: int = 0  # studies matching the window and modalities, or found by the look-back
    up_to_date: int = 0  # already retrieved completely
    deferred: int = 0  # left for the next poll (more than max_studies_per_poll to do)
    looked_back: int = 0  # patients looked up by PatientID (a wanted modality missing)
    found_by_lookback: int = 0  # of ``found``, studies outside the StudyDate window
    backing_off: int = 0  # failed before, skipped until their next attempt time
    gave_up: int = 0  # failing for longer than the retry budget at this poll: given up
    abandoned: int = 0  # given up at an earlier poll and unchanged on the PACS: skipped
    studies: list[StudyOutcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def retrieved(self) -> int:
        return sum(s.state == "complete" for s in self.studies)

    @property
    def failed(self) -> int:
        return sum(s.state == "failed" for s in self.studies)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.failed

    def as_dict(self) -> dict[str, object]:
        return {"found": self.found, "up_to_date": self.up_to_date, "deferred": self.deferred,
                "retrieved": self.retrieved, "failed": self.failed,
                "looked_back": self.looked_back, "found_by_lookback": self.found_by_lookback,
                "backing_off": self.backing_off, "gave_up": self.gave_up,
                "abandoned": self.abandoned, "errors": list(self.errors),
                "studies": [vars(s) for s in self.studies]}


class PacsPuller:
    """Polls one PACS and retrieves the studies of the wanted modalities into our store.

    Parameters
    ----------
    store
        Our database; the ``retrievals`` table is read and written from the polling thread.
    remote
        The PACS queried.
    our_ae
        Our AE title: the calling AE of every association, and the C-MOVE destination (the
        AE title of our :class:`~listeners.dicom_scp.StorageScp`).
    our_port
        The port of our storage SCP, only to tell the operator what the PACS must be
        configured with when a C-MOVE destination is refused.
    open_intake
        Persists C-GET sub-operations; required when ``method`` is ``"get"``.
    modalities
        Modality codes wanted (ModalitiesInStudy / series Modality).
    window_days
        Days back from ``now`` whose StudyDate is queried; ``None`` queries every date.
    method
        ``"move"`` (the PACS opens a second association to our SCP) or ``"get"`` (objects
        come back on our own association; no PACS-side destination needed).
    max_studies_per_poll
        Studies retrieved at most per poll; the rest wait for the next one.
    connect_timeout_s, query_timeout_s, retrieve_timeout_s
        Seconds to wait for the TCP connection, for each C-FIND response, and for each
        C-MOVE/C-GET response.
    lookback_days
        Days after a patient's first arrival here during which a missing imaging modality is
        looked up by PatientID whatever the study date; ``None`` or 0: no look-back.
    lookback_patients
        Patients looked up at most per poll (the longest unasked first).
    lookback_interval_s
        Seconds before the same patient is looked up again.
    retry_backoff_s, retry_max_backoff_s
        Wait after a study's first failed attempt, doubled after each further failure up to
        the maximum (seconds, by the store's clock).
    retry_budget_s
        A study failing for this long (since its first failure in a row) is given up.
    stop_requested
        Set when the daemon stops: the poll ends after the study being retrieved.
    ssl_context
        Associate over TLS with this client context (:func:`mrrp_pacs.tls.client_context`);
        the remote's port is then its DICOM-TLS port. (A C-MOVE's objects arrive on the
        PACS's own association to our SCP: over TLS when the PACS is set up for our TLS port.)
    """

    def __init__(self, store: Store, remote: RemotePacs, our_ae: str, *,
                 our_port: int | None = None, open_intake: IntakeOpener | None = None,
                 modalities: tuple[str, ...] = DEFAULT_MODALITIES,
                 window_days: int | None = DEFAULT_WINDOW_DAYS,
                 method: Literal["move", "get"] = "move",
                 max_studies_per_poll: int = DEFAULT_MAX_STUDIES_PER_POLL,
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
                 query_timeout_s: float = DEFAULT_QUERY_TIMEOUT_S,
                 retrieve_timeout_s: float = DEFAULT_RETRIEVE_TIMEOUT_S,
                 lookback_days: int | None = DEFAULT_LOOKBACK_DAYS,
                 lookback_patients: int = DEFAULT_LOOKBACK_PATIENTS,
                 lookback_interval_s: float = DEFAULT_LOOKBACK_INTERVAL_S,
                 retry_backoff_s: float = DEFAULT_RETRY_BACKOFF_S,
                 retry_max_backoff_s: float = DEFAULT_RETRY_MAX_BACKOFF_S,
                 retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
                 stop_requested: threading.Event | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if method not in ("move", "get"):
            raise ValueError(f"method must be 'move' or 'get', got {method!r}")
        if method == "get" and open_intake is None:
            raise ValueError("method 'get' needs open_intake: the objects arrive on our own "
                             "association and are persisted there")
        if not modalities or not all(_CS.match(m) for m in modalities):
            raise ValueError(f"modalities must be DICOM modality codes such as 'US', 'SM'; "
                             f"got {modalities!r}")
        if window_days is not None and window_days < 1:
            raise ValueError(f"window_days must be at least 1 (or None for every date), "
                             f"got {window_days}")
        if max_studies_per_poll < 1:
            raise ValueError(f"max_studies_per_poll must be at least 1, got "
                             f"{max_studies_per_poll}")
        if lookback_days is not None and lookback_days < 0:
            raise ValueError(f"lookback_days must be 0 (off) or more, got {lookback_days}")
        if lookback_patients < 1 or lookback_interval_s < 0:
            raise ValueError(f"lookback_patients must be at least 1 and lookback_interval_s "
                             f"not negative, got {lookback_patients}, {lookback_interval_s}")
        if not 0 < retry_backoff_s <= retry_max_backoff_s or retry_budget_s <= 0:
            raise ValueError(f"retry_backoff_s must be above 0 and at most retry_max_backoff_s,"
                             f" and retry_budget_s above 0; got {retry_backoff_s}, "
                             f"{retry_max_backoff_s}, {retry_budget_s}")
        AE(ae_title=remote.ae_title)  # raises ValueError naming a bad title
        self.store = store
        self.remote = remote
        self.our_ae = str(AE(ae_title=our_ae).ae_title)
        self.our_port = our_port
        self.open_intake = open_intake
        self.modalities = tuple(modalities)
        self.window_days = window_days
        self.method = method
        self.max_studies_per_poll = max_studies_per_poll
        self.connect_timeout_s = connect_timeout_s
        self.query_timeout_s = query_timeout_s
        self.retrieve_timeout_s = retrieve_timeout_s
        self.lookback_days = lookback_days or None
        self.lookback_patients = lookback_patients
        self.lookback_interval_s = lookback_interval_s
        self.retry_backoff_s = retry_backoff_s
        self.retry_max_backoff_s = retry_max_backoff_s
        self.retry_budget_s = retry_budget_s
        self.stop_requested = stop_requested
        self.ssl_context = ssl_context

    # -- the poll ---------------------------------------------------------------------------

    def poll(self, now: datetime) -> PullSummary:
        """Query the PACS and retrieve what is new or incomplete; never raises.

        ``now`` is the local date and time at the PACS (StudyDate is a local date). The
        look-back and the retry schedule read the store's clock instead (UTC stamps).
        """
        summary = PullSummary()
        try:
            studies = {s.study_instance_uid: s for s in self.find_studies(now)}
        except Exception as exc:
            summary.errors.append(_describe(exc))
            LOGGER.warning("PACS poll of %s failed before any study: %s", self.remote.ae_title,
                           summary.errors[-1])
            return summary
        looked_back: dict[str, str] = {}  # study UID -> PatientID, studies outside the window
        try:
            by_patient = self.look_back()
        except Exception as exc:
            summary.errors.append(f"look-back by patient failed: {_describe(exc)}")
            LOGGER.warning("PACS poll of %s: %s", self.remote.ae_title, summary.errors[-1])
        else:
            summary.looked_back = len(by_patient)
            for patient_id, older in by_patient.items():
                for study in older:
                    if study.study_instance_uid not in studies:
                        studies[study.study_instance_uid] = study
                        looked_back[study.study_instance_uid] = patient_id
            summary.found_by_lookback = len(looked_back)
        found = sorted(studies.values(),
                       key=lambda s: (s.study_date or "", s.study_instance_uid), reverse=True)
        summary.found = len(found)
        try:
            todo = self._plan(found, summary)
        except Exception as exc:
            summary.errors.append(f"cannot read the retrievals table: {_describe(exc)}")
            LOGGER.error("PACS poll stopped: %s", summary.errors[-1])
            return summary
        deferred = todo[self.max_studies_per_poll:]
        for study in todo[: self.max_studies_per_poll]:
            if self.stop_requested is not None and self.stop_requested.is_set():
                deferred.append(study)  # the next poll, after a restart, takes it
                continue
            outcome = self._retrieve(study)
            summary.studies.append(outcome)
            try:
                if self._record(study, outcome) == "gave_up":
                    summary.gave_up += 1
            except Exception as exc:
                summary.errors.append(f"cannot record a retrieval: {_describe(exc)}")
                LOGGER.error("PACS poll: %s", summary.errors[-1])
        summary.deferred = len(deferred)
        self._ask_again({looked_back[s.study_instance_uid] for s in deferred
                         if s.study_instance_uid in looked_back}, summary)
        LOGGER.info("PACS poll of %s: %d studies found (%d by looking back at %d patients), "
                    "%d up to date, %d retrieved, %d failed, %d deferred, %d backing off, "
                    "%d given up", self.remote.ae_title, summary.found,
                    summary.found_by_lookback, summary.looked_back, summary.up_to_date,
                    summary.retrieved, summary.failed, summary.deferred, summary.backing_off,
                    summary.abandoned + summary.gave_up)
        if summary.gave_up:
            LOGGER.warning("PACS poll of %s: %d studies given up after failing for %g hours; "
                           "each is tried again only when the PACS holds more instances in it "
                           "(table retrievals, state gave_up)", self.remote.ae_title,
                           summary.gave_up, self.retry_budget_s / 3600)
        return summary

    def _ask_again(self, patients: set[str], summary: PullSummary) -> None:
        """Forget that ``patients`` were looked back: a study found only that way and left for
        a later poll would otherwise wait ``lookback_interval_s`` to be found again."""
        if not patients:
            return
        try:
            with self.store.transaction() as conn:
                conn.executemany("DELETE FROM pull_lookbacks WHERE remote_ae = ? AND "
                                 "patient_id = ?",
                                 [(self.remote.ae_title, p) for p in sorted(patients)])
        except Exception as exc:
            summary.errors.append(f"cannot record a look-back: {_describe(exc)}")
            LOGGER.error("PACS poll: %s", summary.errors[-1])

    def _plan(self, studies: list[StudyMatch], summary: PullSummary) -> list[StudyMatch]:
        """The studies to retrieve now, in order: never tried or grown first, then failed ones
        whose next attempt time has come (the earliest first), including failed studies the
        PACS did not list this time (dated out of the window, found by an earlier look-back).
        Counts the others."""
        now = self.store.stamp()
        listed = {study.study_instance_uid for study in studies}
        fresh: list[StudyMatch] = []
        due: list[tuple[str, StudyMatch]] = []
        for study in studies:
            row = self.store.conn.execute(
                "SELECT state, remote_instances, next_attempt_at FROM retrievals "
                "WHERE remote_ae = ? AND study_instance_uid = ?",
                (self.remote.ae_title, study.study_instance_uid)).fetchone()
            grown = (row is not None and study.instances is not None
                     and row["remote_instances"] is not None
                     and study.instances > row["remote_instances"])
            if row is None or (row["state"] == "complete" and grown):
                fresh.append(study)
            elif row["state"] == "complete":
                summary.up_to_date += 1
            elif row["state"] == "gave_up":
                if grown:
                    due.append(("", study))
                else:
                    summary.abandoned += 1
            elif grown or row["next_attempt_at"] is None or row["next_attempt_at"] <= now:
                due.append((row["next_attempt_at"] or "", study))
            else:
                summary.backing_off += 1
        for row in self.store.conn.execute(
                "SELECT study_instance_uid, study_date, modalities, remote_instances, "
                "next_attempt_at FROM retrievals WHERE remote_ae = ? AND state = 'failed' AND "
                "(next_attempt_at IS NULL OR next_attempt_at <= ?)", (self.remote.ae_title, now)):
            if row["study_instance_uid"] not in listed:
                modalities = tuple(m for m in (row["modalities"] or "").split("\\") if m)
                due.append((row["next_attempt_at"] or "", StudyMatch(
                    row["study_instance_uid"], row["study_date"], modalities,
                    row["remote_instances"])))
        due.sort(key=lambda item: item[0])
        return fresh + [study for _, study in due]

    # -- queries ----------------------------------------------------------------------------

    def find_studies(self, now: datetime) -> list[StudyMatch]:
        """Studies in the window with a wanted modality, newest first.

        Raises
        ------
        PullError
            The PACS could not be reached or did not answer the query with success.
        """
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        query.StudyDate = self._date_range(now)
        query.ModalitiesInStudy = list(self.modalities)
        query.NumberOfStudyRelatedInstances = ""
        with self._association([(StudyRootQueryRetrieveInformationModelFind, [])]) as assoc:
            answers = self._c_find(assoc, query)
        studies: dict[str, StudyMatch] = {}
        for answer in answers:
            study = self._study_match(answer)
            if study is not None:
                studies[study.study_instance_uid] = study
        return sorted(studies.values(), key=lambda s: (s.study_date or "", s.study_instance_uid),
                      reverse=True)

    def find_series(self, assoc: Association, study: StudyMatch) -> list[SeriesMatch]:
        """Every series of ``study`` (Modality is matched here, not by the PACS)."""
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study.study_instance_uid
        query.SeriesInstanceUID = ""
        query.Modality = ""
        query.NumberOfSeriesRelatedInstances = ""
        series: dict[str, SeriesMatch] = {}
        for answer in self._c_find(assoc, query):
            uid = _uid(answer.get("SeriesInstanceUID"))
            if uid is not None:
                series[uid] = SeriesMatch(uid, _text(answer.get("Modality")),
                                          _count(answer.get("NumberOfSeriesRelatedInstances")))
        return sorted(series.values(), key=lambda s: s.series_instance_uid)

    def look_back(self) -> dict[str, list[StudyMatch]]:
        """Ask the PACS for every study of the patients due a look-back, whatever its date.

        Returns the studies found (of the wanted modalities) by PatientID asked. Each patient
        asked is stamped in ``pull_lookbacks`` with the store's clock.

        Raises
        ------
        PullError
            The PACS could not be reached or a query did not end with success.
        """
        patients = self.lookback_candidates()
        found: dict[str, list[StudyMatch]] = {}
        if not patients:
            return found
        with self._association([(StudyRootQueryRetrieveInformationModelFind, [])]) as assoc:
            for patient_id in patients:
                query = Dataset()
                query.QueryRetrieveLevel = "STUDY"
                query.PatientID = patient_id
                query.StudyInstanceUID = ""
                query.StudyDate = ""
                query.ModalitiesInStudy = list(self.modalities)
                query.NumberOfStudyRelatedInstances = ""
                answers = self._c_find(assoc, query)
                studies = [s for a in answers
                           if _text(a.get("PatientID")) in (None, patient_id)
                           and (s := self._study_match(a)) is not None]
                found[patient_id] = studies
                with self.store.transaction() as conn:
                    conn.execute(
                        "INSERT INTO pull_lookbacks (remote_ae, patient_id, checked_at, studies) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT (remote_ae, patient_id) DO UPDATE SET "
                        "checked_at = excluded.checked_at, studies = excluded.studies",
                        (self.remote.ae_title, patient_id, self.store.stamp(), len(studies)))
        return found

    def lookback_candidates(self) -> list[str]:
        """PatientIDs due a look-back: a wanted imaging modality missing, first arrival here
        within ``lookback_days``, not asked within ``lookback_interval_s``; the longest unasked
        (never asked first), then the earliest arrived; at most ``lookback_patients``.

        A patient is known by the PatientID of its images or the PID-3 of its HL7 results
        (the PACS is asked by that value, whatever the issuer). An ID holding a C-FIND
        wildcard (``*``, ``?``) or a backslash is never asked: it would match other patients.
        """
        wanted = [m for m in IMAGING_MODALITIES if m in self.modalities]
        if self.lookback_days is None or not wanted:
            return []
        now = self.store.clock()
        horizon = iso_utc(now - timedelta(days=self.lookback_days))
        asked_before = iso_utc(now - timedelta(seconds=self.lookback_interval_s))
        has = ", ".join(f"COALESCE(MAX(a.modality = ?), 0) AS has_{i}"
                        for i in range(len(wanted)))
        lacks = " OR ".join(f"has_{i} = 0" for i in range(len(wanted)))
        plain = " AND ".join(f"instr(a.patient_id, '{c}') = 0" for c in _WILDCARDS)
        rows = self.store.conn.execute(
            "WITH arrivals (patient_id, modality, received_at) AS ("
            " SELECT patient_id, modality, received_at FROM instances"
            " WHERE superseded_by IS NULL AND patient_id IS NOT NULL"
            " UNION ALL SELECT patient_id, NULL, received_at FROM hl7_messages"
            " WHERE state = 'parsed' AND patient_id IS NOT NULL) "
            f"SELECT a.patient_id, MIN(a.received_at) AS first_at, "
            f"MAX(l.checked_at) AS checked_at, {has} "
            "FROM arrivals a LEFT JOIN pull_lookbacks l "
            "ON l.remote_ae = ? AND l.patient_id = a.patient_id "
            f"WHERE trim(a.patient_id) != '' AND length(a.patient_id) <= 64 AND {plain} "
            "GROUP BY a.patient_id "
            f"HAVING first_at >= ? AND (checked_at IS NULL OR checked_at <= ?) AND ({lacks}) "
            "ORDER BY checked_at IS NOT NULL, checked_at, first_at, a.patient_id LIMIT ?",
            (*wanted, self.remote.ae_title, horizon, asked_before, self.lookback_patients),
        ).fetchall()
        return [str(row["patient_id"]) for row in rows]

    def _study_match(self, answer: Dataset) -> StudyMatch | None:
        """A study-level C-FIND answer as a match, or None (no valid UID, no wanted modality)."""
        uid = _uid(answer.get("StudyInstanceUID"))
        if uid is None:
            return None
        modalities = tuple(m for m in _strings(answer.get("ModalitiesInStudy")) if m)
        if modalities and not set(modalities) & set(self.modalities):
            return None  # the PACS did not apply ModalitiesInStudy matching
        return StudyMatch(uid, _text(answer.get("StudyDate")), modalities,
                          _count(answer.get("NumberOfStudyRelatedInstances")))

    def _date_range(self, now: datetime) -> str:
        if self.window_days is None:
            return ""
        first = now.date() - timedelta(days=self.window_days)
        return f"{first:%Y%m%d}-{now.date():%Y%m%d}"

    def _c_find(self, assoc: Association, query: Dataset) -> list[Dataset]:
        assoc.dimse_timeout = self.query_timeout_s
        answers: list[Dataset] = []
        final: int | None = None
        for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind):
            code = status.get("Status") if status else None
            if code is None:
                raise PullError(f"{self._remote_text()} gave no C-FIND status "
                                "(association aborted or timed out)" + self._acl_hint(),
                                source=self._remote_text())
            if code in PENDING:
                if identifier is not None:
                    answers.append(identifier)
                if len(answers) > MAX_FIND_MATCHES:
                    assoc.abort()
                    raise PullError(f"the PACS answered more than {MAX_FIND_MATCHES} matches; "
                                    "narrow window_days", source=self._remote_text())
            else:
                final = int(code)
        if final != SUCCESS:
            raise PullError(f"C-FIND ended with status {_status_text(final)}",
                            source=self._remote_text())
        return answers

    # -- retrieval --------------------------------------------------------------------------

    def _held(self, series: SeriesMatch) -> bool:
        """Whether we already store every instance the PACS has in ``series``.

        A study grows when a series is added to it (often our own SR): only what is new is
        fetched again, not the slides already here.
        """
        if series.instances is None:
            return False
        (count,) = self.store.conn.execute(
            "SELECT COUNT(DISTINCT sop_instance_uid) FROM instances "
            "WHERE series_instance_uid = ?", (series.series_instance_uid,)).fetchone()
        return int(count) >= series.instances

    def _retrieve(self, study: StudyMatch) -> StudyOutcome:
        """Retrieve the wanted series of one study; failures become the outcome's error."""
        uid = study.study_instance_uid
        totals = SubOperations()
        wanted: list[SeriesMatch] = []
        try:
            with self._association(self._retrieve_contexts(), self._retrieve_roles(),
                                   self._retrieve_handlers()) as assoc:
                wanted = [s for s in self.find_series(assoc, study)
                          if s.modality in self.modalities and not self._held(s)]
                for index, series in enumerate(wanted, start=1):
                    done, code = self._retrieve_series(assoc, study, series)
                    totals.add(done)
                    fault_point("pull.series")
                    if code != SUCCESS or done.failed:
                        raise PullError(
                            f"C-{self.method.upper()} of series {index} of {len(wanted)} ended "
                            f"with status {_status_text(code, self.method)}, "
                            f"{done.completed} sub-operations completed, {done.failed} failed"
                            + (self._destination_hint() if self.method == "move" else ""),
                            source=self._remote_text())
        except Exception as exc:
            error = _describe(exc)
            LOGGER.warning("retrieval of a study from %s failed: %s", self.remote.ae_title, error)
            return StudyOutcome(uid, "failed", len(wanted), _sum_instances(wanted),
                                totals.completed + totals.warning, totals.failed, error)
        return StudyOutcome(uid, "complete", len(wanted), _sum_instances(wanted),
                            totals.completed + totals.warning, totals.failed)

    def _retrieve_series(self, assoc: Association, study: StudyMatch,
                         series: SeriesMatch) -> tuple[SubOperations, int | None]:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = study.study_instance_uid
        identifier.SeriesInstanceUID = series.series_instance_uid
        assoc.dimse_timeout = self.retrieve_timeout_s
        if self.method == "move":
            responses = assoc.send_c_move(identifier, self.our_ae,
                                          StudyRootQueryRetrieveInformationModelMove)
        else:
            responses = assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet)
        counts = SubOperations()
        final: int | None = None
        for status, _ in responses:
            code = status.get("Status") if status else None
            if code is None:
                return counts, None  # aborted or timed out: no final status
            # pending responses count what is done so far; the final one, when it carries
            # counts, has the totals
            counts = SubOperations(
                _count_or(status.get("NumberOfCompletedSuboperations"), counts.completed),
                _count_or(status.get("NumberOfFailedSuboperations"), counts.failed),
                _count_or(status.get("NumberOfWarningSuboperations"), counts.warning))
            if code not in PENDING:
                final = int(code)
        return counts, final

    def _retrieve_contexts(self) -> list[tuple[str, list[str]]]:
        contexts: list[tuple[str, list[str]]] = [
            (StudyRootQueryRetrieveInformationModelFind, []),
        ]
        if self.method == "move":
            return [*contexts, (StudyRootQueryRetrieveInformationModelMove, [])]
        contexts.append((StudyRootQueryRetrieveInformationModelGet, []))
        for sop_class in STORAGE_SOP_CLASSES:
            contexts.append((sop_class, list(UNCOMPRESSED_TRANSFER_SYNTAXES)))
            if sop_class in IMAGE_SOP_CLASSES:
                # one syntax per context: the PACS then sends compressed data unchanged
                contexts += [(sop_class, [syntax]) for syntax in COMPRESSED_TRANSFER_SYNTAXES]
        return contexts

    def _retrieve_roles(self) -> list[SCP_SCU_RoleSelectionNegotiation]:
        if self.method == "move":
            return []
        return [build_role(sop_class, scp_role=True) for sop_class in STORAGE_SOP_CLASSES]

    def _retrieve_handlers(self) -> list[EventHandlerType]:
        if self.method == "move":
            return []
        return [(evt.EVT_C_STORE, self._on_c_store)]

    def _on_c_store(self, event: Event) -> Dataset:
        assert self.open_intake is not None  # checked in __init__ for method "get"
        origin = f"dicom:{self.remote.ae_title}"
        return persist_c_store(event, self.open_intake, origin).as_dataset()

    @contextmanager
    def _association(self, contexts: list[tuple[str, list[str]]],
                     roles: list[SCP_SCU_RoleSelectionNegotiation] | None = None,
                     handlers: list[EventHandlerType] | None = None) -> Iterator[Association]:
        ae = AE(ae_title=self.our_ae)
        ae.maximum_pdu_size = DEFAULT_MAX_PDU  # C-GET brings slides back on this association
        ae.connection_timeout = self.connect_timeout_s
        ae.acse_timeout = self.connect_timeout_s
        ae.network_timeout = self.retrieve_timeout_s
        for sop_class, syntaxes in contexts:
            if syntaxes:
                ae.add_requested_context(sop_class, syntaxes)
            else:
                ae.add_requested_context(sop_class)
        tls = None if self.ssl_context is None else (self.ssl_context, self.remote.host)
        assoc = ae.associate(self.remote.host, self.remote.port, ae_title=self.remote.ae_title,
                             # pynetdicom types ext_neg with a private union of item types
                             ext_neg=cast("list[Any]", roles) or None,
                             evt_handlers=handlers or None, tls_args=tls)
        if not assoc.is_established:
            if assoc.is_rejected:
                raise PullError(f"{self._remote_text()} rejected our association (calling "
                                f"AE {self.our_ae})" + self._acl_hint(), source=self._remote_text())
            raise PullError(f"cannot associate with {self._remote_text()}: connection "
                            "refused, timed out or aborted" + (
                                "" if tls is None else " or TLS handshake failed (certificate "
                                "not trusted, name not matching, ours refused)"),
                            source=self._remote_text())
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()

    # -- bookkeeping ------------------------------------------------------------------------

    def _record(self, study: StudyMatch, outcome: StudyOutcome) -> str:
        """Write the attempt's outcome and, for a failure, when to try again; returns the
        study's state now: ``complete``, ``failed`` (backing off) or ``gave_up``."""
        moment = self.store.clock()
        now = iso_utc(moment)
        with self.store.transaction() as conn:
            previous = conn.execute(
                "SELECT state, failures, failing_since FROM retrievals "
                "WHERE remote_ae = ? AND study_instance_uid = ?",
                (self.remote.ae_title, study.study_instance_uid)).fetchone()
            state: str = outcome.state
            failures, failing_since, next_attempt = 0, None, None
            if outcome.state == "failed":
                # a run of failures; a study given up and retried (it grew) starts a new run
                going_on = previous is not None and previous["state"] == "failed"
                failures = previous["failures"] + 1 if going_on else 1
                failing_since = (previous["failing_since"] if going_on else None) or now
                failing_for = (moment - datetime.fromisoformat(failing_since)).total_seconds()
                if failing_for >= self.retry_budget_s:
                    state = "gave_up"
                else:
                    wait = min(self.retry_backoff_s * 2 ** min(failures - 1, 62),
                               self.retry_max_backoff_s)
                    next_attempt = iso_utc(moment + timedelta(seconds=wait))
            conn.execute(
                "INSERT INTO retrievals (remote_ae, study_instance_uid, study_date, modalities, "
                "method, state, remote_instances, wanted_instances, completed, failed, "
                "attempts, first_attempt_at, last_attempt_at, completed_at, error, failures, "
                "failing_since, next_attempt_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (remote_ae, study_instance_uid) DO UPDATE SET "
                "study_date = excluded.study_date, modalities = excluded.modalities, "
                "method = excluded.method, state = excluded.state, "
                "remote_instances = excluded.remote_instances, "
                "wanted_instances = excluded.wanted_instances, "
                "completed = excluded.completed, failed = excluded.failed, "
                "attempts = retrievals.attempts + 1, "
                "last_attempt_at = excluded.last_attempt_at, "
                "completed_at = COALESCE(excluded.completed_at, retrievals.completed_at), "
                "error = excluded.error, failures = excluded.failures, "
                "failing_since = excluded.failing_since, "
                "next_attempt_at = excluded.next_attempt_at",
                (self.remote.ae_title, study.study_instance_uid, study.study_date,
                 "\\".join(study.modalities) or None, self.method, state,
                 study.instances, outcome.wanted_instances, outcome.completed, outcome.failed,
                 now, now, now if outcome.state == "complete" else None, outcome.error,
                 failures, failing_since, next_attempt))
        return state

    def _remote_text(self) -> str:
        return f"the PACS (AE {self.remote.ae_title}, {self.remote.host}:{self.remote.port})"

    def _acl_hint(self) -> str:
        return (f"; check that the PACS knows our AE title {self.our_ae} (Orthanc: "
                "DicomModalities), which it needs before answering queries")

    def _destination_hint(self) -> str:
        where = f" at this host, port {self.our_port}" if self.our_port is not None else ""
        return (f"; a C-MOVE needs the PACS to know {self.our_ae}{where} as a destination "
                "(Orthanc: DicomModalities) and our storage SCP to be running")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PullError | ValueError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _status_text(code: int | None, method: str = "find") -> str:
    if code is None:
        return "none (association aborted or timed out)"
    table = {"find": QR_FIND_SERVICE_CLASS_STATUS, "get": QR_GET_SERVICE_CLASS_STATUS,
             "move": QR_MOVE_SERVICE_CLASS_STATUS}[method]
    meaning = table.get(code, ("", "unknown"))[1]
    return f"0x{code:04X}" + (f" ({meaning})" if meaning else "")


def _strings(value: object) -> list[str]:
    if value is None:
        return []
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    return [str(item).strip() for item in items]


def _text(value: object) -> str | None:
    items = _strings(value)
    return items[0] if items and items[0] else None


def _uid(value: object) -> str | None:
    text = _text(value)
    return text if text and len(text) <= 64 and _UID.match(text) else None


def _count(value: object) -> int | None:
    text = _text(value)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _count_or(value: object, previous: int) -> int:
    count = _count(value)
    return previous if count is None else count


def _sum_instances(series: list[SeriesMatch]) -> int | None:
    counts = [s.instances for s in series]
    return None if any(c is None for c in counts) else sum(c for c in counts if c is not None)
