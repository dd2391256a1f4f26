from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as PolygonPath
from scipy import ndimage

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.wsi import (
    Region,
    TilingParameters,
    detect_tissue,
    open_slide,
    read_region_um,
    region_from_annotation,
    region_from_sidecar,
    region_from_tissue,
    tile_region,
    upsampled,
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


# -- tissue detection on tinted glass -------------------------------------------------------
# The test's own slide (not the phantom's): greyish, tinted glass of RGB 225-235 and three
# H&E-coloured fragments of different shapes, plus a dust speck below the area floor.
GLASS_SLIDE_PX = 2048
GLASS_MPP = 0.5
FRAGMENTS = ((600, 500, 360, 170, 0.3), (1450, 620, 230, 210, 0.0), (1000, 1500, 420, 120, -0.5))


def _glass_slide() -> tuple[np.ndarray, np.ndarray]:
    """(rgb, truth mask): glass RGB 225-235, three fragments (cx, cy, rx, ry, angle)."""
    rng = np.random.default_rng(11)
    rows, cols = np.mgrid[:GLASS_SLIDE_PX, :GLASS_SLIDE_PX]
    tint = np.array([230.0, 228.0, 233.0])
    gradient = 3.0 * (cols / GLASS_SLIDE_PX - 0.5)[..., None]  # uneven illumination
    rgb = tint + gradient + rng.normal(0, 1.0, (GLASS_SLIDE_PX, GLASS_SLIDE_PX, 3))
    rgb = np.clip(rgb, 225, 235)
    truth = np.zeros((GLASS_SLIDE_PX, GLASS_SLIDE_PX), bool)
    for cx, cy, rx, ry, angle in FRAGMENTS:
        u = (cols - cx) * np.cos(angle) + (rows - cy) * np.sin(angle)
        v = -(cols - cx) * np.sin(angle) + (rows - cy) * np.cos(angle)
        truth |= (u / rx) ** 2 + (v / ry) ** 2 <= 1
    stroma = np.array([224.0, 168.0, 204.0])  # pale eosin
    pale = np.array([229.0, 196.0, 217.0])  # loose, barely stained stroma
    nucleus = np.array([110.0, 70.0, 150.0])
    patches = ndimage.uniform_filter(rng.uniform(size=truth.shape), 64) > 0.5
    tissue = np.where(patches[..., None], pale, stroma)
    # dark nuclei of ~5 µm over a fifth of the tissue: on a fine level they form a density
    # mode of their own, which a plain Otsu threshold splits off from the rest of the tissue
    nuclei = ndimage.binary_dilation(rng.uniform(size=truth.shape) < 0.004, iterations=5)
    tissue[nuclei & truth] = nucleus
    tissue += rng.normal(0, 3.0, tissue.shape)
    rgb = np.where(truth[..., None], tissue, rgb)
    speck = (cols - 1800) ** 2 + (rows - 1800) ** 2 <= 40**2  # 1250 µm² of dust
    rgb[speck] = (90, 80, 85)
    return np.clip(rgb, 0, 255).astype(np.uint8), truth


@pytest.fixture(scope="module")
def glass_slide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("glass")
    rgb, truth = _glass_slide()
    identity = SlideIdentity("G1", "TEST", "TEST^G1", "19700101", "F", "1.2.3.5", "PA2", "1",
                             "20200101", "090000", "glass-test", "G1-A1")
    return write_wsi_pyramid(rgb, GLASS_MPP, identity, folder), truth


@pytest.mark.parametrize("min_level_px", [512, 2048])  # 2 µm/px, and the base at 0.5 µm/px
def test_tissue_area_is_found_at_any_level(glass_slide, min_level_px):
    levels, truth = glass_slide
    mask, mpp = detect_tissue(open_slide(levels, "G1"), min_level_px=min_level_px)
    assert mpp == pytest.approx(GLASS_MPP * GLASS_SLIDE_PX / min_level_px)
    true_um2 = truth.sum() * GLASS_MPP**2
    assert abs(mask.sum() * mpp**2 - true_um2) / true_um2 < 0.10


def test_tinted_glass_is_not_tissue_and_every_fragment_is_kept(glass_slide):
    levels, truth = glass_slide
    wsi = open_slide(levels, "G1")
    true_um2 = truth.sum() * GLASS_MPP**2
    polygons = region_from_tissue(wsi)
    assert len(polygons) == 3  # the speck is dropped, no fragment is lost
    for cx, cy, *_ in FRAGMENTS:
        assert sum(PolygonPath(p).contains_point((cx, cy)) for p in polygons) == 1
    outlined = sum(0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], 1))
                             - np.dot(p[:, 1], np.roll(p[:, 0], 1))) for p in polygons)
    assert abs(outlined * GLASS_MPP**2 - true_um2) / true_um2 < 0.10


