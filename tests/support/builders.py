"""Small, real DICOM objects and HL7 messages for tests (built with pydicom and highdicom)."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
VL_WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"


@dataclass
class Patient:
    patient_id: str = "MRN001"
    issuer: str = "HOSP"
    name: str = "Doe^Jane"
    birth_date: str = "19790314"
    us_study_uid: str = field(default_factory=generate_uid)
    us_accession: str = ""
    path_study_uid: str = field(default_factory=generate_uid)
    path_accession: str = ""

    def __post_init__(self) -> None:
        self.us_accession = self.us_accession or f"US-{self.patient_id}"
        self.path_accession = self.path_accession or f"PA-{self.patient_id}"


def _base(patient: Patient, sop_class: str, modality: str, study_uid: str,
          accession: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.issuer
    ds.PatientName = patient.name
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDate = "20260105"
    ds.StudyTime = "101500"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    ds.Manufacturer = "test"
    ds.ReferringPhysicianName = ""
    return ds


def us_image(patient: Patient, rows: int = 64, columns: int = 80) -> Dataset:
    ds = _base(patient, US_IMAGE, "US", patient.us_study_uid, patient.us_accession)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionDataType = 1
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = columns - 1, rows - 1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3  # cm
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.01
    ds.SequenceOfUltrasoundRegions = [region]
    ds.PixelData = (np.arange(rows * columns) % 251).astype(np.uint8).tobytes()
    return ds


def wsi_image(patient: Patient, size: int = 32) -> Dataset:
    ds = _base(patient, VL_WSI, "SM", patient.path_study_uid, patient.path_accession)
    ds.FrameOfReferenceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
    ds.Rows = ds.Columns = size
    ds.TotalPixelMatrixRows = ds.TotalPixelMatrixColumns = size
    ds.NumberOfFrames = 1
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.full((size, size, 3), 200, np.uint8).tobytes()
    return ds


def us_roi_sr(patient: Patient, image: Dataset, box: tuple[float, float, float, float]
              ) -> Dataset:
    """A TID 1500 Comprehensive SR with the lesion box as a closed POLYLINE on ``image``."""
    x0, y0, x1, y1 = box
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]),
        source_image=hd.sr.SourceImageForRegion.from_source_image(image),
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="lesion 1"),
        referenced_region=region,
        finding_type=codes.SCT.Mass,
    )
    return measurement_report_sr(image, [group])


def measurement_report_sr(image: Dataset,
                          groups: list[hd.sr.MeasurementsAndQualitativeEvaluations]) -> Dataset:
    """A TID 1500 Comprehensive SR on ``image`` holding ``groups`` (TID 1410/1501 groups)."""
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Person,
                observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                    name="Sonographer^Test"),
            )),
        procedure_reported=codes.LN.USBreast if hasattr(codes.LN, "USBreast") else
        hd.sr.CodedConcept("24627-2", "LN", "US Breast"),
        imaging_measurements=groups,
    )
    return hd.sr.ComprehensiveSR(
        evidence=[image], content=report, series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test",
    )


def mass_segmentation(image: Dataset, mask: np.ndarray) -> Dataset:
    """A binary DICOM SEG on ``image`` with one segment, a mass: ``mask`` (frames, rows, cols)."""
    return hd.seg.Segmentation(
        source_images=[image], pixel_array=np.asarray(mask, np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="mass",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Mass,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)],
        series_instance_uid=generate_uid(), series_number=4, sop_instance_uid=generate_uid(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="1", device_serial_number="1")


def tumour_annotation(patient: Patient, slide: Dataset,
                      polygon: list[tuple[float, float]]) -> Dataset:
    """Microscopy Bulk Simple Annotations with one tumour polygon in slide pixel space."""
    group = hd.ann.AnnotationGroup(
        number=1,
        uid=generate_uid(),
        label="tumour region",
        annotated_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        annotated_property_type=codes.SCT.Neoplasm,
        graphic_type=hd.ann.GraphicTypeValues.POLYGON,
        graphic_data=[np.array(polygon, dtype=float)],
        algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.MANUAL,
    )
    return hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[slide],
        annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=[group],
        series_instance_uid=generate_uid(),
        series_number=3,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(ds))
    return path


# -- HL7 -------------------------------------------------------------------------------------

def _msh(control_id: str, charset: str = "UNICODE UTF-8", sender: str = "RIS") -> str:
    return (f"MSH|^~\\&|{sender}|HOSP|MRRP|HOSP|20260106120000||ORU^R01^ORU_R01|{control_id}|P|"
            f"2.5||||||{charset}")


def _pid(patient: Patient) -> str:
    return (f"PID|1||{patient.patient_id}^^^{patient.issuer}^MR~99887^^^NATIONAL^NI||"
            f"{patient.name}||{patient.birth_date}|F")


def us_report(patient: Patient, control_id: str = "US-0001",
              text: tuple[str, ...] = (
                  "Right breast 10 o'clock: irregular hypoechoic mass, 18 mm.",
                  "Margin: spiculated. Orientation: not parallel. Posterior shadowing.",
                  "Assessment: BI-RADS 4C.",
              ), end: str = "\r", extra: tuple[str, ...] = ()) -> bytes:
    segments = [
        _msh(control_id), _pid(patient),
        f"OBR|1|ORD-{control_id}|{patient.us_accession}|US-BREAST^US breast^L|||20260105101500"
        "|||||||||||||||||US|F",
        *extra,
        *[f"OBX|{i}|TX|US-REPORT^Breast ultrasound report^L||{line}||||||F"
          for i, line in enumerate(text, start=1)],
    ]
    return (end.join(segments) + end).encode("utf-8")


PATHOLOGY_VALUES: list[tuple[str, str, str, str]] = [
    # (value type, code^text^system, value, unit)
    ("NM", "21889-1^Size Tumor^LN", "18", "mm"),
    ("NM", "21893-3^Regional lymph nodes positive^LN", "2", "{count}"),
    ("CWE", "MRRP-GRADE^Histological grade^L", "2^Grade 2^L", ""),
    ("NM", "MRRP-ER-PCT^ER positive cells^L", "90", "%"),
    ("NM", "MRRP-PR-PCT^PR positive cells^L", "60", "%"),
    ("CWE", "MRRP-HER2-IHC^HER2 IHC score^L", "1+^HER2 1+^L", ""),
    ("NM", "85330-9^Ki-67^LN", "15", "%"),
    ("CWE", "MRRP-SUBTYPE^Molecular subtype^L", "luminal_a^Luminal A^L", ""),
]


def pathology_result(patient: Patient, control_id: str = "PA-0001", status: str = "F",
                     values: list[tuple[str, str, str, str]] | None = None,
                     observed: str = "20260110", end: str = "\r") -> bytes:
    values = PATHOLOGY_VALUES if values is None else values
    segments = [
        _msh(control_id, sender="LIS"), _pid(patient),
        f"OBR|1|ORD-{control_id}|{patient.path_accession}|PATH-BREAST^Breast pathology^L|||"
        f"{observed}|||||||||||||||||SP|{status}",
        *[f"OBX|{i}|{vt}|{code}||{value}|{unit}|||||{status}"
          for i, (vt, code, value, unit) in enumerate(values, start=1)],
    ]
    return (end.join(segments) + end).encode("utf-8")


def mllp(message: bytes) -> bytes:
    return b"\x0b" + message + b"\x1c\r"


def with_ack_modes(message: bytes, accept: str, application: str) -> bytes:
    """Set MSH-15/MSH-16 (accept / application acknowledgement type) of a message built here
    (which leaves both empty)."""
    assert b"|2.5||||||" in message
    return message.replace(b"|2.5||||||", f"|2.5|||{accept}|{application}||".encode())
