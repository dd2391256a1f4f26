import struct

import highdicom as hd
import numpy as np
import pytest
from builders import (
    Patient,
    encode,
    mass_segmentation,
    tumour_annotation,
    us_image,
    us_roi_sr,
    wsi_image,
)
from pydicom.uid import generate_uid

from mrrp_pacs.errors import DicomError
from mrrp_pacs.intake.dicom import (
    COMPREHENSIVE_SR,
    MICROSCOPY_BULK_ANNOTATIONS,
    looks_like_dicom,
    read_meta,
)


def test_reads_identifiers_of_an_ultrasound_image():
    patient = Patient()
    image = us_image(patient)
    meta = read_meta(encode(image))
    assert meta.sop_instance_uid == image.SOPInstanceUID
    assert meta.study_instance_uid == patient.us_study_uid
    assert (meta.patient_id, meta.issuer_of_patient_id) == ("MRN001", "HOSP")
    assert meta.accession_number == "US-MRN001"
    assert meta.modality == "US"
    assert meta.transfer_syntax_uid == "1.2.840.10008.1.2.1"
    assert meta.rois == []


def test_reads_the_box_of_a_tid1500_sr_and_the_image_it_marks():
    patient = Patient()
    image = us_image(patient)
    meta = read_meta(encode(us_roi_sr(patient, image, (10, 12, 40, 30))))
    assert meta.sop_class_uid == COMPREHENSIVE_SR
    (roi,) = meta.rois
    assert roi.graphic_type == "POLYLINE"
    assert roi.referenced_sop_instance_uid == image.SOPInstanceUID
    assert roi.shapes == [[[10, 12], [40, 12], [40, 30], [10, 30], [10, 12]]]


def test_reads_the_polygon_of_a_bulk_annotation():
    patient = Patient()
    slide = wsi_image(patient)
    polygon = [(1.0, 1.0), (20.0, 2.0), (15.0, 25.0), (3.0, 20.0)]
    meta = read_meta(encode(tumour_annotation(patient, slide, polygon)))
    assert meta.sop_class_uid == MICROSCOPY_BULK_ANNOTATIONS
    (roi,) = meta.rois
    assert (roi.graphic_type, roi.coordinate_space, roi.label) == \
        ("POLYGON", "image_px", "tumour region")
    assert roi.shapes == [[list(p) for p in polygon]]
    assert roi.referenced_sop_instance_uid == slide.SOPInstanceUID


@pytest.mark.parametrize("keep", [0.999, 0.9, 0.5, 0.2, 0.1, 0.05])
def test_truncated_files_are_refused(keep):
    data = encode(us_image(Patient()))
    cut = data[: int(len(data) * keep)]
    with pytest.raises(DicomError, match=r"truncated|too short"):
        read_meta(cut)


def test_truncated_encapsulated_pixel_data_is_refused():
    image = us_image(Patient())
    image.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # JPEG baseline
    from pydicom.encaps import encapsulate
    image.PixelData = encapsulate([b"\xff\xd8" + b"\0" * 500 + b"\xff\xd9"])
    image["PixelData"].VR = "OB"
    data = encode(image)
    read_meta(data)  # whole: fine
    with pytest.raises(DicomError, match="truncated"):
        read_meta(data[:-100])


def test_an_element_length_past_the_end_is_refused():
    data = bytearray(encode(us_image(Patient())))
    at = data.index(b"\x08\x00\x60\x00CS")  # Modality
    data[at + 6 : at + 8] = b"\xff\xff"  # now claims 65535 bytes
    with pytest.raises(DicomError, match=r"element \(0008,0060\).*needs 65535 bytes"):
        read_meta(bytes(data))


def test_a_stray_item_tag_is_refused():
    data = bytearray(encode(us_image(Patient())))
    at = data.index(b"\x08\x00\x60\x00CS")
    data[at : at + 4] = b"\xfe\xff\x00\xe0"
    with pytest.raises(DicomError, match="misplaced item tag"):
        read_meta(bytes(data))


def test_missing_uid_is_named():
    image = us_image(Patient())
    del image.StudyInstanceUID
    with pytest.raises(DicomError, match="StudyInstanceUID"):
        read_meta(encode(image))


def test_malformed_uid_is_refused():
    image = us_image(Patient())
    image.SeriesInstanceUID = "1.2.abc"
    with pytest.raises(DicomError, match="invalid SeriesInstanceUID"):
        read_meta(encode(image))


