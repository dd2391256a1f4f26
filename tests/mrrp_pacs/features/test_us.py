"""Ultrasound branch: DICOM variants read back, every ROI source, crop, encoder and its store."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.sr.codedict import codes
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from model_store import ModelStore, ModelStoreError
from mrrp_pacs.features.errors import FeatureError
from mrrp_pacs.features.us import (
    FALLBACK_SPACING,
    UsResNet,
    automatic_lesion_candidate,
    crop_roi,
    encode_crops,
    load_us_encoder,
    read_ultrasound,
    roi_from_gsps,
    roi_from_sr,
    roi_from_voc,
    save_us_encoder,
    token_positions,
    train_from_crops,
    train_us_encoder,
)
from mrrp_pacs.phantom.dicom_objects import (
    Demographics,
    StudyInfo,
    lesion_roi_report,
    ultrasound_image,
)
from mrrp_pacs.phantom.ultrasound import render_frame

US_TRAITS = ("us_margin", "us_orientation", "us_shadowing", "us_heterogeneity")
WHO = Demographics("T1", "TEST", "TEST^ONE", "19700101", "F")
STUDY = StudyInfo("1.2.826.0.1.3680043.8.498.1", "ACC1", "1", "20240101", "101010", "US breast")
MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"


def _traits(rng: np.random.Generator) -> dict[str, float]:
    return {name: float(rng.standard_normal()) for name in US_TRAITS}


@pytest.fixture(scope="module")
def frame():
    return render_frame(np.random.default_rng(7), dict.fromkeys(US_TRAITS, 0.0), 18.0)


@pytest.fixture
def image(frame) -> Dataset:
    return ultrasound_image(frame.pixels, frame.pixel_mm, WHO, STUDY, "L", "test")


def _round_trip(ds: Dataset, tmp_path: Path, name: str = "us.dcm") -> Path:
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def _encapsulated(ds: Dataset, frame_bytes: bytes, syntax: UID) -> Dataset:
    ds.PixelData = encapsulate([frame_bytes])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _colour(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image and its BT.601 luma."""
    rgb = np.stack([pixels, (pixels * 0.8).astype(np.uint8), (pixels * 0.5).astype(np.uint8)], -1)
    return rgb, rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _as_colour(ds: Dataset, rgb: np.ndarray, photometric: str) -> Dataset:
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = photometric
    ds.PlanarConfiguration = 0
    ds.PixelData = rgb.tobytes()
    return ds


# --------------------------------------------------------------------------- reading


def test_phantom_image_reads_back_exactly_with_region_spacing(image, frame, tmp_path):
    read = read_ultrasound(_round_trip(image, tmp_path))
    assert read.gray.dtype == np.float32 and read.gray.shape == frame.pixels.shape
    np.testing.assert_array_equal(read.gray, frame.pixels)
    assert read.pixel_mm == pytest.approx((0.1, 0.1))
    assert read.flags == [] and read.sop_instance_uid == image.SOPInstanceUID and read.frame == 0


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                                    RLELossless, JPEGLSLossless])
def test_lossless_transfer_syntaxes_decode_exactly(image, frame, tmp_path, syntax):
    if syntax in (RLELossless, JPEGLSLossless):
        image.compress(syntax)  # pydicom's RLE encoder, pyjpegls
    else:
        image.file_meta.TransferSyntaxUID = syntax
    path = _round_trip(image, tmp_path)
    np.testing.assert_array_equal(read_ultrasound(path).gray, frame.pixels)


def test_jpeg_ls_near_lossless_stays_within_its_error_bound(image, frame, tmp_path):
    image.compress(JPEGLSNearLossless, jls_error=2)
    error = np.abs(read_ultrasound(_round_trip(image, tmp_path)).gray - frame.pixels)
    assert 0 < error.max() <= 2


def test_jpeg_2000_lossless_and_lossy_decode(image, frame, tmp_path):
    exact = io.BytesIO()
    Image.fromarray(frame.pixels).save(exact, format="JPEG2000", irreversible=False,
                                       no_jp2=True)
    path = _round_trip(_encapsulated(image, exact.getvalue(), JPEG2000Lossless), tmp_path)
    np.testing.assert_array_equal(read_ultrasound(path).gray, frame.pixels)

    lossy = io.BytesIO()
    Image.fromarray(frame.pixels).save(lossy, format="JPEG2000", irreversible=True, no_jp2=True,
                                       quality_mode="rates", quality_layers=[4])
    ds = ultrasound_image(frame.pixels, 0.1, WHO, STUDY, "L", "j2k")
    path = _round_trip(_encapsulated(ds, lossy.getvalue(), JPEG2000), tmp_path, "lossy.dcm")
    error = np.abs(read_ultrasound(path).gray - frame.pixels)
    assert 0 < error.mean() < 6


