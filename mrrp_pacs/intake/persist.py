"""The one door into the store: persist a DICOM object or HL7 message, then say what happened.

Listeners (file drop, DICOM storage SCP, MLLP) all call :class:`Intake`. Order of work:
digest → already stored? → parse and validate → copy the bytes into the object store
(atomic) → one transaction for every row. A caller acknowledges only after ``receive_*``
returned ``NEW`` or ``DUPLICATE``; a ``sqlite3`` or ``OSError`` raised from here means nothing
was recorded and the sender should try again.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from mrrp_pacs import audit
from mrrp_pacs.audit import content_digest, control_digest, who_received
from mrrp_pacs.clinical_schema import ClinicalSchema, load_schema
from mrrp_pacs.config import Config
from mrrp_pacs.errors import DicomError, Hl7Error, SidecarError
from mrrp_pacs.faults import fault_point
from mrrp_pacs.hl7.message import looks_like_hl7, parse_message, split_messages
from mrrp_pacs.identity import patient_key
from mrrp_pacs.intake.dicom import PREAMBLE_BYTES, looks_like_dicom, read_meta
from mrrp_pacs.intake.records import FINAL_STATUSES, ResultContent, read_result
from mrrp_pacs.intake.sidecars import MAX_SIDECAR_BYTES, looks_like_sidecar, read_sidecar
from mrrp_pacs.store import ObjectStore, Store, sha256_file
from mrrp_pacs.store.groupcommit import GroupCommitter

LOGGER = logging.getLogger(__name__)

SNIFF_BYTES = PREAMBLE_BYTES + 4

T = TypeVar("T")


def same_source(stored: str | None, origin: str) -> bool:
    """Whether ``origin`` may replace an instance stored from ``stored`` (both intake origins).

    The same calling AE title (and, when both are known, the same peer address: ``dicom:<AE>@<
    address>``; rows received before addresses were recorded, and pulls, name the AE alone)
    is the same source; any file drop (``file:<path>``) is the same source as any other. (An
    operator reprocessing a refused object accepts it whatever its source:
    :meth:`Intake.receive_dicom` ``accepted``.)
    """
    if not stored:
        return True
    kind, _, rest = origin.partition(":")
    stored_kind, _, stored_rest = stored.partition(":")
    if kind != stored_kind:
        return False
    if kind == "file":
        return True
    if kind == "dicom":
        title, _, address = rest.rpartition("@") if "@" in rest else (rest, "", "")
        stored_title, _, stored_address = (stored_rest.rpartition("@") if "@" in stored_rest
                                           else (stored_rest, "", ""))
        return title == stored_title and (not address or not stored_address
                                          or address == stored_address)
    return rest == stored_rest


def _peer(origin: str) -> str | None:
    """The peer part of an origin for a ``refused_input`` row (not a file's path)."""
    kind, _, rest = origin.partition(":")
    return None if kind == "file" else rest or None


class Outcome(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass(frozen=True)
class IntakeResult:
    outcome: Outcome
    kind: str  # dicom | hl7 | sidecar | unknown
    reason: str | None = None
    row_id: int | None = None
    control_id: str | None = None  # HL7 MSH-10, for the acknowledgement


class Intake:
    """Persists received objects into one :class:`~mrrp_pacs.store.Store`.

    With a ``committer`` (the daemon's listeners share one), rows are written by its writer
    thread, in a transaction shared with whatever other listeners handed it at that moment
    (group commit, :mod:`mrrp_pacs.store.groupcommit`); ``receive_*`` still returns only once
    they are committed. Without one, each object commits its own transaction on ``store``.
    ``store`` serves the reads before the write and the object files either way.
    """

    def __init__(self, store: Store, config: Config, schema: ClinicalSchema | None = None,
                 committer: GroupCommitter | None = None) -> None:
        self.store = store
        self.config = config
        self.schema = schema if schema is not None else load_schema(config.clinical.schema_file)
        self.committer = committer

    def _write(self, rows: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``rows`` in a committed transaction (the committer's, or one of our own)."""
        if self.committer is not None:
            return self.committer.submit(rows)
        with self.store.transaction() as conn:
            return rows(conn)

    # -- files ---------------------------------------------------------------------------

    def receive_path(self, path: Path) -> list[IntakeResult]:
        """Recognise a file by its content and persist it (an HL7 file may hold many messages)."""
        try:
            with path.open("rb") as handle:
                head = handle.read(SNIFF_BYTES)
        except OSError as exc:
            return [IntakeResult(Outcome.REJECTED, "unknown", f"cannot be read: {exc.strerror}")]
        if looks_like_dicom(head):
            return [self.receive_dicom(path, origin=f"file:{path.absolute()}")]
        if looks_like_hl7(head):
            size = path.stat().st_size
            limit = self.config.ingest.max_hl7_bytes
            if size > limit:
                return [self.refuse("hl7", f"file:{path.absolute()}", "-",
                                      f"is {size} bytes, more than ingest.max_hl7_bytes "
                                      f"({limit})")]
            try:
                messages = split_messages(path.read_bytes())
            except Hl7Error as exc:
                return [IntakeResult(Outcome.REJECTED, "hl7", str(exc))]
            return [self.receive_hl7(raw, origin=f"file:{path.absolute()}") for raw in messages]
        if looks_like_sidecar(head):
            return [self.receive_sidecar(path)]
        if not head:
            return [IntakeResult(Outcome.REJECTED, "unknown", "is empty")]
        return [IntakeResult(Outcome.REJECTED, "unknown",
                             "is neither DICOM Part 10, an HL7 v2 message nor a region sidecar")]

    # -- region sidecars -------------------------------------------------------------------

    def receive_sidecar(self, path: Path) -> IntakeResult:
        """Persist an ASAP XML / GeoJSON / Pascal-VOC file found next to images."""
        try:
            if path.stat().st_size > MAX_SIDECAR_BYTES:
                return IntakeResult(Outcome.REJECTED, "sidecar",
                                    f"is larger than {MAX_SIDECAR_BYTES} bytes")
            data = path.read_bytes()
        except OSError as exc:
            return IntakeResult(Outcome.REJECTED, "sidecar", f"cannot be read: {exc.strerror}")
        try:
            sidecar = read_sidecar(data)
        except SidecarError as exc:
            return IntakeResult(Outcome.REJECTED, "sidecar", f"region file {exc}")
        sha = hashlib.sha256(data).hexdigest()
        if self._known("sidecars", sha):
            return IntakeResult(Outcome.DUPLICATE, "sidecar", "identical file already stored")
        self.store.objects.put_bytes(data)

        def rows(conn: sqlite3.Connection) -> IntakeResult:
            if self._known("sidecars", sha, conn):
                return IntakeResult(Outcome.DUPLICATE, "sidecar", "identical file already stored")
            row_id = self.store.insert(conn, "sidecars", {
                "kind": sidecar.kind, "sha256": sha, "size_bytes": len(data),
                "source": f"file:{path.absolute()}", "folder": str(path.parent.absolute()),
                "stem": path.stem, "image_file_name": sidecar.image_file_name,
                "received_at": self.store.stamp(),
            })
            return IntakeResult(Outcome.NEW, "sidecar", row_id=row_id)

        return self._write(rows)

    # -- DICOM ---------------------------------------------------------------------------

    def receive_dicom(self, source: Path | bytes, origin: str, *,
                      accepted: str | None = None) -> IntakeResult:
        """Persist one DICOM Part 10 object given as a file or as its encoded bytes.

        Other bytes under the SOP Instance UID of a stored instance replace it when they come
        from the same source (:func:`same_source`); from another they are refused and kept
        in ``refused_input`` (``mrrp-pacs quarantine``). ``accepted`` (``quarantine:<id>``,
        from ``quarantine reprocess``) is the operator accepting such an object: it replaces
        the stored one, ``origin`` being the source it came from.
        """
        limit = self.config.ingest.max_dicom_bytes
        try:
            size = len(source) if isinstance(source, bytes) else source.stat().st_size
        except OSError as exc:
            return IntakeResult(Outcome.REJECTED, "dicom", f"cannot be read: {exc.strerror}")
        if size > limit:
            LOGGER.warning("refused a DICOM object of %d bytes from %s: more than "
                           "ingest.max_dicom_bytes (%d)", size, origin.split(":")[0], limit)
            return self.refuse("dicom", origin, "-", f"DICOM object is {size} bytes, more "
                                 f"than ingest.max_dicom_bytes ({limit})")
        if isinstance(source, bytes):
            sha = hashlib.sha256(source).hexdigest()
        else:
            try:
                sha, size = sha256_file(source)
            except OSError as exc:
                return IntakeResult(Outcome.REJECTED, "dicom", f"cannot be read: {exc.strerror}")
        if self._known("instances", sha):
            return IntakeResult(Outcome.DUPLICATE, "dicom", "identical object already stored")
        try:
            meta = read_meta(source)
        except DicomError as exc:
            return self.refuse("dicom", origin, content_digest(sha), f"DICOM object {exc}")
        except OSError as exc:
            return IntakeResult(Outcome.REJECTED, "dicom", f"cannot be read: {exc.strerror}")
        patient = patient_key(meta.patient_id, meta.issuer_of_patient_id, self.config.identity)
        who = who_received(origin)
        uid = meta.sop_instance_uid
        placed: set[str] = set()  # the areas holding the bytes: "objects", "refused"

        def place(area: str) -> None:
            """Copy the bytes into the object store or the refused area, once."""
            if area in placed:
                return
            objects = self.store.objects if area == "objects" else self._refused_objects()
            if isinstance(source, bytes):
                objects.put_bytes(source)
            else:
                objects.put_file(source, expected_sha256=sha)
            placed.add(area)

        keep_limit = self.config.ingest.refused_keep_bytes
        try:
            if not accepted and self._foreign_sources(self.store.conn, uid, origin):
                if size <= keep_limit:
                    place("refused")
            else:
                place("objects")
        except ValueError as exc:
            return IntakeResult(Outcome.REJECTED, "dicom", str(exc))

        def rows(conn: sqlite3.Connection) -> IntakeResult:
            if self._known("instances", sha, conn):
                return IntakeResult(Outcome.DUPLICATE, "dicom", "identical object already stored")
            foreign = [] if accepted else self._foreign_sources(conn, uid, origin)
            if foreign:
                return refuse_replacement(conn, foreign)
            place("objects")  # when the stored one's source changed since the first look
            earlier = [r[0] for r in conn.execute(
                "SELECT id FROM instances WHERE sop_instance_uid = ? AND superseded_by IS NULL",
                (uid,))]
            instance_id = self.store.insert(conn, "instances", {
                "sop_instance_uid": meta.sop_instance_uid,
                "sop_class_uid": meta.sop_class_uid,
                "study_instance_uid": meta.study_instance_uid,
                "series_instance_uid": meta.series_instance_uid,
                "modality": meta.modality,
                "patient_id": meta.patient_id,
                "issuer_of_patient_id": meta.issuer_of_patient_id,
                "accession_number": meta.accession_number,
                "study_date": meta.study_date,
                "transfer_syntax_uid": meta.transfer_syntax_uid,
                "sha256": sha,
                "size_bytes": size,
                "source": origin,
                "received_at": self.store.stamp(),
            })
            for old in earlier:
                conn.execute("UPDATE instances SET superseded_by = ? WHERE id = ?",
                             (instance_id, old))
            for roi in meta.rois:
                self.store.insert(conn, "rois", {
                    "instance_id": instance_id,
                    "kind": roi.kind,
                    "label": roi.label,
                    "graphic_type": roi.graphic_type,
                    "coordinate_space": roi.coordinate_space,
                    "shape_count": roi.shape_count,
                    "shapes": roi.shapes_json(),
                    "referenced_sop_instance_uid": roi.referenced_sop_instance_uid,
                    "referenced_series_instance_uid": roi.referenced_series_instance_uid,
                })
            note = "replaces an earlier object with the same SOP Instance UID" if earlier else None
            audit.record(conn, at=self.store.stamp(), event=audit.RECEIVED, who=who, what=uid,
                         patient_key=patient,
                         detail=f"instance {instance_id}, {meta.modality or '?'}, {size} bytes"
                                + (f", replaces instance {', '.join(map(str, earlier))}"
                                   if earlier else "")
                                + (f", accepted by the operator from {accepted}"
                                   if accepted else ""))
            fault_point("intake.dicom.before_commit")
            return IntakeResult(Outcome.NEW, "dicom", note, row_id=instance_id)

        dropped: list[str] = []

        def refuse_replacement(conn: sqlite3.Connection, foreign: list[int]) -> IntakeResult:
            from mrrp_pacs.intake import refused

            dropped.clear()
            # the C-STORE answer's Error Comment (64 characters at most)
            reason = "SOP Instance UID stored from another source; not replaced"
            kept = None
            if size <= keep_limit:
                place("refused")  # when the stored one's source changed since the first look
                kept, gone = refused.keep_row(
                    conn, self.store, kind="dicom", listener=origin.partition(":")[0],
                    peer=_peer(origin), reason=reason, sha256=sha, size_bytes=size,
                    kept_bytes=size, keep_bytes=keep_limit)
                dropped.extend(gone)
            audit.record(conn, at=self.store.stamp(), event=audit.REFUSED, who=who, what=uid,
                         patient_key=patient,
                         detail=f"replacement of instance {', '.join(map(str, foreign))} from "
                                "another source; " + (f"kept as refused input {kept}" if kept
                                                      else "not kept (over refused_keep_bytes)"))
            fault_point("intake.dicom.before_commit")
            return IntakeResult(Outcome.REJECTED, "dicom", reason, row_id=kept)

        try:
            result = self._write(rows)
        except ValueError as exc:  # the bytes did not match their digest while copied
            return IntakeResult(Outcome.REJECTED, "dicom", str(exc))
        if dropped:
            from mrrp_pacs.intake import refused

            refused.forget(self.store, dropped)
        if result.outcome is Outcome.REJECTED:
            LOGGER.warning("refused a DICOM object from %s replacing an instance stored from "
                           "another source%s", origin.partition(":")[0],
                           f" (kept as refused input {result.row_id})"
                           if result.row_id is not None else "")
            return result
        if result.outcome is not Outcome.NEW:
            return result
        fault_point("intake.dicom.committed")
        LOGGER.debug("stored DICOM instance row %s (%s, %d bytes)%s", result.row_id,
                     meta.modality or "?", size,
                     " replacing an earlier version" if result.reason else "")
        return result

    def _refused_objects(self) -> ObjectStore:
        from mrrp_pacs.intake import refused

        return refused.refused_objects(self.store)

    def _foreign_sources(self, conn: sqlite3.Connection, uid: str, origin: str) -> list[int]:
        """Current instances with SOP Instance UID ``uid`` stored from a source other than
        ``origin`` (see :func:`same_source`): their row ids; none when ``origin`` is the
        PACS we pull from (:meth:`_from_archive`)."""
        if self._from_archive(origin):
            return []
        return [row_id for row_id, stored in conn.execute(
            "SELECT id, source FROM instances WHERE sop_instance_uid = ? AND "
            "superseded_by IS NULL", (uid,)) if not same_source(stored, origin)]

    def _from_archive(self, origin: str) -> bool:
        """Whether ``origin`` is the configured PACS (``[pacs] ae_title``, from ``[pacs] host``
        when the address is known): the archive of record may replace any object, e.g. with
        its transcoded copy of an image a modality sent us directly."""
        pacs = self.config.pacs
        kind, _, rest = origin.partition(":")
        if kind != "dicom" or not pacs.host:
            return False
        title, _, address = rest.rpartition("@") if "@" in rest else (rest, "", "")
        return title == pacs.ae_title and (not address or address == pacs.host)

    def refuse(self, kind: str, origin: str, what: str, reason: str,
                 control_id: str | None = None) -> IntakeResult:
        """A rejection for content, with its ``refused`` audit row (its own transaction).

        Raises
        ------
        sqlite3.Error
            The audit row could not be written: the caller answers "try again", as for any
            input not recorded.
        """
        def rows(conn: sqlite3.Connection) -> None:
            audit.record(conn, at=self.store.stamp(), event=audit.REFUSED,
                         who=who_received(origin), what=what, detail=f"{kind} refused")

        self._write(rows)
        return IntakeResult(Outcome.REJECTED, kind, reason, control_id=control_id)

    # -- HL7 -----------------------------------------------------------------------------

    def receive_hl7(self, raw: bytes, origin: str) -> IntakeResult:
        """Persist one HL7 v2 message (MLLP framing already removed or not)."""
        limit = self.config.ingest.max_hl7_bytes
        if len(raw) > limit:
            return self.refuse("hl7", origin, "-",
                                 f"message is {len(raw)} bytes, more than ingest.max_hl7_bytes "
                                 f"({limit})")
        try:
            message = parse_message(raw)
            content = read_result(message, self.config.ingest, self.config.identity, self.schema)
        except Hl7Error as exc:
            return self.refuse("hl7", origin,
                                 content_digest(hashlib.sha256(raw).hexdigest()),
                                 f"HL7 message {exc}")
        used = content.message_type.startswith("ORU")
        what = control_digest(content.control_id)
        if used and not content.patient_id:
            # a result nobody can be matched to would be stored and never used
            return self.refuse("hl7", origin, what,
                                 "ORU message names no patient: PID-3 is empty or has no "
                                 "identifier of the configured assigning authority",
                                 control_id=content.control_id)
        patient = patient_key(content.patient_id, content.assigning_authority,
                              self.config.identity)

        def received(conn: sqlite3.Connection, message_id: int, note: str) -> None:
            audit.record(conn, at=self.store.stamp(), event=audit.RECEIVED,
                         who=who_received(origin), what=what, patient_key=patient,
                         detail=f"message {message_id}, {content.message_type}, {note}")
        sha = hashlib.sha256(message.raw).hexdigest()
        if self._known("hl7_messages", sha):
            return IntakeResult(Outcome.DUPLICATE, "hl7", "identical message already stored",
                                control_id=content.control_id)
        self.store.objects.put_bytes(message.raw)
        parsed: list[bool] = []  # the rows of a used message were written (not ignored)

        def rows(conn: sqlite3.Connection) -> IntakeResult:
            parsed.clear()
            if self._known("hl7_messages", sha, conn):
                return IntakeResult(Outcome.DUPLICATE, "hl7", "identical message already stored",
                                    control_id=content.control_id)
            row = {
                "control_id": content.control_id,
                "sending_application": content.sending_application,
                "sending_facility": content.sending_facility,
                "message_type": content.message_type,
                "message_datetime": content.message_datetime,
                "version": content.version,
                "processing_id": content.processing_id,
                "charset": message.charset,
                "patient_id": content.patient_id or None,
                "assigning_authority": content.assigning_authority or None,
                "sha256": sha,
                "size_bytes": len(message.raw),
                "source": origin,
                "received_at": self.store.stamp(),
            }
            earlier = conn.execute(
                "SELECT id FROM hl7_messages WHERE sending_application = ? AND "
                "sending_facility = ? AND control_id = ? AND state = 'parsed'",
                (content.sending_application, content.sending_facility, content.control_id),
            ).fetchone()
            if earlier is not None:
                reason = (f"control id {content.control_id!r} from "
                          f"{content.sending_application or '?'} was already received "
                          f"(message row {earlier[0]}); kept, not processed again")
                message_id = self.store.insert(conn, "hl7_messages", {
                    **row, "state": "duplicate_control_id", "note": reason})
                received(conn, message_id, "control id already received, not processed")
                return IntakeResult(Outcome.DUPLICATE, "hl7", reason, row_id=message_id,
                                    control_id=content.control_id)
            if not used:
                # acknowledged (the sender's interface need not filter) and kept, not read
                message_id = self.store.insert(conn, "hl7_messages", {
                    **row, "state": "ignored",
                    "note": f"message type {content.message_type} is not used"})
                received(conn, message_id, "not used")
                return IntakeResult(Outcome.NEW, "hl7", row_id=message_id,
                                    control_id=content.control_id)
            message_id = self.store.insert(conn, "hl7_messages", {**row, "state": "parsed"})
            self._write_result(conn, message_id, content)
            received(conn, message_id, "parsed")
            parsed.append(True)
            fault_point("intake.hl7.before_commit")
            return IntakeResult(Outcome.NEW, "hl7", row_id=message_id,
                                control_id=content.control_id)

        result = self._write(rows)
        if not parsed or result.outcome is not Outcome.NEW:
            return result
        fault_point("intake.hl7.committed")
        LOGGER.debug("stored HL7 %s message row %d (%d observations)", content.message_type,
                     result.row_id, sum(len(o.observations) for o in content.orders))
        return result

    def _write_result(self, conn: sqlite3.Connection, message_id: int,
                      content: ResultContent) -> None:
        patient = {"patient_id": content.patient_id or None,
                   "assigning_authority": content.assigning_authority or None}
        observation_ids: dict[int, int] = {}
        for order in content.orders:
            for obx in order.observations:
                observation_ids[id(obx)] = self.store.insert(conn, "observations", {
                    "message_id": message_id, **vars(obx)})
        for order, kind, text in content.reports(self.config.ingest):
            report_id = self.store.insert(conn, "reports", {
                "message_id": message_id, **patient,
                "accession_number": order.accession_number or None,
                "kind": kind,
                "service_code": order.service_code,
                "service_text": order.service_text,
                "section": order.section,
                "status": order.status,
                "observed_at": order.observed_at,
                "text": text,
            })
            if order.accession_number and content.patient_id:
                self._supersede(conn, "reports", report_id, order.observed_at,
                                "accession_number = ? AND kind = ? AND patient_id = ? AND "
                                "assigning_authority IS ?",
                                (order.accession_number, kind, content.patient_id,
                                 content.assigning_authority or None))
        for value in content.clinical_values:
            value_id = self.store.insert(conn, "clinical_values", {
                "message_id": message_id,
                "observation_id": (observation_ids.get(id(value.observation))
                                   if value.observation else None),
                **patient,
                "variable": value.variable,
                "value_text": value.value_text,
                "value_num": value.value_num,
                "unit": value.unit,
                "status": value.status,
                "observed_at": value.observed_at,
                "source": value.source,
            })
            # a preliminary value never displaces a final one (cases read final values only)
            if content.patient_id and value.status in FINAL_STATUSES:
                self._supersede(conn, "clinical_values", value_id, value.observed_at,
                                "patient_id = ? AND assigning_authority IS ? AND variable = ?",
                                (content.patient_id, content.assigning_authority or None,
                                 value.variable))

    @staticmethod
    def _supersede(conn: sqlite3.Connection, table: str, new_id: int, observed_at: str,
                   where: str, params: tuple[object, ...]) -> None:
        """Mark the older of the new row and each current one as superseded by the newer.

        Observation times are HL7 timestamps (YYYYMMDD[HHMM[SS]]), which order as strings;
        at equal times the row received later wins.
        """
        current = conn.execute(
            f"SELECT id, observed_at FROM {table} WHERE {where} AND superseded_by IS NULL "
            "AND id != ?", (*params, new_id)).fetchall()
        for row_id, old_at in current:
            if (old_at or "") <= (observed_at or ""):
                conn.execute(f"UPDATE {table} SET superseded_by = ? WHERE id = ?",
                             (new_id, row_id))
            else:
                conn.execute(f"UPDATE {table} SET superseded_by = ? WHERE id = ?",
                             (row_id, new_id))

    def _known(self, table: str, sha: str, conn: sqlite3.Connection | None = None) -> bool:
        return (conn or self.store.conn).execute(
            f"SELECT 1 FROM {table} WHERE sha256 = ?", (sha,)).fetchone() is not None
