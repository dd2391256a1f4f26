"""Cases: which patient has what, and whether the case can be scored.

A case is one patient key (see :mod:`mrrp_pacs.identity`). Only current rows count: objects
replaced by a later version, and superseded reports and values, are ignored.

Readiness: final clinical values (OBX-11 F or C) and at least one imaging modality (a slide
or an ultrasound image). A missing modality is compensated by the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mrrp_pacs.config import Config
from mrrp_pacs.identity import patient_key
from mrrp_pacs.intake.dicom import (
    MICROSCOPY_BULK_ANNOTATIONS,
    SR_CLASSES,
    US_CLASSES,
    VL_WHOLE_SLIDE_MICROSCOPY,
)
from mrrp_pacs.store import Store

MODALITIES = ("wsi", "wsi_roi", "us_image", "us_roi", "us_report", "clinical")
FINAL_STATUSES = ("F", "C")


@dataclass
class Case:
    patient_key: str
    patient_id: str
    issuer: str
    modalities: list[str] = field(default_factory=list)
    clinical_variables: list[str] = field(default_factory=list)
    ready: bool = False
    missing: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Evidence:
    patient_id: str
    issuer: str
    flags: set[str] = field(default_factory=set)
    us_images: set[str] = field(default_factory=set)
    us_accessions: set[str] = field(default_factory=set)
    roi_targets: set[str] = field(default_factory=set)
    report_accessions: set[str] = field(default_factory=set)
    variables: set[str] = field(default_factory=set)


def list_cases(store: Store, config: Config) -> list[Case]:
    """Every patient with anything stored, sorted by key."""
    identity = config.identity
    evidence: dict[str, _Evidence] = {}

    def of(pid: str | None, issuer: str | None) -> _Evidence | None:
        key = patient_key(pid, issuer, identity)
        if key is None:
            return None
        return evidence.setdefault(key, _Evidence(pid or "", issuer or identity.default_issuer))

    conn = store.conn
    for row in conn.execute(
        "SELECT patient_id, issuer_of_patient_id, sop_class_uid, sop_instance_uid, "
        "accession_number FROM instances WHERE superseded_by IS NULL"
    ):
        case = of(row[0], row[1])
        if case is None:
            continue
        if row[2] == VL_WHOLE_SLIDE_MICROSCOPY:
            case.flags.add("wsi")
        elif row[2] == MICROSCOPY_BULK_ANNOTATIONS:
            case.flags.add("wsi_roi")
        elif row[2] in US_CLASSES:
            case.flags.add("us_image")
            case.us_images.add(row[3])
            if row[4]:
                case.us_accessions.add(row[4])
    for row in conn.execute(
        "SELECT i.patient_id, i.issuer_of_patient_id, r.referenced_sop_instance_uid "
        "FROM rois r JOIN instances i ON i.id = r.instance_id "
        f"WHERE i.superseded_by IS NULL AND i.sop_class_uid IN ({_marks(SR_CLASSES)}) "
        "AND r.referenced_sop_instance_uid IS NOT NULL", tuple(SR_CLASSES)
    ):
        case = of(row[0], row[1])
        if case is not None:
            case.roi_targets.add(row[2])
    for row in conn.execute(
        "SELECT patient_id, assigning_authority, kind, accession_number FROM reports "
        "WHERE superseded_by IS NULL"
    ):
        case = of(row[0], row[1])
        if case is None:
            continue
        if row[2] == "ultrasound":
            case.flags.add("us_report")
        if row[3]:
            case.report_accessions.add(row[3])
    for row in conn.execute(
        "SELECT patient_id, assigning_authority, variable FROM clinical_values "
        f"WHERE superseded_by IS NULL AND status IN ({_marks(FINAL_STATUSES)})", FINAL_STATUSES
    ):
        case = of(row[0], row[1])
        if case is not None:
            case.variables.add(row[2])

    cases = []
    for key in sorted(evidence):
        ev = evidence[key]
        if ev.roi_targets & ev.us_images:
            ev.flags.add("us_roi")
        if ev.report_accessions & ev.us_accessions:
            ev.flags.add("us_report")  # an ORU linked to the US study by accession number
        if ev.variables:
            ev.flags.add("clinical")
        modalities = [m for m in MODALITIES if m in ev.flags]
        ready = "clinical" in ev.flags and bool({"wsi", "us_image"} & ev.flags)
        cases.append(Case(
            patient_key=key,
            patient_id=ev.patient_id,
            issuer=ev.issuer,
            modalities=modalities,
            clinical_variables=sorted(ev.variables),
            ready=ready,
            missing=[m for m in MODALITIES if m not in ev.flags],
        ))
    return cases


def _marks(values: tuple[str, ...] | set[str]) -> str:
    return ", ".join("?" for _ in values)
