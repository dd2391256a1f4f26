"""DICOM objects of the phantom: US image, its lesion ROI (TID 1500 SR), the slide's tumour
region (Microscopy Bulk Simple Annotations).

Everything is deterministic: UIDs come from :func:`phantom_uid` (a hash of the phantom seed
and a name), and the dates and times highdicom would take from the clock are set to the
study's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from mrrp_pacs import __version__

ULTRASOUND_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
ULTRASOUND_MULTIFRAME_IMAGE = "1.2.840.10008.5.1.4.1.1.3.1"
FRAME_TIME_TAG = 0x00181063
MANUFACTURER = "mrrp-pacs phantom hospital"
BREAST = hd.sr.CodedConcept("76752008", "SCT", "Breast")
US_BREAST_PROCEDURE = hd.sr.CodedConcept("24627-2", "LN", "US Breast")


def phantom_uid(*parts: object) -> UID:
    """A UID derived from ``parts`` (same parts, same UID), under pydicom's UID root."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


@dataclass(frozen=True)
class Demographics:
    """What every object of one patient shares."""

    patient_id: str
    issuer: str
    patient_name: str
    birth_date: str  # YYYYMMDD
    sex: str


@dataclass(frozen=True)
class StudyInfo:
    study_instance_uid: str
    accession_number: str
    study_id: str
    date: str  # YYYYMMDD
    time: str  # HHMMSS
    description: str


@dataclass(frozen=True)
class Equipment:
    """The device and place that acquired an image (General Equipment module)."""

    manufacturer: str = MANUFACTURER
    model: str = "synthetic linear probe"
    station_name: str = ""
    institution_name: str = ""


DatasetT = TypeVar("DatasetT", bound=Dataset)


def _fix_clock(ds: DatasetT, date: str, time: str) -> DatasetT:
    """Replace the timestamps highdicom takes from the clock (for byte-identical output)."""
    for keyword in ("InstanceCreationDate", "ContentDate", "SeriesDate"):
        if keyword in ds:
            setattr(ds, keyword, date)
    for keyword in ("InstanceCreationTime", "ContentTime", "SeriesTime"):
        if keyword in ds:
            setattr(ds, keyword, time)
    for equipment in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = date + time
    return ds


def ultrasound_image(pixels: np.ndarray, pixel_mm: float, who: Demographics, study: StudyInfo,
                     laterality: str, uid_seed: str, equipment: Equipment | None = None,
                     series_description: str = "Breast ultrasound",
                     frame_rate_hz: float = 20.0) -> Dataset:
    """Ultrasound Image Storage, 8-bit MONOCHROME2, calibrated by its ultrasound region.

    ``pixels`` is (rows, columns), or (frames, rows, columns) for a cine loop, written as an
    Ultrasound Multi-frame Image (Cine and Multi-frame modules, frames ``1000 /
    frame_rate_hz`` ms apart). ``pixel_mm`` is the machine's pixel spacing (square pixels),
    written as PhysicalDeltaX/Y of the one Sequence of Ultrasound Regions item. ``equipment``
    defaults to the phantom's own.
    """
    equipment = equipment if equipment is not None else Equipment()
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    rows, columns = pixels.shape[-2:]
    sop_class = ULTRASOUND_MULTIFRAME_IMAGE if pixels.ndim == 3 else ULTRASOUND_IMAGE
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = phantom_uid(uid_seed, "us-image")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = study.date, study.time
    _patient_and_study(ds, who, study)
    ds.Modality = "US"
    ds.SeriesInstanceUID = phantom_uid(uid_seed, "us-series")
    ds.SeriesNumber = 1
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = "BREAST"
    ds.Manufacturer = equipment.manufacturer
    ds.ManufacturerModelName = equipment.model
    if equipment.institution_name:
        ds.InstitutionName = equipment.institution_name
    if equipment.station_name:
        ds.StationName = equipment.station_name
    ds.SoftwareVersions = __version__
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = study.date, study.time
    ds.AcquisitionDateTime = study.date + study.time
    ds.PatientOrientation = ["L" if laterality == "R" else "R", "P"]
    ds.ImageLaterality = laterality
    # value 3: the body region; value 4 "0001": 2D imaging (PS3.3 C.8.5.6.1.1)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "BREAST", "0001"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    if pixels.ndim == 3:
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = FRAME_TIME_TAG
        ds.FrameTime = f"{1000.0 / frame_rate_hz:.6g}"
        ds.RecommendedDisplayFrameRate = round(frame_rate_hz)
        ds.CineRate = round(frame_rate_hz)
    region = Dataset()
    region.RegionSpatialFormat = 1    # 2D tissue
    region.RegionDataType = 1         # tissue
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = columns - 1, rows - 1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = pixel_mm / 10.0
    region.ReferencePixelX0, region.ReferencePixelY0 = 0, 0
    region.ReferencePixelPhysicalValueX = region.ReferencePixelPhysicalValueY = 0.0
    ds.SequenceOfUltrasoundRegions = [region]
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    return ds


