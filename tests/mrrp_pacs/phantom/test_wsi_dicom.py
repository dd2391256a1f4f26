"""The phantom slide is a valid, readable, deterministic DICOM WSI pyramid."""

from __future__ import annotations

import hashlib
import io
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import generate_frames
from validators import dciodvfy_report
from wsidicom import WsiDicom

from mrrp_pacs.phantom.wsi_dicom import SlideIdentity, pyramid_uids, write_wsi_pyramid

MPP = 0.25
TILE = 256
# Not a multiple of the tile size, and odd at level 2 (275 -> 137), to exercise edge tiles
# and the dropped last column.
ROWS, COLS = 700, 1100
N_LEVELS = 4  # 1100, 550, 275, 137 px wide: level 3 is the first to fit in one tile


def _identity(seed: str = "phantom-P0001-A1") -> SlideIdentity:
    return SlideIdentity(
        patient_id="P0001", issuer_of_patient_id="PHANTOM", patient_name="PHANTOM^P0001",
        patient_birth_date="19680412", patient_sex="F",
        study_instance_uid=pydicom.uid.generate_uid(entropy_srcs=["study", seed]),
        accession_number="PA0001", study_id="1", study_date="20240311", study_time="093000",
        uid_seed=seed, container_identifier="P0001-A1",
    )