def test_jpeg_baseline_grayscale_and_ybr_full_422(image, frame, tmp_path):
    encoded = io.BytesIO()
    Image.fromarray(frame.pixels).save(encoded, format="JPEG", quality=95)
    path = _round_trip(_encapsulated(image, encoded.getvalue(), JPEGBaseline8Bit), tmp_path)
    assert np.abs(read_ultrasound(path).gray - frame.pixels).mean() < 3

    rgb, luma = _colour(frame.pixels)
    encoded = io.BytesIO()
    Image.fromarray(rgb).save(encoded, format="JPEG", quality=95, subsampling=1)  # 4:2:2
    ds = ultrasound_image(frame.pixels, 0.1, WHO, STUDY, "L", "jpeg-rgb")
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = (
        3, "YBR_FULL_422", 0)
    path = _round_trip(_encapsulated(ds, encoded.getvalue(), JPEGBaseline8Bit), tmp_path, "c.dcm")
    assert np.abs(read_ultrasound(path).gray - luma).mean() < 3


def test_jpeg_lossless_has_no_decoder_here_and_says_so(image, tmp_path):
    path = _round_trip(_encapsulated(image, b"\xff\xd8\xff\xd9", JPEGLosslessSV1), tmp_path)
    expected = rf"{image.SOPInstanceUID}.*JPEG Lossless.*1\.2\.840\.10008\.1\.2\.4\.70.*no decoder"
    with pytest.raises(FeatureError, match=expected):
        read_ultrasound(path)


def test_monochrome1_is_inverted(image, frame, tmp_path):
    image.PhotometricInterpretation = "MONOCHROME1"
    image.PixelData = (255 - frame.pixels).tobytes()
    np.testing.assert_array_equal(read_ultrasound(_round_trip(image, tmp_path)).gray,
                                  frame.pixels)


def test_rgb_and_ybr_full_become_luma(image, frame, tmp_path):
    rgb, luma = _colour(frame.pixels)
    read = read_ultrasound(_round_trip(_as_colour(image, rgb, "RGB"), tmp_path))
    np.testing.assert_allclose(read.gray, luma, atol=1e-3)

    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds = _as_colour(ultrasound_image(frame.pixels, 0.1, WHO, STUDY, "L", "ybr"), ybr, "YBR_FULL")
    read = read_ultrasound(_round_trip(ds, tmp_path, "ybr.dcm"))
    assert np.abs(read.gray - luma).max() < 2.5


def test_ybr_full_422_uncompressed_becomes_luma(image, frame, tmp_path):
    rgb, luma = _colour(frame.pixels)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.float32)
    y = ybr[..., 0].reshape(frame.pixels.shape[0], -1, 2)
    chroma = ybr[..., 1:].reshape(frame.pixels.shape[0], -1, 2, 2).mean(axis=2)
    packed = np.concatenate([y, chroma], axis=-1)  # Y1 Y2 Cb Cr per pair of pixels
    image.SamplesPerPixel, image.PhotometricInterpretation, image.PlanarConfiguration = (
        3, "YBR_FULL_422", 0)
    image.PixelData = np.round(packed).astype(np.uint8).tobytes()
    read = read_ultrasound(_round_trip(image, tmp_path))
    assert np.abs(read.gray - luma).mean() < 1.5


