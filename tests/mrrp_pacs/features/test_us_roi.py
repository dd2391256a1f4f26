"""Lesion ROIs: masks from every source (SR, presentation state, SEG), the frame drawn on, the
flagged box fallback (Pascal VOC, calipers) and the automatic candidate."""

from __future__ import annotations

import math

import highdicom as hd
import numpy as np
import pydicom
import pytest
from builders import mass_segmentation, measurement_report_sr
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from skimage.draw import polygon as draw_polygon
from us_phantom import STUDY, WHO, neutral_frame, random_traits, saved, us_dataset

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.us_image import read_ultrasound
from mrrp_pacs.features.us_roi import (
    automatic_lesion_candidate,
    box_lesion,
    largest_lesion,
    lesions_from_gsps,
    lesions_from_seg,
    lesions_from_sr,
    roi_from_voc,
)
from mrrp_pacs.phantom.dicom_objects import lesion_roi_report, ultrasound_image
from mrrp_pacs.phantom.ultrasound import render_frame


def _sr_with(image: Dataset, groups: list[list[tuple[hd.sr.GraphicTypeValues, list]]],
             frame: int | None = None) -> Dataset:
    """A TID 1500 SR with one TID 1410 group per entry (each group: one region; extra shapes
    go into further groups' regions)."""
    measurement_groups = []
    for number, shapes in enumerate(groups, start=1):
        for graphic_type, points in shapes:
            region = hd.sr.ImageRegion(
                graphic_type=graphic_type, graphic_data=np.array(points, dtype=float),
                source_image=hd.sr.SourceImageForRegion.from_source_image(
                    image, referenced_frame_numbers=[frame] if frame else None))
            measurement_groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(),
                                                             identifier=f"Lesion {number}"),
                referenced_region=region, finding_type=codes.SCT.Mass))
    return measurement_report_sr(image, measurement_groups)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_the_phantom_outline_becomes_a_mask_not_a_box(image, frame, tmp_path):
    sr = lesion_roi_report(image, frame.lesion_box_px, "test", outline_px=frame.lesion_outline_px)
    (lesion,) = lesions_from_sr(pydicom.dcmread(saved(sr, tmp_path, "sr.dcm")), image)
    truth = np.zeros(lesion.mask.shape, bool)
    rr, cc = draw_polygon(frame.lesion_outline_px[:, 1], frame.lesion_outline_px[:, 0],
                          truth.shape)
    truth[rr, cc] = True
    assert lesion.outline and lesion.roi_shape == "outline" and lesion.source == "sr"
    assert lesion.frame is None and lesion.label == "Lesion 1"
    assert _dice(lesion.mask, truth) > 0.97
    # a lesion fills about π/4 of its box: the mask is not the box
    x0, y0, x1, y1 = lesion.box
    assert lesion.mask.sum() < 0.85 * (x1 - x0 + 1) * (y1 - y0 + 1)
    assert abs(x0 - frame.lesion_box_px[0]) <= 1 and abs(y1 - frame.lesion_box_px[3]) <= 1
    with pytest.raises(FeatureError, match=rf"SR {sr.SOPInstanceUID}: no image region.*1\.2\.3"):
        other = us_dataset(frame)
        other.SOPInstanceUID = "1.2.3"
        lesions_from_sr(sr, other)
    with pytest.raises(FeatureError, match="is not a structured report"):
        lesions_from_sr(image, image)


def test_the_phantom_box_sr_covers_exactly_its_pixels(image, frame):
    (lesion,) = lesions_from_sr(lesion_roi_report(image, frame.lesion_box_px, "test"), image)
    x0, y0, x1, y1 = frame.lesion_box_px
    assert lesion.box == frame.lesion_box_px
    assert int(lesion.mask.sum()) == (x1 - x0 + 1) * (y1 - y0 + 1)


def test_circle_and_ellipse_are_filled_by_pixel_centre(image):
    circle = _sr_with(image, [[(hd.sr.GraphicTypeValues.CIRCLE, [[300, 200], [330, 240]])]])
    (lesion,) = lesions_from_sr(circle, image)
    assert lesion.box == (250, 150, 349, 249)  # radius 50: pixel centres 250.5 … 349.5
    assert abs(int(lesion.mask.sum()) - math.pi * 50**2) < 0.01 * math.pi * 50**2
    assert lesion.mask[200, 300] and not lesion.mask[155, 255]  # the box corner is outside
    # ellipse rotated 45°: semi-axes 40 and 20 → area π·40·20, half extents ≈ 31.6
    a, b = 40 / math.sqrt(2), 20 / math.sqrt(2)
    points = [[300 - a, 200 - a], [300 + a, 200 + a], [300 - b, 200 + b], [300 + b, 200 - b]]
    (ellipse,) = lesions_from_sr(_sr_with(image, [[(hd.sr.GraphicTypeValues.ELLIPSE,
                                                     points)]]), image)
    assert abs(int(ellipse.mask.sum()) - math.pi * 800) < 0.02 * math.pi * 800
    assert ellipse.box == (268, 168, 331, 231)
    assert ellipse.mask[200 + 20, 300 + 20] and not ellipse.mask[200 - 20, 300 + 20]