def _textured(rows: int, cols: int) -> np.ndarray:
    """A smooth pink/purple texture with mild noise, as a JPEG-friendly stand-in for H&E."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    wave = np.sin(xx / 9.0) * np.cos(yy / 13.0)
    blob = np.sin((xx + yy) / 31.0)
    rgb = np.stack([200 + 40 * wave, 150 + 60 * blob, 210 + 30 * wave * blob], axis=-1)
    noise = np.random.default_rng(7).normal(0.0, 3.0, rgb.shape)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def _downsample(image: np.ndarray, level: int) -> np.ndarray:
    out = image.astype(np.float64)
    for _ in range(level):
        rows, cols = out.shape[0] // 2, out.shape[1] // 2
        out = out[: rows * 2, : cols * 2].reshape(rows, 2, cols, 2, 3).mean(axis=(1, 3))
    return out


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return _textured(ROWS, COLS)


@pytest.fixture(scope="module")
def pyramid(image, tmp_path_factory) -> list[Path]:
    return write_wsi_pyramid(image, MPP, _identity(), tmp_path_factory.mktemp("wsi"),
                             tile_px=TILE)


def _sof_marker(frame: bytes) -> int:
    """The start-of-frame marker of a JPEG stream (0xC0 is baseline)."""
    i = 2
    while True:
        marker, length = frame[i + 1], int.from_bytes(frame[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        i += 2 + length


def test_levels_follow_the_iod(pyramid):
    uids = pyramid_uids(_identity())
    assert [p.name for p in pyramid] == [f"level-{k}.dcm" for k in range(N_LEVELS)]
    for level, path in enumerate(pyramid):
        ds = pydicom.dcmread(path)
        cols, rows = COLS >> level, ROWS >> level
        spacing_mm = MPP * 2**level / 1000
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.77.1.6"
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        assert ds.PhotometricInterpretation == "YBR_FULL_422"
        assert (ds.BitsAllocated, ds.BitsStored, ds.SamplesPerPixel) == (8, 8, 3)
        assert ds.DimensionOrganizationType == "TILED_FULL"
        assert list(ds.ImageType) == (["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if level == 0
                                      else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"])
        assert (ds.Rows, ds.Columns) == (TILE, TILE)
        assert (ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns) == (rows, cols)
        assert ds.NumberOfFrames == math.ceil(rows / TILE) * math.ceil(cols / TILE)
        measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        assert [float(v) for v in measures.PixelSpacing] == pytest.approx([spacing_mm] * 2)
        assert ds.ImagedVolumeWidth == pytest.approx(cols * spacing_mm)
        assert ds.ImagedVolumeHeight == pytest.approx(rows * spacing_mm)
        assert len(ds.OpticalPathSequence[0].ICCProfile) > 0
        assert ds.SOPInstanceUID == uids.sop_instance_uid(level)
        assert (ds.SeriesInstanceUID, ds.FrameOfReferenceUID, ds.PyramidUID) == (
            uids.series_instance_uid, uids.frame_of_reference_uid, uids.pyramid_uid)
        assert ds.SpecimenDescriptionSequence[0].SpecimenUID == uids.specimen_uid
        assert ds.ContainerIdentifier == "P0001-A1"

        frames = list(generate_frames(ds.PixelData, number_of_frames=ds.NumberOfFrames))
        assert len(frames) == ds.NumberOfFrames
        for frame in (frames[0], frames[-1]):  # an inner and a padded edge tile
            assert _sof_marker(frame) == 0xC0
            tile = Image.open(io.BytesIO(frame))
            assert tile.size == (TILE, TILE)
            # 4:2:2: luminance sampled 2x1, both chroma components 1x1
            assert [(h, v) for _, h, v, _ in tile.layer] == [(2, 1), (1, 1), (1, 1)]


@pytest.mark.needs_tool("dciodvfy")
def test_dciodvfy_finds_no_errors(pyramid):
    for path in pyramid:
        output = dciodvfy_report(path)
        assert "VLWholeSlideMicroscopyImage" in output, output  # the IOD it checked against
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        assert errors == [], f"{path.name}:\n{output}"


def test_wsidicom_reads_every_level(pyramid, image):
    with WsiDicom.open(pyramid[0].parent) as wsi:
        assert len(wsi.levels) == N_LEVELS
        stains = {code.meaning for code in wsi.metadata.slide.stainings[0].substances}
        assert stains == {"hematoxylin stain", "water soluble eosin stain"}
        for level in range(N_LEVELS):
            expected = _downsample(image, level)
            rows, cols = expected.shape[:2]
            assert wsi.levels[level].mpp.width == pytest.approx(MPP * 2**level)
            assert wsi.levels[level].mpp.height == pytest.approx(MPP * 2**level)
            region = np.asarray(wsi.read_region((0, 0), level, (cols, rows)))
            assert region.shape == (rows, cols, 3)
            assert np.abs(region.astype(np.float64) - expected).mean() < 6
            tile = np.asarray(wsi.read_tile(level, (0, 0)))
            assert np.abs(tile - expected[:TILE, :TILE]).mean() < 6


def test_same_inputs_give_identical_files_and_the_seed_changes_uids(image, tmp_path):
    def digests(paths: list[Path]) -> list[str]:
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]

    first = write_wsi_pyramid(image, MPP, _identity(), tmp_path / "a", tile_px=TILE)
    again = write_wsi_pyramid(image, MPP, _identity(), tmp_path / "b", tile_px=TILE)
    other = write_wsi_pyramid(image, MPP, _identity("phantom-P0002-A1"), tmp_path / "c",
                              tile_px=TILE)
    assert digests(first) == digests(again)
    assert set(digests(first)).isdisjoint(digests(other))

    uid_keywords = ("SOPInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PyramidUID")
    mine, theirs = pydicom.dcmread(first[0]), pydicom.dcmread(other[0])
    for keyword in uid_keywords:
        assert mine.get(keyword) != theirs.get(keyword), keyword
    assert (mine.DimensionOrganizationSequence[0].DimensionOrganizationUID
            != theirs.DimensionOrganizationSequence[0].DimensionOrganizationUID)
    assert (mine.SpecimenDescriptionSequence[0].SpecimenUID
            != theirs.SpecimenDescriptionSequence[0].SpecimenUID)


def test_highdicom_annotates_level_zero(pyramid):
    level0 = pydicom.dcmread(pyramid[0])
    group = hd.ann.AnnotationGroup(
        number=1, uid=hd.UID(), label="tumour",
        annotated_property_category=hd.sr.CodedConcept(
            "49755003", "SCT", "Morphologically abnormal structure"),
        annotated_property_type=hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
        graphic_type=hd.ann.GraphicTypeValues.POLYGON,
        graphic_data=[np.array([[0.01, 0.01, 0.0], [0.1, 0.01, 0.0], [0.1, 0.1, 0.0]])],
        algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.MANUAL,
    )
    annotations = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[level0],
        annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD3D,
        annotation_groups=[group], series_instance_uid=hd.UID(), series_number=2,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="mrrp-pacs",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0",
    )
    uids = pyramid_uids(_identity())
    identity = _identity()
    assert annotations.FrameOfReferenceUID == uids.frame_of_reference_uid
    assert annotations.ReferencedImageSequence[0].ReferencedSOPInstanceUID == (
        uids.sop_instance_uid(0))
    assert annotations.ReferencedSeriesSequence[0].SeriesInstanceUID == uids.series_instance_uid
    assert (annotations.StudyInstanceUID, annotations.PatientID, annotations.AccessionNumber) == (
        identity.study_instance_uid, identity.patient_id, identity.accession_number)


def test_min_levels_adds_levels_below_one_tile(tmp_path):
    paths = write_wsi_pyramid(_textured(100, 120), MPP, _identity(), tmp_path, min_levels=3)
    assert [pydicom.dcmread(p).TotalPixelMatrixColumns for p in paths] == [120, 60, 30]


@pytest.mark.parametrize(("array", "message"), [
    (np.zeros((64, 64, 3), dtype=np.uint16), "uint8"),
    (np.zeros((64, 64), dtype=np.uint8), "uint8"),
    (np.zeros((3, 64, 3), dtype=np.uint8), "too small"),
])
def test_rejects_unusable_images(array, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        write_wsi_pyramid(array, MPP, _identity(), tmp_path)