def _patient_and_study(ds: Dataset, who: Demographics, study: StudyInfo) -> None:
    ds.PatientName = who.patient_name
    ds.PatientID = who.patient_id
    ds.IssuerOfPatientID = who.issuer
    ds.PatientBirthDate = who.birth_date
    ds.PatientSex = who.sex
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate, ds.StudyTime = study.date, study.time
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.StudyDescription = study.description
    ds.ReferringPhysicianName = ""


def lesion_roi_report(image: Dataset, box_px: tuple[int, int, int, int], uid_seed: str,
                      outline_px: np.ndarray | None = None) -> hd.sr.ComprehensiveSR:
    """TID 1500 Measurement Report with the lesion as a TID 1410 planar ROI.

    With ``outline_px`` ((n, 2) (column, row) pixel indices, as the renderer fills them) the
    sonographer's tracing of the outline is written: a closed POLYLINE of at most 120 vertices.
    Without it, the lesion box (inclusive pixel indices) as a closed POLYLINE. Both are moved to
    the SCOORD pixel space, where (0, 0) is the top left corner of the image (pixel centres at
    +0.5). The ROI references the image; on a cine loop it is drawn on the middle frame
    (``NumberOfFrames // 2 + 1``, 1-based).
    """
    frames = int(image.get("NumberOfFrames", 1) or 1)
    if outline_px is not None:
        step = max(1, -(-len(outline_px) // 120))
        traced = np.asarray(outline_px, dtype=float)[::step] + 0.5
        rows, columns = int(image.Rows), int(image.Columns)
        traced = np.clip(traced, 0.0, [columns, rows])
        graphic = np.concatenate([traced, traced[:1]])
    else:
        x0, y0, x1, y1 = (float(v) for v in box_px)
        x1, y1 = x1 + 1, y1 + 1  # the far edge of the last pixel
        graphic = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=graphic,
        source_image=hd.sr.SourceImageForRegion.from_source_image(
            image, referenced_frame_numbers=[frames // 2 + 1] if frames > 1 else None),
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=phantom_uid(uid_seed, "lesion-tracking"), identifier="Lesion 1"),
        referenced_region=region,
        finding_type=codes.SCT.Mass,
        finding_sites=[hd.sr.FindingSite(BREAST)],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Person,
                observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                    name="PHANTOM^SONOGRAPHER"),
            )),
        procedure_reported=US_BREAST_PROCEDURE,
        imaging_measurements=[group],
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[image], content=report,
        series_instance_uid=phantom_uid(uid_seed, "us-roi-series"), series_number=2,
        sop_instance_uid=phantom_uid(uid_seed, "us-roi"), instance_number=1,
        manufacturer=MANUFACTURER, series_description="Lesion ROI",
        content_date=image.StudyDate, content_time=image.StudyTime,
    )
    return _fix_clock(sr, image.StudyDate, image.StudyTime)


# Specimen attributes highdicom copies from the source slide that the Microscopy Bulk Simple
# Annotations IOD does not define (dciodvfy warns on each of them).
_NOT_IN_ANNOTATION_IOD = ("ContainerIdentifier", "IssuerOfTheContainerIdentifierSequence",
                          "ContainerTypeCodeSequence", "SpecimenDescriptionSequence")


def tumour_region_annotation(slide: Dataset, outline_px: np.ndarray, laterality: str,
                             uid_seed: str) -> hd.ann.MicroscopyBulkSimpleAnnotations:
    """Microscopy Bulk Simple Annotations: the tumour region as one polygon.

    ``outline_px``: (n, 2) open outline as (column, row) in the level-0 total pixel matrix.
    Stored in slide coordinates (SCOORD3D, mm in the slide's frame of reference): with 2D
    image coordinates, highdicom 0.28.2's object draws a dciodvfy error on
    CommonZCoordinateValue.
    """
    to_slide = hd.spatial.ImageToReferenceTransformer.for_image(
        slide, for_total_pixel_matrix=True)
    outline_mm = to_slide(np.asarray(outline_px, dtype=np.float64))
    group = hd.ann.AnnotationGroup(
        number=1,
        uid=phantom_uid(uid_seed, "tumour-group"),
        label="Tumour region",
        annotated_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        annotated_property_type=codes.SCT.Neoplasm,
        graphic_type=hd.ann.GraphicTypeValues.POLYGON,
        graphic_data=[outline_mm],
        algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.MANUAL,
    )
    annotation = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[slide],
        annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD3D,
        annotation_groups=[group],
        series_instance_uid=phantom_uid(uid_seed, "ann-series"),
        series_number=20,
        sop_instance_uid=phantom_uid(uid_seed, "ann"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="phantom",
        software_versions=__version__,
        device_serial_number="0",
        series_description="Tumour region",
        content_date=slide.StudyDate, content_time=slide.StudyTime,
    )
    for keyword in _NOT_IN_ANNOTATION_IOD:
        if keyword in annotation:
            delattr(annotation, keyword)
    annotation.Laterality = laterality  # the breast is a paired body part (General Series 2C)
    return _fix_clock(annotation, slide.StudyDate, slide.StudyTime)