def test_one_lesion_per_measurement_group_on_its_frame(frame):
    cine = np.stack([frame.pixels] * 5)
    image = ultrasound_image(cine, 0.1, WHO, STUDY, "L", "cine")
    square = [[100, 100], [140, 100], [140, 140], [100, 140], [100, 100]]
    triangle = [[300, 300], [400, 300], [350, 380], [300, 300]]
    sr = _sr_with(image, [[(hd.sr.GraphicTypeValues.POLYLINE, square)],
                          [(hd.sr.GraphicTypeValues.POLYLINE, triangle)]], frame=4)
    lesions = lesions_from_sr(sr, image)
    assert sorted(lesion.label for lesion in lesions) == ["Lesion 1", "Lesion 2"]
    assert {lesion.frame for lesion in lesions} == {3}  # 1-based 4 → 0-based 3
    assert largest_lesion(lesions).label == "Lesion 2"
    assert int(next(x for x in lesions if x.label == "Lesion 1").mask.sum()) == 40 * 40
    bad = _sr_with(image, [[(hd.sr.GraphicTypeValues.POLYLINE, square)]], frame=5)
    for item in _walk(bad):  # highdicom checks frame numbers: write 5, then alter it
        if "ReferencedFrameNumber" in item:
            item.ReferencedFrameNumber = 6
    with pytest.raises(FeatureError, match="Referenced Frame Number 6 is outside the image's 5"):
        lesions_from_sr(bad, image)


def test_the_pipeline_reads_the_frame_the_outline_was_drawn_on(frame, tmp_path):
    cine = np.stack([np.full_like(frame.pixels, 10 * k) for k in range(5)])
    image = ultrasound_image(cine, 0.1, WHO, STUDY, "L", "cine")
    square = [[100, 100], [140, 100], [140, 140], [100, 140], [100, 100]]
    (lesion,) = lesions_from_sr(_sr_with(image, [[(hd.sr.GraphicTypeValues.POLYLINE, square)]],
                                         frame=2), image)
    read = read_ultrasound(pydicom.dcmread(saved(image, tmp_path)), frame=lesion.frame)
    assert read.frame == 1 and float(read.gray[120, 120]) == pytest.approx(10 * 255 / 255)


def test_calipers_give_a_flagged_box_and_a_point_is_degenerate(image):
    """Two caliper lengths (TID 300 NUMs inferred from two-point lines) in one TID 1501 group:
    no outline, so the box around the calipers stands in, flagged."""
    lengths = [hd.sr.Measurement(
        name=codes.SCT.Length, value=value, unit=codes.UCUM.Millimeter,
        referenced_coordinates=[hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=np.array(points, dtype=float),
            source_image=hd.sr.SourceImageForRegion.from_source_image(image))])
        for value, points in ((20.0, [[200, 220], [400, 220]]), (11.0, [[300, 170], [300, 280]]))]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="Mass"),
        measurements=lengths)
    sr = measurement_report_sr(image, [group])
    (lesion,) = lesions_from_sr(sr, image)
    assert not lesion.outline and lesion.roi_shape == "box" and lesion.label == "Mass"
    assert lesion.box == (200, 170, 400, 280)
    point = _sr_with(image, [[(hd.sr.GraphicTypeValues.POINT, [[300, 200]])]])
    with pytest.raises(FeatureError, match="degenerate"):
        lesions_from_sr(point, image)


def _walk(ds: Dataset):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _walk(item)
        yield from item.get("ReferencedSOPSequence", [])


def _gsps(image: Dataset, objects: list[hd.pr.GraphicObject]) -> Dataset:
    layer = hd.pr.GraphicLayer(layer_name="LESION", order=1)
    annotation = hd.pr.GraphicAnnotation(referenced_images=[image], graphic_layer=layer,
                                         graphic_objects=objects)
    return hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[image], series_instance_uid=generate_uid(), series_number=3,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1",
        content_label="LESION", graphic_layers=[layer], graphic_annotations=[annotation])


def test_gsps_outline_is_a_mask_and_calipers_a_flagged_box(image, tmp_path):
    outline = hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE,
                                  np.array([[210.0, 150.0], [380.0, 150.0], [295.0, 260.0],
                                            [210.0, 150.0]]), units="PIXEL")
    state = _gsps(image, [outline])
    (lesion,) = lesions_from_gsps(pydicom.dcmread(saved(state, tmp_path, "gsps.dcm")), image)
    assert lesion.outline and lesion.source == "gsps" and lesion.label == "LESION"
    area = 0.5 * 170 * 110  # the triangle
    assert abs(int(lesion.mask.sum()) - area) < 0.02 * area
    calipers = [hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE,
                                    np.array([[200.0, 220.0], [400.0, 220.0]]), units="PIXEL"),
                hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE,
                                    np.array([[300.0, 170.0], [300.0, 280.0]]), units="PIXEL")]
    (box,) = lesions_from_gsps(_gsps(image, calipers), image)
    assert not box.outline and box.roi_shape == "box" and box.box == (200, 170, 400, 280)
    other = us_dataset(neutral_frame())
    other.SOPInstanceUID = "1.2.3"
    with pytest.raises(FeatureError, match=r"no PIXEL-unit graphic references image 1\.2\.3"):
        lesions_from_gsps(state, other)


