"""Cases: which patient has what, and whether the case can be scored.

A case is one patient key (see :mod:`mrrp_pacs.identity`). Only current rows count: objects
replaced by a later version, and superseded reports and values, are ignored.

Readiness: final clinical values (OBX-11 F or C) and at least one imaging modality (a slide
or an ultrasound image). A missing modality is compensated by the model. When a case is
scored (ready / waiting for its second modality / incomplete) is decided by
:func:`mrrp_pacs.scoring.readiness`, which :func:`list_cases` is handed as ``judge``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from mrrp_pacs.config import Config
from mrrp_pacs.identity import patient_key
from mrrp_pacs.intake.dicom import (
    LESION_ROI_CLASSES,
    MICROSCOPY_BULK_ANNOTATIONS,
    US_CLASSES,
    VL_WHOLE_SLIDE_MICROSCOPY,
)
from mrrp_pacs.intake.records import FINAL_STATUSES
from mrrp_pacs.store import Store

MODALITIES = ("wsi", "wsi_roi", "us_image", "us_roi", "us_report", "clinical")


@dataclass(frozen=True)
class InstanceRef:
    row_id: int
    sop_instance_uid: str
    series_instance_uid: str
    sha256: str


@dataclass(frozen=True)
class ReportRef:
    row_id: int
    kind: str
    accession_number: str | None
    text: str


@dataclass(frozen=True)
class ClinicalValue:
    row_id: int
    value_text: str
    value_num: float | None
    unit: str | None


@dataclass(frozen=True)
class SidecarRef:
    row_id: int
    kind: str  # asap | geojson | voc
    sha256: str
    image_uid: str  # the SOP Instance UID (or Series UID for a slide) it annotates


@dataclass
class CaseInputs:
    """Everything stored for one patient that feature extraction may read."""

    patient_key: str
    patient_id: str
    issuer: str
    slides: dict[str, list[InstanceRef]] = field(default_factory=dict)  # by series UID
    annotations: list[InstanceRef] = field(default_factory=list)
    us_images: list[InstanceRef] = field(default_factory=list)
    us_accessions: set[str] = field(default_factory=set)
    us_rois: list[tuple[InstanceRef, str]] = field(default_factory=list)  # SR/GSPS/SEG, image UID
    slide_sidecars: list[SidecarRef] = field(default_factory=list)  # ASAP / GeoJSON
    us_sidecars: list[SidecarRef] = field(default_factory=list)  # Pascal VOC
    reports: list[ReportRef] = field(default_factory=list)
    clinical: dict[str, ClinicalValue] = field(default_factory=dict)

    @property
    def us_reports(self) -> list[ReportRef]:
        """Ultrasound reports: by section (OBR-24), or linked to a US study by accession."""
        return [r for r in self.reports if r.kind == "ultrasound"
                or (r.accession_number and r.accession_number in self.us_accessions)]

    @property
    def modalities(self) -> list[str]:
        us_uids = {i.sop_instance_uid for i in self.us_images}
        present = {
            "wsi": bool(self.slides),
            "wsi_roi": bool(self.annotations or self.slide_sidecars),
            "us_image": bool(self.us_images),
            "us_roi": any(target in us_uids for _, target in self.us_rois)
            or any(s.image_uid in us_uids for s in self.us_sidecars),
            "us_report": bool(self.us_reports),
            "clinical": bool(self.clinical),
        }
        return [m for m in MODALITIES if present[m]]

    @property
    def ready(self) -> bool:
        """Has what scoring needs, the wait for a second modality aside (see the module)."""
        return bool(self.clinical) and bool(self.slides or self.us_images)


@dataclass
class Case:
    patient_key: str
    patient_id: str
    issuer: str
    modalities: list[str] = field(default_factory=list)
    clinical_variables: list[str] = field(default_factory=list)
    ready: bool = False
    missing: list[str] = field(default_factory=list)
    readiness: str = ""  # ready | waiting | incomplete, as the judge said ("" = not judged)
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def case_inputs(store: Store, config: Config) -> dict[str, CaseInputs]:
    """Every patient with anything stored, keyed by patient key (sorted)."""
    identity = config.identity
    found: dict[str, CaseInputs] = {}

    def of(pid: str | None, issuer: str | None) -> CaseInputs | None:
        key = patient_key(pid, issuer, identity)
        if key is None:
            return None
        return found.setdefault(key, CaseInputs(key, pid or "", issuer or identity.default_issuer))

    conn = store.conn
    for row in conn.execute(
        "SELECT id, patient_id, issuer_of_patient_id, sop_class_uid, sop_instance_uid, "
        "series_instance_uid, sha256, accession_number FROM instances "
        "WHERE superseded_by IS NULL ORDER BY id"
    ):
        case = of(row[1], row[2])
        if case is None:
            continue
        ref = InstanceRef(row[0], row[4], row[5], row[6])
        if row[3] == VL_WHOLE_SLIDE_MICROSCOPY:
            case.slides.setdefault(ref.series_instance_uid, []).append(ref)
        elif row[3] == MICROSCOPY_BULK_ANNOTATIONS:
            case.annotations.append(ref)
        elif row[3] in US_CLASSES:
            case.us_images.append(ref)
            if row[7]:
                case.us_accessions.add(row[7])
    for row in conn.execute(
        "SELECT i.id, i.patient_id, i.issuer_of_patient_id, i.sop_instance_uid, "
        "i.series_instance_uid, i.sha256, r.referenced_sop_instance_uid "
        "FROM rois r JOIN instances i ON i.id = r.instance_id "
        "WHERE i.superseded_by IS NULL "
        f"AND i.sop_class_uid IN ({_marks(LESION_ROI_CLASSES)}) "
        "AND r.referenced_sop_instance_uid IS NOT NULL ORDER BY r.id",
        tuple(sorted(LESION_ROI_CLASSES))
    ):
        case = of(row[1], row[2])
        if case is not None:
            case.us_rois.append((InstanceRef(row[0], row[3], row[4], row[5]), row[6]))
    _link_sidecars(store, found)
    for row in conn.execute(
        "SELECT id, patient_id, assigning_authority, kind, accession_number, text FROM reports "
        "WHERE superseded_by IS NULL ORDER BY id"
    ):
        case = of(row[1], row[2])
        if case is not None:
            case.reports.append(ReportRef(row[0], row[3], row[4], row[5]))
    for row in conn.execute(
        "SELECT id, patient_id, assigning_authority, variable, value_text, value_num, unit "
        f"FROM clinical_values WHERE superseded_by IS NULL AND status IN "
        f"({_marks(FINAL_STATUSES)}) ORDER BY id", FINAL_STATUSES
    ):
        case = of(row[1], row[2])
        if case is not None:
            case.clinical[row[3]] = ClinicalValue(row[0], row[4], row[5], row[6])
    return {key: found[key] for key in sorted(found)}


def list_cases(store: Store, config: Config,
               judge: Callable[[CaseInputs], tuple[str, str]] | None = None) -> list[Case]:
    """Every patient with anything stored, sorted by key.

    ``judge`` gives a case's readiness state and reason (scoring's rule, so that ``cases``
    and the scoring runs use the same words); ``ready`` is then whether the state is "ready".
    """
    cases = []
    for inputs in case_inputs(store, config).values():
        modalities = inputs.modalities
        state, reason = judge(inputs) if judge is not None else ("", "")
        cases.append(Case(
            patient_key=inputs.patient_key,
            patient_id=inputs.patient_id,
            issuer=inputs.issuer,
            modalities=modalities,
            clinical_variables=sorted(inputs.clinical),
            ready=state == "ready" if judge is not None else inputs.ready,
            missing=[m for m in MODALITIES if m not in modalities],
            readiness=state,
            reason=reason,
        ))
    return cases


def _link_sidecars(store: Store, cases: dict[str, CaseInputs]) -> None:
    """Attach region sidecars to the image they annotate.

    A sidecar names its image by file name stem (a SOP Instance UID, or a Series Instance UID
    for a slide), or else by the folder it was dropped in: a VOC file by the image file name it
    gives, an ASAP/GeoJSON file by the one slide series in that folder.
    """
    sidecars = store.conn.execute(
        "SELECT id, kind, sha256, folder, stem, image_file_name FROM sidecars ORDER BY id"
    ).fetchall()
    if not sidecars:
        return
    Target = tuple[CaseInputs, str, str]  # case, modality, image UID
    by_uid: dict[str, Target] = {}
    by_row: dict[int, Target] = {}
    for case in cases.values():
        for series_uid, refs in case.slides.items():
            by_uid[series_uid] = (case, "wsi", series_uid)
            for ref in refs:
                by_uid[ref.sop_instance_uid] = by_row[ref.row_id] = (case, "wsi", series_uid)
        for ref in case.us_images:
            target = (case, "us", ref.sop_instance_uid)
            by_uid[ref.sop_instance_uid] = by_row[ref.row_id] = target
    by_file: dict[str, Target] = {}  # absolute path of the dropped file
    for row_id, source in store.conn.execute(
            "SELECT id, source FROM instances WHERE superseded_by IS NULL AND source LIKE "
            "'file:%'"):
        if row_id in by_row:
            by_file[source[len("file:"):]] = by_row[row_id]
    for row_id, kind, sha, folder, stem, image_name in sidecars:
        found = by_uid.get(stem)
        if found is None and image_name:
            found = by_file.get(f"{folder}/{image_name}")
        if found is None and kind in ("asap", "geojson"):
            slides_here = {t[2]: t for p, t in by_file.items()
                           if p.rsplit("/", 1)[0] == folder and t[1] == "wsi"}
            found = next(iter(slides_here.values())) if len(slides_here) == 1 else None
        if found is None:
            continue
        case, modality, image_uid = found
        sidecar = SidecarRef(row_id, kind, sha, image_uid)
        if modality == "wsi" and kind in ("asap", "geojson"):
            case.slide_sidecars.append(sidecar)
        elif modality == "us" and kind == "voc":
            case.us_sidecars.append(sidecar)


def _marks(values: tuple[str, ...] | set[str]) -> str:
    return ", ".join("?" for _ in values)
