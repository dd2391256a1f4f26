from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as PolygonPath

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.wsi import (
    UPSAMPLED,
    Region,
    TilingParameters,
    open_slide,
    read_squares,
    region_from_annotation,
    region_from_sidecar,
    region_from_tissue,
    tile_region,
)
from mrrp_pacs.phantom.dicom_objects import tumour_region_annotation
from mrrp_pacs.phantom.histology import render_slide
from mrrp_pacs.phantom.wsi_dicom import SlideIdentity, write_wsi_pyramid

TRAITS = {"nuclear_size": 0.0, "pleomorphism": 0.0, "tumour_density": 0.0, "lymphocytes": 0.0,
          "lymph_clustering": 0.0}
PARAMS = TilingParameters(max_tiles=12)


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slide")
    slide = render_slide(np.random.default_rng(4), TRAITS, size_px=2048)
    identity = SlideIdentity("W1", "PHANTOM", "PHANTOM^W1", "19700101", "F", "1.2.3.4", "PA1",
                             "1", "20200101", "090000", "wsi-test", "W1-A1")
    levels = write_wsi_pyramid(slide.rgb, 0.5, identity, folder)
    level0 = pydicom.dcmread(levels[0], stop_before_pixels=True)
    annotation = tumour_region_annotation(level0, slide.tumour_polygon_px, "R", "wsi-test")
    annotation.save_as(folder / "ann.dcm", enforce_file_format=True)
    return slide, levels, folder / "ann.dcm"


def test_annotation_region_round_trips_to_pixels(slide_files):
    slide, levels, annotation = slide_files
    level0 = pydicom.dcmread(levels[0], stop_before_pixels=True)
    (polygon,) = region_from_annotation(annotation, level0)
    assert np.abs(polygon - slide.tumour_polygon_px).max() < 0.01


def test_tiles_lie_in_the_region_and_are_deterministic(slide_files):
    slide, levels, annotation = slide_files
    wsi = open_slide(levels, "W1")
    polygons = region_from_annotation(annotation, pydicom.dcmread(levels[0],
                                                                  stop_before_pixels=True))
    tiles = tile_region(wsi, Region(polygons, "annotation"), PARAMS, "W1")
    assert tiles.rgb.shape == (12, 224, 224, 3) and tiles.flags == []
    inside = PolygonPath(slide.tumour_polygon_px).contains_points(tiles.centres_um / 0.5)
    assert inside.all()
    # tiles are the slide's pixels (JPEG tolerance)
    x, y = (tiles.centres_um[0] / 0.5 - 112).astype(int)
    original = slide.rgb[y : y + 224, x : x + 224].astype(float)
    assert np.abs(tiles.rgb[0].astype(float) - original).mean() < 6
    again = tile_region(wsi, Region(polygons, "annotation"), PARAMS, "W1")
    assert np.array_equal(again.rgb, tiles.rgb)


def test_asap_sidecar_gives_the_same_tiles(slide_files):
    slide, levels, annotation = slide_files
    coordinates = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>'
                          for i, (x, y) in enumerate(slide.tumour_polygon_px))
    asap = (f'<ASAP_Annotations><Annotations><Annotation Name="t" Type="Polygon"><Coordinates>'
            f"{coordinates}</Coordinates></Annotation></Annotations></ASAP_Annotations>").encode()
    wsi = open_slide(levels, "W1")
    from_sidecar = tile_region(wsi, Region(region_from_sidecar(asap, "r.xml"), "asap"), PARAMS,
                               "W1")
    polygons = region_from_annotation(annotation, pydicom.dcmread(levels[0],
                                                                  stop_before_pixels=True))
    from_dicom = tile_region(wsi, Region(polygons, "annotation"), PARAMS, "W1")
    assert np.allclose(from_sidecar.centres_um, from_dicom.centres_um)


def test_without_annotation_tissue_detection_is_flagged(slide_files):
    _, levels, _ = slide_files
    wsi = open_slide(levels, "W1")
    region = Region(region_from_tissue(wsi), "automatic")
    tiles = tile_region(wsi, region, PARAMS, "W1")
    assert tiles.flags == ["automatic_roi"] and len(tiles.rgb) == 12
    # no glass tile: every tile is mostly stained
    assert (tiles.rgb.mean(axis=(1, 2, 3)) < 235).all()


def test_unusable_slides_say_which(tmp_path: Path, slide_files):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 200)
    with pytest.raises(FeatureError, match="slide S-9"):
        open_slide([junk], "S-9")
    _, levels, _ = slide_files
    wsi = open_slide(levels, "W1")
    outside = Region([np.array([[-500.0, -500.0], [-400.0, -500.0], [-400.0, -400.0]])],
                     "asap")
    with pytest.raises(FeatureError, match="slide W1: the tumour region"):
        tile_region(wsi, outside, PARAMS, "W1")


def test_squares_at_another_resolution_with_context_beyond_the_edge(slide_files):
    slide, levels, _ = slide_files
    wsi = open_slide(levels, "W1")
    centres_um = np.array([[300.0, 400.0], [5.0, 10.0]])  # the second reaches past the corner
    same, flags = read_squares(wsi, centres_um, 64, 0.5, "W1")
    assert same.shape == (2, 64, 64, 3) and flags == []
    x, y = (centres_um[0] / 0.5 - 32).astype(int)
    assert np.abs(same[0].astype(float) - slide.rgb[y : y + 64, x : x + 64]).mean() < 6
    # beyond the slide is white glass; inside, the slide's pixels
    assert (same[1, :, :22] == 255).all() and (same[1, :12] == 255).all()
    assert np.abs(same[1, 12:, 22:].astype(float) - slide.rgb[:52, :42]).mean() < 6

    fine, flags = read_squares(wsi, centres_um[:1], 128, 0.25, "W1")  # finer than the scan
    assert fine.shape == (1, 128, 128, 3) and flags == [UPSAMPLED]
    back = fine[0].reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(back - same[0]).mean() < 6  # the same field, twice the pixels
    coarse, flags = read_squares(wsi, centres_um[:1], 32, 1.0, "W1")
    assert coarse.shape == (1, 32, 32, 3) and flags == []
    wsi.close()
