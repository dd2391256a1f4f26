"""Reading ultrasound frames: every DICOM variant read back, spacing, and errors that name the
instance."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
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
)
from us_phantom import STUDY, WHO, saved

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.us_image import FALLBACK_SPACING, read_ultrasound
from mrrp_pacs.phantom.dicom_objects import ultrasound_image

MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"


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



def test_phantom_image_reads_back_exactly_with_region_spacing(image, frame, tmp_path):
    read = read_ultrasound(saved(image, tmp_path))
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
    path = saved(image, tmp_path)
    np.testing.assert_array_equal(read_ultrasound(path).gray, frame.pixels)


def test_jpeg_ls_near_lossless_stays_within_its_error_bound(image, frame, tmp_path):
    image.compress(JPEGLSNearLossless, jls_error=2)
    error = np.abs(read_ultrasound(saved(image, tmp_path)).gray - frame.pixels)
    assert 0 < error.max() <= 2


def test_jpeg_2000_lossless_and_lossy_decode(image, frame, tmp_path):
    exact = io.BytesIO()
    Image.fromarray(frame.pixels).save(exact, format="JPEG2000", irreversible=False,
                                       no_jp2=True)
    path = saved(_encapsulated(image, exact.getvalue(), JPEG2000Lossless), tmp_path)
    np.testing.assert_array_equal(read_ultrasound(path).gray, frame.pixels)

    lossy = io.BytesIO()
    Image.fromarray(frame.pixels).save(lossy, format="JPEG2000", irreversible=True, no_jp2=True,
                                       quality_mode="rates", quality_layers=[4])
    ds = ultrasound_image(frame.pixels, 0.1, WHO, STUDY, "L", "j2k")
    path = saved(_encapsulated(ds, lossy.getvalue(), JPEG2000), tmp_path, "lossy.dcm")
    error = np.abs(read_ultrasound(path).gray - frame.pixels)
    assert 0 < error.mean() < 6


def test_jpeg_baseline_grayscale_and_ybr_full_422(image, frame, tmp_path):
    encoded = io.BytesIO()
    Image.fromarray(frame.pixels).save(encoded, format="JPEG", quality=95)
    path = saved(_encapsulated(image, encoded.getvalue(), JPEGBaseline8Bit), tmp_path)
    assert np.abs(read_ultrasound(path).gray - frame.pixels).mean() < 3

    rgb, luma = _colour(frame.pixels)
    encoded = io.BytesIO()
    Image.fromarray(rgb).save(encoded, format="JPEG", quality=95, subsampling=1)  # 4:2:2
    ds = ultrasound_image(frame.pixels, 0.1, WHO, STUDY, "L", "jpeg-rgb")
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = (
        3, "YBR_FULL_422", 0)
    path = saved(_encapsulated(ds, encoded.getvalue(), JPEGBaseline8Bit), tmp_path, "c.dcm")
    assert np.abs(read_ultrasound(path).gray - luma).mean() < 3


def test_jpeg_lossless_has_no_decoder_here_and_says_so(image, tmp_path):
    path = saved(_encapsulated(image, b"\xff\xd8\xff\xd9", JPEGLosslessSV1), tmp_path)
    expected = rf"{image.SOPInstanceUID}.*JPEG Lossless.*1\.2\.840\.10008\.1\.2\.4\.70.*no decoder"
    with pytest.raises(FeatureError, match=expected):
        read_ultrasound(path)


def test_monochrome1_is_inverted(image, frame, tmp_path):
    image.PhotometricInterpretation = "MONOCHROME1"
    image.PixelData = (255 - frame.pixels).tobytes()
    np.testing.assert_array_equal(read_ultrasound(saved(image, tmp_path)).gray,
                                  frame.pixels)


def test_rgb_and_ybr_full_become_luma(image, frame, tmp_path):
    rgb, luma = _colour(frame.pixels)
    read = read_ultrasound(saved(_as_colour(image, rgb, "RGB"), tmp_path))
    np.testing.assert_allclose(read.gray, luma, atol=1e-3)

    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds = _as_colour(ultrasound_image(frame.pixels, 0.1, WHO, STUDY, "L", "ybr"), ybr, "YBR_FULL")
    read = read_ultrasound(saved(ds, tmp_path, "ybr.dcm"))
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
    read = read_ultrasound(saved(image, tmp_path))
    assert np.abs(read.gray - luma).mean() < 1.5


def test_palette_colour_goes_through_the_lookup_table(image, frame, tmp_path):
    image.PhotometricInterpretation = "PALETTE COLOR"
    entries = ((255 - np.arange(256)) * 257).astype("<u2")  # reversed gray ramp, 16-bit entries
    for colour in ("Red", "Green", "Blue"):
        setattr(image, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(image, f"{colour}PaletteColorLookupTableData", entries.tobytes())
    image.PixelData = (255 - frame.pixels).tobytes()
    read = read_ultrasound(saved(image, tmp_path))
    np.testing.assert_allclose(read.gray, frame.pixels, atol=1e-3)


def test_multiframe_defaults_to_the_middle_frame(image, frame, tmp_path):
    frames = [frame.pixels, frame.pixels // 2, 255 - frame.pixels]
    image.SOPClassUID = image.file_meta.MediaStorageSOPClassUID = MULTIFRAME
    image.NumberOfFrames = 3
    image.FrameTime = 40.0
    image.FrameIncrementPointer = 0x00181063
    image.PixelData = np.stack(frames).tobytes()
    path = saved(image, tmp_path)
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
