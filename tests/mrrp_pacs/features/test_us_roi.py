"""Lesion ROIs: every source (SR, presentation state, Pascal VOC) and the automatic candidate."""

from __future__ import annotations

import math

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from us_phantom import random_traits, saved

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.us_roi import (
    automatic_lesion_candidate,
    roi_from_gsps,
    roi_from_sr,
    roi_from_voc,
)
from mrrp_pacs.phantom.dicom_objects import lesion_roi_report
from mrrp_pacs.phantom.ultrasound import render_frame


def _sr_with(image: Dataset, graphic_type: hd.sr.GraphicTypeValues, points: list[list[float]]
             ) -> Dataset:
    region = hd.sr.ImageRegion(graphic_type=graphic_type, graphic_data=np.array(points),
                               source_image=hd.sr.SourceImageForRegion.from_source_image(image))
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="Lesion"),
        referenced_region=region, finding_type=codes.SCT.Mass)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Person,
                observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                    name="TEST^READER"))),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion, imaging_measurements=[group])
    return hd.sr.ComprehensiveSR(evidence=[image], content=report,
                                 series_instance_uid=generate_uid(), series_number=2,
                                 sop_instance_uid=generate_uid(), instance_number=1,
                                 manufacturer="test")


def test_roi_from_the_phantom_sr_round_trip(image, frame, tmp_path):
    sr = lesion_roi_report(image, frame.lesion_box_px, "test")
    path = saved(sr, tmp_path, "sr.dcm")
    assert roi_from_sr(pydicom.dcmread(path), image.SOPInstanceUID) == frame.lesion_box_px
    with pytest.raises(FeatureError, match=rf"SR {sr.SOPInstanceUID}: no image region.*1\.2\.3"):
        roi_from_sr(sr, "1.2.3")
    with pytest.raises(FeatureError, match="is not a structured report"):
        roi_from_sr(image, image.SOPInstanceUID)


def test_roi_from_sr_circle_ellipse_and_degenerate_point(image):
    circle = _sr_with(image, hd.sr.GraphicTypeValues.CIRCLE, [[300, 200], [330, 240]])
    assert roi_from_sr(circle, image.SOPInstanceUID) == (250, 150, 350, 250)  # radius 50
    # ellipse rotated 45°: semi-axes 40 and 20 → half extents sqrt((40² + 20²) / 2) ≈ 31.6
    a, b = 40 / math.sqrt(2), 20 / math.sqrt(2)
    ellipse = _sr_with(image, hd.sr.GraphicTypeValues.ELLIPSE,
                       [[300 - a, 200 - a], [300 + a, 200 + a], [300 - b, 200 + b],
                        [300 + b, 200 - b]])
    assert roi_from_sr(ellipse, image.SOPInstanceUID) == (268, 168, 332, 232)
    point = _sr_with(image, hd.sr.GraphicTypeValues.POINT, [[300, 200]])
    with pytest.raises(FeatureError, match="degenerate"):
        roi_from_sr(point, image.SOPInstanceUID)


def _gsps(image: Dataset, objects: list[hd.pr.GraphicObject]) -> Dataset:
    layer = hd.pr.GraphicLayer(layer_name="LESION", order=1)
    annotation = hd.pr.GraphicAnnotation(referenced_images=[image], graphic_layer=layer,
                                         graphic_objects=objects)
    return hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[image], series_instance_uid=generate_uid(), series_number=3,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1",
        content_label="LESION", graphic_layers=[layer], graphic_annotations=[annotation])


def test_roi_from_gsps_polyline_and_calipers(image, tmp_path):
    box = hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE,
                              np.array([[210.2, 150.0], [380.0, 150.0], [380.0, 260.7],
                                        [210.2, 260.7], [210.2, 150.0]]), units="PIXEL")
    state = _gsps(image, [box])
    read = pydicom.dcmread(saved(state, tmp_path, "gsps.dcm"))
    assert roi_from_gsps(read, image.SOPInstanceUID) == (210, 150, 380, 261)
    calipers = [hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE,
                                    np.array([[200.0, 220.0], [400.0, 220.0]]), units="PIXEL"),
                hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE,
                                    np.array([[300.0, 170.0], [300.0, 280.0]]), units="PIXEL")]
    assert roi_from_gsps(_gsps(image, calipers), image.SOPInstanceUID) == (200, 170, 400, 280)
    with pytest.raises(FeatureError, match=r"no PIXEL-unit graphic references image 1\.2\.3"):
        roi_from_gsps(state, "1.2.3")


def test_roi_from_gsps_ignores_display_units_and_refuses_degenerate(image):
    display = hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE,
                                  np.array([[0.2, 0.2], [0.6, 0.7]]), units="DISPLAY")
    with pytest.raises(FeatureError, match="1 in DISPLAY units"):
        roi_from_gsps(_gsps(image, [display]), image.SOPInstanceUID)
    line = hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE,
                               np.array([[200.0, 220.0], [400.0, 220.0]]), units="PIXEL")
    with pytest.raises(FeatureError, match="degenerate"):
        roi_from_gsps(_gsps(image, [line]), image.SOPInstanceUID)


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