def test_gsps_ignores_display_units_and_refuses_degenerate(image):
    display = hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE,
                                  np.array([[0.2, 0.2], [0.6, 0.7]]), units="DISPLAY")
    with pytest.raises(FeatureError, match="1 in DISPLAY units"):
        lesions_from_gsps(_gsps(image, [display]), image)
    line = hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE,
                               np.array([[200.0, 220.0], [400.0, 220.0]]), units="PIXEL")
    with pytest.raises(FeatureError, match="degenerate"):
        lesions_from_gsps(_gsps(image, [line]), image)


def test_seg_segments_become_lesion_masks(image, frame, tmp_path):
    truth = np.zeros((int(image.Rows), int(image.Columns)), bool)
    rr, cc = draw_polygon(frame.lesion_outline_px[:, 1], frame.lesion_outline_px[:, 0],
                          truth.shape)
    truth[rr, cc] = True
    seg = mass_segmentation(image, truth[None])
    (lesion,) = lesions_from_seg(pydicom.dcmread(saved(seg, tmp_path, "seg.dcm")), image)
    assert lesion.outline and lesion.source == "seg" and lesion.label == "mass"
    assert np.array_equal(lesion.mask, truth)
    with pytest.raises(FeatureError, match="is not a segmentation"):
        lesions_from_seg(image, image)


def test_box_lesion_is_clipped_and_flagged(image):
    lesion = box_lesion((-5, 10, 20, 30), (480, 640), "voc")
    assert not lesion.outline and lesion.box == (0, 10, 20, 30)
    assert int(lesion.mask.sum()) == 21 * 21
    with pytest.raises(FeatureError, match="outside"):
        box_lesion((700, 10, 720, 30), (480, 640), "voc")


VOC = """<?xml version="1.0" encoding="utf-8"?>
<annotation><folder>us</folder><filename>us.png</filename>
  <size><width>640</width><height>480</height><depth>1</depth></size>
  <object><name>lesion</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax>
  </bndbox></object>{}
</annotation>"""


def test_roi_from_voc_text_and_file(tmp_path):
    text = VOC.format(201, 151, 381, 261, "")
    assert roi_from_voc(text) == (200, 150, 380, 260)  # VOC is 1-based
    second = "<object><name>x</name><bndbox><xmin>11</xmin><ymin>11</ymin><xmax>31</xmax>" \
             "<ymax>31</ymax></bndbox></object>"
    path = tmp_path / "lesion.xml"
    path.write_bytes(VOC.format(201.0, 151.0, 381.0, 261.0, second).encode())
    assert roi_from_voc(path) == (200, 150, 380, 260)  # the larger of two objects


@pytest.mark.parametrize(("text", "reason"), [
    (VOC.format(201, 151, 201, 261, ""), "degenerate"),
    (VOC.format(201, 151, "wide", 261, ""), "non-numeric"),
    (VOC.format(701, 151, 781, 261, ""), "outside the 640 × 480 image"),
    ("<annotation><filename>x.png</filename></annotation>", r"no <object><bndbox>"),
    ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">]><annotation>&lol;</annotation>',
     "DOCTYPE or entity declaration"),
    ('<!DOCTYPE a SYSTEM "file:///etc/passwd"><annotation/>', "DOCTYPE or entity"),
    ("<annotation><object>", "not well-formed"),
])
def test_roi_from_voc_refuses_bad_files(text, reason):
    with pytest.raises(FeatureError, match=reason):
        roi_from_voc(text)


def test_automatic_candidate_overlaps_the_true_lesion():
    hits = []
    for i in range(16):
        rng = np.random.default_rng(300 + i)
        frame = render_frame(np.random.default_rng(i), random_traits(rng),
                             float(rng.uniform(8, 30)))
        box, true = automatic_lesion_candidate(frame.pixels, (0.1, 0.1)), frame.lesion_box_px
        w = max(0, min(box[2], true[2]) - max(box[0], true[0]) + 1)
        h = max(0, min(box[3], true[3]) - max(box[1], true[1]) + 1)
        union = ((box[2] - box[0] + 1) * (box[3] - box[1] + 1)
                 + (true[2] - true[0] + 1) * (true[3] - true[1] + 1) - w * h)
        hits.append(w * h / union >= 0.3)
    assert np.mean(hits) >= 0.8
    with pytest.raises(FeatureError, match="no hypoechoic region"):
        automatic_lesion_candidate(np.full((480, 640), 128, np.float32), (0.1, 0.1))