def test_magic_detection():
    assert looks_like_dicom(encode(us_image(Patient()))[:132])
    assert not looks_like_dicom(b"\0" * 132)
    assert not looks_like_dicom(b"MSH|^~\\&|")


def test_not_part10_is_refused():
    with pytest.raises(DicomError, match="not DICOM Part 10"):
        read_meta(b"\0" * 128 + b"DICX" + struct.pack("<HH", 2, 1) + b"\0" * 20)


def test_presentation_state_graphics_in_pixels_reference_their_image():
    patient = Patient()
    image = us_image(patient)
    layer = hd.pr.GraphicLayer(layer_name="LESION", order=1)
    objects = [hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE,
                                   np.array([[10.0, 8.0], [70.0, 8.0], [40.0, 56.0]]),
                                   units="PIXEL"),
               hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE,
                                   np.array([[0.1, 0.1], [0.5, 0.5]]), units="DISPLAY")]
    state = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[image], series_instance_uid=generate_uid(), series_number=3,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1",
        content_label="LESION", graphic_layers=[layer], graphic_annotations=[
            hd.pr.GraphicAnnotation(referenced_images=[image], graphic_layer=layer,
                                    graphic_objects=objects)])
    (roi,) = read_meta(encode(state)).rois
    assert (roi.kind, roi.graphic_type, roi.label) == ("gsps_graphic", "POLYLINE", "LESION")
    assert roi.referenced_sop_instance_uid == image.SOPInstanceUID
    assert roi.shapes == [[[10.0, 8.0], [70.0, 8.0], [40.0, 56.0]]]  # DISPLAY units left out


def test_a_segmentation_references_the_image_it_was_derived_from():
    patient = Patient()
    image = us_image(patient)
    seg = mass_segmentation(image, np.ones((1, 64, 80), np.uint8))
    (roi,) = read_meta(encode(seg)).rois
    assert (roi.kind, roi.label, roi.shape_count) == ("seg_segments", "mass", 1)
    assert roi.referenced_sop_instance_uid == image.SOPInstanceUID


def _full_parse_meta(data: bytes):
    """What read_meta gives when every object's whole header is parsed (the slow path)."""
    import io

    import pydicom

    from mrrp_pacs.intake.dicom import _meta_from_dataset
    return _meta_from_dataset(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True))


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
def test_an_image_read_from_its_walked_header_matches_a_full_parse(syntax):
    """Images are read from the elements the completeness walk kept, not by parsing the
    whole header: the same identifiers, texts decoded by their character set, in explicit
    and implicit VR."""
    import io

    from pydicom.uid import UID

    image = us_image(Patient(patient_id="MRN-ÄÖ-ø"))
    image.SpecificCharacterSet = "ISO_IR 192"
    image.AccessionNumber = "ACC-é"
    if syntax == "1.2.840.10008.1.2":
        image.file_meta.TransferSyntaxUID = UID(syntax)
    buffer = io.BytesIO()
    image.save_as(buffer, implicit_vr=syntax == "1.2.840.10008.1.2", little_endian=True,
                  enforce_file_format=True)
    data = buffer.getvalue()
    meta = read_meta(data)
    assert meta == _full_parse_meta(data)
    assert meta.patient_id == "MRN-ÄÖ-ø" and meta.accession_number == "ACC-é"
    assert meta.transfer_syntax_uid == syntax


def test_a_walked_header_still_refuses_a_media_uid_that_differs():
    image = us_image(Patient())
    data = encode(image)
    uid = image.SOPInstanceUID.encode()
    other = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
    data = data.replace(uid, other, 1)  # the file meta's copy comes first
    with pytest.raises(DicomError, match="MediaStorageSOPInstanceUID"):
        _full_parse_meta(data)
    with pytest.raises(DicomError, match="MediaStorageSOPInstanceUID"):
        read_meta(data)


def test_an_unknown_vr_of_the_sop_class_is_refused_not_raised():
    """Found by the fuzz test: a SOP Class UID element whose VR is not a VR (b'\\x00I') made
    pydicom raise NotImplementedError out of the header's first look."""
    data = encode(us_image(Patient()))
    element = b"\x08\x00\x16\x00UI"  # (0008,0016) SOP Class UID, explicit VR little endian
    assert data.count(element) == 1
    with pytest.raises(DicomError):
        read_meta(data.replace(element, b"\x08\x00\x16\x00\x00I"))
