"""Slides from another producer: Orthanc's WSI Dicomizer (Debian ``orthanc-wsi``).

The phantom's own pyramids are written by this project (``write_wsi_pyramid``: JPEG, 256-px
tiles, TILED_FULL, every level down to one tile). A hospital's slides come from scanners and
converters that do it their own way. The Dicomizer turns the same phantom pixels into pyramids
with JPEG 2000, tiles of 240 px (edge tiles cut short), per-frame positions (the sparse layout:
no TILED_FULL), a rounded pixel spacing (0.5 µm/px written as ``0.000500000024`` mm) and only
the levels it is asked for (here 2, and 1: no low levels at all). The same region is then read
from each and the features compared:

- lossless JPEG 2000: the tiles are the very pixels the producer was given, so the features are
  those of the source pixels, exactly;
- against the project's own (JPEG q90) pyramid, and the Dicomizer's JPEG q85 single-level one:
  each tile's ``hed-texture`` vector within cosine 0.9995, nucleus count and mean nuclear area of
  the region within 5 % (docs/features.md, "Slides from other producers").
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from tools import tool

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.encoders import build_encoder
from mrrp_pacs.features.nuclei import ClassicalSegmenter
from mrrp_pacs.features.wsi import (
    Region,
    TilingParameters,
    open_slide,
    reading_mpp,
    region_from_tissue,
    tile_region,
)
from mrrp_pacs.phantom.histology import render_slide
from mrrp_pacs.phantom.wsi_dicom import SlideIdentity, write_wsi_pyramid

MPP = 0.5
SIZE_PX = 2048
TRAITS = {"nuclear_size": 0.0, "pleomorphism": 0.0, "tumour_density": 0.0, "lymphocytes": 0.0,
          "lymph_clustering": 0.0}
PARAMS = TilingParameters(target_mpp=MPP, max_tiles=6)
PRODUCERS = {
    "jpeg2000-240px-2-levels": ["--compression", "jpeg2000", "--tile-width", "240",
                                "--tile-height", "240", "--pyramid", "1", "--levels", "2"],
    "jpeg85-512px-1-level": ["--compression", "jpeg", "--jpeg-quality", "85", "--tile-width",
                             "512", "--tile-height", "512", "--pyramid", "1", "--levels", "1"],
}


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """The phantom slide, its own pyramid and one Dicomizer pyramid per producer setting."""
    folder = tmp_path_factory.mktemp("foreign")
    slide = render_slide(np.random.default_rng(4), TRAITS, size_px=SIZE_PX, mpp=MPP)
    identity = SlideIdentity("F1", "PHANTOM", "PHANTOM^F1", "19700101", "F", "1.2.3.5", "PF1",
                             "1", "20200101", "090000", "foreign-test", "F1-A1")
    pyramids = {"own": write_wsi_pyramid(slide.rgb, MPP, identity, folder / "own")}
    Image.fromarray(slide.rgb).save(folder / "slide.png")
    # the Dicomizer's sample dataset has ImageType; without one it writes none (Type 1 in the
    # VL Whole Slide Microscopy IOD) and no reader finds a level
    dataset = {"PatientID": "F1", "PatientName": "PHANTOM^F1",
               "ImageType": "DERIVED\\PRIMARY\\VOLUME\\NONE"}
    (folder / "dataset.json").write_text(json.dumps(dataset))
    side_mm = str(SIZE_PX * MPP / 1000)
    for name, options in PRODUCERS.items():
        out = folder / name
        out.mkdir()
        subprocess.run([tool("OrthancWSIDicomizer"), "--dataset", str(folder / "dataset.json"),
                        "--folder", str(out), "--imaged-width", side_mm, "--imaged-height",
                        side_mm, "--threads", "1", *options, str(folder / "slide.png")],
                       check=True, capture_output=True, timeout=300)
        pyramids[name] = sorted(out.glob("*.dcm"))
    return slide, pyramids


def _region_tiles(paths: list[Path], slide) -> tuple[np.ndarray, np.ndarray]:
    wsi = open_slide(paths, "F1")
    tiles = tile_region(wsi, Region([slide.tumour_polygon_px], "annotation"), PARAMS, "F1")
    return tiles.rgb, tiles.centres_um


def _source_pixels(slide, centres_um: np.ndarray) -> np.ndarray:
    """The source image's pixels under tiles centred at ``centres_um`` (wsidicom starts a
    region at the pixel holding its corner)."""
    half = PARAMS.tile_px / 2
    corners = np.floor(centres_um / MPP - half).astype(int)
    side = PARAMS.tile_px
    return np.stack([slide.rgb[y : y + side, x : x + side] for x, y in corners])


def _nuclei(rgb: np.ndarray) -> tuple[int, float]:
    """Nucleus count and mean area (px) over the tiles."""
    segmenter = ClassicalSegmenter()
    areas = np.concatenate([np.bincount(found.labels.ravel())[1:]
                            for found in (segmenter.segment(tile, MPP) for tile in rgb)])
    return len(areas), float(areas.mean())


needs_dicomizer = pytest.mark.needs_tool("OrthancWSIDicomizer")


@needs_dicomizer
def test_the_producer_writes_what_this_test_means_to_exercise(slides):
    _slide, pyramids = slides
    j2k = [pydicom.dcmread(p, stop_before_pixels=True)
           for p in pyramids["jpeg2000-240px-2-levels"]]
    assert len(j2k) == 2 and len(pyramids["jpeg85-512px-1-level"]) == 1
    for ds in j2k:
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
        assert ds.Columns == 240 and ds.TotalPixelMatrixColumns % 240 != 0
        assert "PerFrameFunctionalGroupsSequence" in ds  # sparse: each frame says where it is
        assert ds.get("DimensionOrganizationType") != "TILED_FULL"
    spacing = float(j2k[0].SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
                    .PixelSpacing[0])
    assert spacing != MPP / 1000 and spacing == pytest.approx(MPP / 1000, rel=1e-6)


@needs_dicomizer
def test_a_pyramid_without_image_type_is_refused_with_the_reason(slides, tmp_path):
    _slide, pyramids = slides
    source = pyramids["own"][0].parent.parent / "slide.png"
    subprocess.run([tool("OrthancWSIDicomizer"), "--folder", str(tmp_path), "--threads", "1",
                    "--pyramid", "1", "--levels", "1", str(source)],
                   check=True, capture_output=True, timeout=300)
    with pytest.raises(FeatureError, match=r"cannot be opened: .*1 of its 1 files have no "
                                           r"ImageType"):
        open_slide(sorted(tmp_path.glob("*.dcm")), "F1")


@needs_dicomizer
def test_lossless_producer_pyramid_gives_the_source_pixels_and_their_features(slides):
    slide, pyramids = slides
    rgb, centres = _region_tiles(pyramids["jpeg2000-240px-2-levels"], slide)
    source = _source_pixels(slide, centres)
    assert rgb.shape == (PARAMS.max_tiles, PARAMS.tile_px, PARAMS.tile_px, 3)
    np.testing.assert_array_equal(rgb, source)
    encoder = build_encoder("hed-texture")
    np.testing.assert_array_equal(encoder.encode(rgb, MPP), encoder.encode(source, MPP))


@needs_dicomizer
@pytest.mark.parametrize("producer", sorted(PRODUCERS))
def test_same_region_features_agree_with_the_projects_own_pyramid(slides, producer):
    slide, pyramids = slides
    own_rgb, own_centres = _region_tiles(pyramids["own"], slide)
    rgb, centres = _region_tiles(pyramids[producer], slide)
    np.testing.assert_allclose(centres, own_centres)
    encoder = build_encoder("hed-texture")
    own, theirs = encoder.encode(own_rgb, MPP), encoder.encode(rgb, MPP)
    cosine = (own * theirs).sum(1) / np.linalg.norm(own, axis=1) / np.linalg.norm(theirs, axis=1)
    assert cosine.min() >= 0.9995, cosine
    own_count, own_area = _nuclei(own_rgb)
    count, area = _nuclei(rgb)
    assert own_count > 100
    assert count == pytest.approx(own_count, rel=0.05)
    assert area == pytest.approx(own_area, rel=0.05)


@needs_dicomizer
@pytest.mark.parametrize("producer", sorted(PRODUCERS))
def test_tissue_found_on_a_producer_pyramid_matches_the_own_pyramid(slides, producer):
    _slide, pyramids = slides

    def area_px(paths: list[Path]) -> float:
        total = 0.0
        for polygon in region_from_tissue(open_slide(paths, "F1")):
            x, y = polygon[:, 0], polygon[:, 1]
            total += 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))
        return total

    own = area_px(pyramids["own"])
    assert own > 0.2 * SIZE_PX**2
    assert area_px(pyramids[producer]) == pytest.approx(own, rel=0.05)


@pytest.mark.parametrize(("base", "expected"),
                         [(0.25, 0.5), (0.5, 0.5), (0.500000024, 0.500000024)])
def test_tiles_are_read_at_the_target_or_at_a_base_level_equal_to_it_but_for_rounding(base,
                                                                                     expected):
    assert reading_mpp(base, 0.5, "F1") == expected


def test_a_slide_scanned_coarser_than_the_tiles_need_is_refused():
    with pytest.raises(FeatureError, match=r"scanned at 1 µm/px, coarser than the 0.5 µm/px"):
        reading_mpp(1.0, 0.5, "F1")