def test_palette_colour_goes_through_the_lookup_table(image, frame, tmp_path):
    image.PhotometricInterpretation = "PALETTE COLOR"
    entries = ((255 - np.arange(256)) * 257).astype("<u2")  # reversed gray ramp, 16-bit entries
    for colour in ("Red", "Green", "Blue"):
        setattr(image, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(image, f"{colour}PaletteColorLookupTableData", entries.tobytes())
    image.PixelData = (255 - frame.pixels).tobytes()
    read = read_ultrasound(_round_trip(image, tmp_path))
    np.testing.assert_allclose(read.gray, frame.pixels, atol=1e-3)


def test_multiframe_defaults_to_the_middle_frame(image, frame, tmp_path):
    frames = [frame.pixels, frame.pixels // 2, 255 - frame.pixels]
    image.SOPClassUID = image.file_meta.MediaStorageSOPClassUID = MULTIFRAME
    image.NumberOfFrames = 3
    image.FrameTime = 40.0
    image.FrameIncrementPointer = 0x00181063
    image.PixelData = np.stack(frames).tobytes()
    path = _round_trip(image, tmp_path)
    middle = read_ultrasound(path)
    assert middle.frame == 1
    np.testing.assert_array_equal(middle.gray, frames[1])
    np.testing.assert_array_equal(read_ultrasound(path, frame=2).gray, frames[2])
    with pytest.raises(FeatureError, match=rf"{image.SOPInstanceUID}.*frame 3 out of range"):
        read_ultrasound(path, frame=3)


def test_region_containing_the_roi_gives_the_spacing(image):
    left = image.SequenceOfUltrasoundRegions[0]
    left.RegionLocationMaxX1 = 399
    right = copy.deepcopy(left)
    right.RegionLocationMinX0, right.RegionLocationMaxX1 = 400, 639
    right.PhysicalDeltaX = right.PhysicalDeltaY = 0.025  # cm
    image.SequenceOfUltrasoundRegions = [left, right]
    assert read_ultrasound(image, roi=(450, 100, 500, 150)).pixel_mm == pytest.approx((0.25, 0.25))
    assert read_ultrasound(image, roi=(50, 100, 90, 150)).pixel_mm == pytest.approx((0.1, 0.1))
    assert read_ultrasound(image).pixel_mm == pytest.approx((0.1, 0.1))  # the larger region


def test_spacing_falls_back_and_flags_it(image):
    image.SequenceOfUltrasoundRegions[0].PhysicalUnitsXDirection = 4  # seconds: not spatial
    image.PixelSpacing = [0.15, 0.12]
    read = read_ultrasound(image)
    assert read.pixel_mm == pytest.approx((0.15, 0.12)) and read.flags == [FALLBACK_SPACING]
    del image.PixelSpacing
    del image.SequenceOfUltrasoundRegions
    read = read_ultrasound(image, default_pixel_mm=0.3)
    assert read.pixel_mm == (0.3, 0.3) and read.flags == [FALLBACK_SPACING]
    assert read_ultrasound(image, default_pixel_mm=None).pixel_mm is None


def test_bad_inputs_name_the_instance_and_the_reason(image, tmp_path):
    uid = image.SOPInstanceUID
    wrong = copy.deepcopy(image)
    wrong.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT
    with pytest.raises(FeatureError, match=rf"{uid}.*not an Ultrasound"):
        read_ultrasound(wrong)
    del image.PixelData
    with pytest.raises(FeatureError, match=rf"{uid}.*no pixel data"):
        read_ultrasound(image)
    garbage = tmp_path / "junk.dcm"
    garbage.write_bytes(b"not dicom at all")
    with pytest.raises(FeatureError, match=r"junk\.dcm: cannot be read as DICOM"):
        read_ultrasound(garbage)


# --------------------------------------------------------------------------- ROI sources


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
    path = _round_trip(sr, tmp_path, "sr.dcm")
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
    read = pydicom.dcmread(_round_trip(state, tmp_path, "gsps.dcm"))
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
        frame = render_frame(np.random.default_rng(i), _traits(rng), float(rng.uniform(8, 30)))
        box, true = automatic_lesion_candidate(frame.pixels, (0.1, 0.1)), frame.lesion_box_px
        w = max(0, min(box[2], true[2]) - max(box[0], true[0]) + 1)
        h = max(0, min(box[3], true[3]) - max(box[1], true[1]) + 1)
        union = ((box[2] - box[0] + 1) * (box[3] - box[1] + 1)
                 + (true[2] - true[0] + 1) * (true[3] - true[1] + 1) - w * h)
        hits.append(w * h / union >= 0.3)
    assert np.mean(hits) >= 0.8
    with pytest.raises(FeatureError, match="no hypoechoic region"):
        automatic_lesion_candidate(np.full((480, 640), 128, np.float32), (0.1, 0.1))


def test_crop_keeps_aspect_ratio_with_margin_and_clips():
    gray = np.zeros((480, 640), dtype=np.float32)
    gray[100:201, 100:301] = 200.0  # a box 201 wide, 101 tall
    crop = crop_roi(gray, (100, 100, 300, 200))
    assert crop.shape == (256, 256) and crop.dtype == np.float32
    # padded square side 213 (201 + 2 × 6): lesion rows 101 / 213 of the height, centred
    rows = np.nonzero(crop[:, 128] > 100)[0]
    assert abs(len(rows) - 256 * 101 / 213) <= 2 and abs(rows.mean() - 127.5) <= 1.5
    assert crop[128, 3] < 1 and crop[128, 10] > 199  # 6 px margin → ~7 crop px of background
    at_corner = crop_roi(gray, (0, 0, 50, 50))  # margin clipped at the image edge
    assert at_corner.shape == (256, 256)
    with pytest.raises(FeatureError, match="outside"):
        crop_roi(gray, (700, 10, 800, 60))


# --------------------------------------------------------------------------- encoder


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """64 phantom lesion crops; frames at 0.2 mm/px (same field of view, 4 × faster)."""
    out = []
    for i in range(64):
        rng = np.random.default_rng(500 + i)
        frame = render_frame(np.random.default_rng(i), _traits(rng),
                             float(np.clip(20 * np.exp(0.45 * rng.standard_normal()), 6, 45)),
                             rows=240, columns=320, pixel_mm=0.2)
        out.append(crop_roi(frame.pixels, frame.lesion_box_px))
    return np.stack(out)


def test_encoder_shapes_and_token_order():
    model = UsResNet().eval()
    x = torch.rand(2, 1, 256, 256) * 255
    with torch.no_grad():
        fmap, tokens, logits = model.feature_map(x), model.encode(x), model(x)
    assert fmap.shape == (2, 64, 16, 16) and tokens.shape == (2, 256, 64)
    assert logits.shape == (2, 4)
    positions = token_positions()
    assert positions.shape == (256, 2) and tuple(positions[17]) == (1, 1)
    for index in (0, 17, 255):
        r, c = positions[index]
        torch.testing.assert_close(tokens[:, index], fmap[:, :, r, c])
    assert encode_crops(model, x[:, 0].numpy()).shape == (2, 256, 64)
    with pytest.raises(FeatureError, match=r"crops must be \(n, 256, 256\)"):
        encode_crops(model, np.zeros((2, 128, 128), np.float32))


def test_rotation_pretext_loss_decreases(crops):
    _, history = train_us_encoder(crops, epochs=4, seed=0)
    assert len(history.losses) == 4 and history.n_crops == 64
    assert history.losses[0] < math.log(4) + 0.05  # the zero head starts at chance
    assert history.losses[-1] < history.losses[0] - 0.15
    assert history.accuracies[-1] > 0.4


def test_training_is_deterministic_and_restores_torch_state(crops):
    before = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, _ = train_us_encoder(crops[:16], epochs=1, seed=3)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream is untouched
    assert torch.are_deterministic_algorithms_enabled() == before
    second, _ = train_us_encoder(crops[:16], epochs=1, seed=3)
    other, _ = train_us_encoder(crops[:16], epochs=1, seed=4)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert not torch.equal(first.blocks[0].conv1.weight, other.blocks[0].conv1.weight)


def test_store_round_trip_gives_identical_tokens_and_refuses_changes(crops, tmp_path):
    model, history = train_us_encoder(crops[:16], epochs=1, seed=0)
    store = ModelStore(tmp_path / "models")
    saved = save_us_encoder(store, model, history, {"source": "phantom seed 0"})
    assert saved.kind == "us-encoder" and saved.name == "usresnet-small"
    manifest = saved.manifest
    assert manifest["output_shape"] == [64, 16, 16] and manifest["pretext_task"] == "rotation-4way"
    assert manifest["training"]["n_crops"] == 16 and manifest["training"]["seed"] == 0
    assert manifest["training"]["final_loss"] == history.losses[-1]
    assert manifest["training"]["provenance"] == {"source": "phantom seed 0"}

    loaded, version = load_us_encoder(store)
    assert version.version == saved.version
    np.testing.assert_array_equal(encode_crops(loaded, crops[:4]), encode_crops(model, crops[:4]))

    manifest_file = saved.path / "manifest.json"
    edited = json.loads(manifest_file.read_text())
    edited["code_version"] = "0"
    manifest_file.write_text(json.dumps(edited))
    with pytest.raises(ModelStoreError, match=r"code version '0'.*train a new encoder"):
        load_us_encoder(store)
    edited["code_version"], edited["architecture"]["stem"]["width"] = "1", 8
    manifest_file.write_text(json.dumps(edited))
    with pytest.raises(ModelStoreError, match="another architecture"):
        load_us_encoder(store)

    newer = train_from_crops(store, crops[:8], epochs=1, seed=1)
    weights = newer.path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelStoreError, match="does not match its manifest sha256"):
        load_us_encoder(store, version=newer.version)