def _spy_reads(wsi, monkeypatch) -> list[tuple[int, tuple[int, int]]]:
    calls: list[tuple[int, tuple[int, int]]] = []
    read_region = wsi.read_region

    def spy(location, level, size, *args, **kwargs):
        calls.append((level, tuple(size)))
        return read_region(location, level, size, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("tissue detection must read pixel regions of one chosen level")

    monkeypatch.setattr(wsi, "read_region", spy)
    monkeypatch.setattr(wsi, "read_region_mpp", refuse)
    monkeypatch.setattr(wsi, "read_thumbnail", refuse)
    return calls


def test_tissue_is_read_from_the_smallest_level_big_enough(glass_slide, monkeypatch):
    levels, _ = glass_slide
    wsi = open_slide(levels, "G1")
    calls = _spy_reads(wsi, monkeypatch)
    mask, mpp = detect_tissue(wsi, min_level_px=512)
    # levels are 2048, 1024, 512, 256 and 128 px: only the 512-px one is decoded
    assert calls == [(2, (512, 512))]
    assert mask.shape == (512, 512) and mpp == pytest.approx(4 * GLASS_MPP)


def test_without_low_levels_the_base_is_read_in_bands(glass_slide, monkeypatch):
    levels, truth = glass_slide
    wsi = open_slide(levels[:1], "G1")  # a pyramid whose low levels are missing
    calls = _spy_reads(wsi, monkeypatch)
    budget = GLASS_SLIDE_PX * 300
    mask, mpp = detect_tissue(wsi, min_level_px=512, max_read_px=budget)
    assert len(calls) > 1 and all(level == 0 and w * h <= budget for level, (w, h) in calls)
    assert sum(h for _, (_, h) in calls) == GLASS_SLIDE_PX  # every row read once
    assert mpp == pytest.approx(4 * GLASS_MPP) and mask.shape == (512, 512)
    true_um2 = truth.sum() * GLASS_MPP**2
    assert abs(mask.sum() * mpp**2 - true_um2) / true_um2 < 0.10


def test_regions_at_another_resolution_with_context_beyond_the_edge(slide_files):
    slide, levels, _ = slide_files
    wsi = open_slide(levels, "W1")
    same = read_region_um(wsi, 284.0, 384.0, 32.0, 32.0, 0.5, "W1")
    assert same.shape == (64, 64, 3) and not upsampled(wsi, 0.5)
    assert np.abs(same.astype(float) - slide.rgb[768:832, 568:632]).mean() < 6
    # beyond the slide is white glass; inside, the slide's pixels
    corner = read_region_um(wsi, -11.0, -6.0, 32.0, 32.0, 0.5, "W1")
    assert (corner[:, :22] == 255).all() and (corner[:12] == 255).all()
    assert np.abs(corner[12:, 22:].astype(float) - slide.rgb[:52, :42]).mean() < 6

    fine = read_region_um(wsi, 284.0, 384.0, 32.0, 32.0, 0.25, "W1")  # finer than the scan
    assert fine.shape == (128, 128, 3) and upsampled(wsi, 0.25)
    back = fine.reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(back - same).mean() < 6  # the same field, twice the pixels
    coarse = read_region_um(wsi, 284.0, 384.0, 32.0, 32.0, 1.0, "W1")
    assert coarse.shape == (32, 32, 3) and not upsampled(wsi, 1.0)
    wsi.close()
