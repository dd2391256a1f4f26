"""Whole-slide images: open, find the tumour region, tile it.

The tumour region comes, in order of preference, from a DICOM Microscopy Bulk Simple
Annotations object on the slide, an ASAP XML or a QuPath GeoJSON sidecar, and otherwise from
tissue detection on a low-resolution pyramid level (the case is then flagged ``automatic_roi``).
Tiles of ``tile_px`` pixels at ``target_mpp`` µm/px are laid on a grid over the region; a
tile is kept when its centre is inside the region and enough of it is tissue; when more remain
than ``max_tiles``, an evenly spaced subset (in grid order) is kept, so the choice is
deterministic and spread over the whole region.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from matplotlib.path import Path as PolygonPath
from scipy import ndimage
from wsidicom import WsiDicom

from mrrp_pacs.errors import FeatureError

LOGGER = logging.getLogger(__name__)

WSI_TILING_VERSION = "2"  # 2: Otsu tissue detection, every fragment kept
# Tissue detection (detect_tissue): the level read, and what counts as a fragment.
TISSUE_MIN_LEVEL_PX = 512  # shorter side of the smallest pyramid level that is read
TISSUE_MAX_READ_PX = 16_000_000  # pixels decoded at once; larger levels are read in bands
TISSUE_MIN_AREA_UM2 = 20_000.0  # fragments (and holes) below this are dropped (filled)
TISSUE_MIN_OD = 0.2  # summed OD; the Otsu threshold never goes below (an all-glass slide)
TISSUE_OD_CAP = 1.0  # summed OD above this is surely tissue: capped before Otsu
TISSUE_SMOOTH_UM = 8.0  # Gaussian sigma before thresholding: tissue scale, nuclei blurred in


@dataclass(frozen=True)
class TilingParameters:
    target_mpp: float = 0.5
    tile_px: int = 224
    max_tiles: int = 64
    min_tissue_fraction: float = 0.5

    def key(self) -> str:
        return (f"tiling{WSI_TILING_VERSION}:{self.target_mpp}:{self.tile_px}:{self.max_tiles}:"
                f"{self.min_tissue_fraction}")


@dataclass
class Region:
    """Polygons in level-0 pixels (x = column, y = row) and where they came from."""

    polygons_px: list[np.ndarray]
    source: str  # annotation | asap | geojson | automatic

    @property
    def automatic(self) -> bool:
        return self.source == "automatic"


@dataclass
class Tiles:
    """Tiles of one slide: pixels and where they are."""

    rgb: np.ndarray  # (n, tile_px, tile_px, 3) uint8
    centres_um: np.ndarray  # (n, 2) x, y from the image origin, µm
    mpp: float
    flags: list[str] = field(default_factory=list)


def open_slide(paths: list[Path], name: str) -> WsiDicom:
    """Open the pyramid made of ``paths`` (object-store files of one series).

    Raises
    ------
    FeatureError
        No readable level (``name`` identifies the slide in the message).
    """
    try:
        wsi = WsiDicom.open(paths)
    except Exception as exc:  # wsidicom raises many types for unusable input
        raise FeatureError(f"slide {name} cannot be opened: {exc}{_untyped_levels(paths)}"
                           ) from exc
    if not wsi.levels or min(wsi.size.width, wsi.size.height) < 1:
        raise FeatureError(f"slide {name} has no usable pyramid level")
    return wsi


def _untyped_levels(paths: list[Path]) -> str:
    """A hint when some files have no ImageType: readers find pyramid levels by its VOLUME
    value (Orthanc's WSI Dicomizer writes none unless given a dataset that has it)."""
    untyped = 0
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ImageType"])
        except Exception:  # noqa: S112 - unreadable files are already in the error
            continue
        untyped += "ImageType" not in header
    if not untyped:
        return ""
    return (f" ({untyped} of its {len(paths)} files have no ImageType, which names a pyramid "
            "level VOLUME: the producer must write it)")


def region_from_annotation(annotation: Path, level0: pydicom.Dataset) -> list[np.ndarray]:
    """Tumour polygons of a bulk annotation object, converted to level-0 pixels."""
    from mrrp_pacs.intake.dicom import read_meta

    rois = [r for r in read_meta(annotation).rois
            if r.graphic_type in ("POLYGON", "POLYLINE", "RECTANGLE", "ELLIPSE") and r.shapes]
    polygons: list[np.ndarray] = []
    to_pixels = None
    for roi in rois:
        for shape in roi.shapes or []:
            points = np.asarray(shape, dtype=np.float64)
            if roi.coordinate_space == "frame_mm":
                if to_pixels is None:
                    to_pixels = hd.spatial.ReferenceToImageTransformer.for_image(
                        level0, for_total_pixel_matrix=True)
                points = to_pixels(points)[:, :2]
            polygons.append(points[:, :2])
    return [p for p in polygons if len(p) >= 3]


def region_from_sidecar(data: bytes, name: str) -> list[np.ndarray]:
    """Polygons (level-0 pixels) of an ASAP XML or QuPath GeoJSON sidecar."""
    from mrrp_pacs.errors import SidecarError
    from mrrp_pacs.intake.sidecars import polygons

    try:
        return polygons(data)
    except SidecarError as exc:
        raise FeatureError(f"region file {name} {exc}") from None


def detect_tissue(wsi: WsiDicom, *, min_level_px: int = TISSUE_MIN_LEVEL_PX,
                  max_read_px: int = TISSUE_MAX_READ_PX,
                  min_area_um2: float = TISSUE_MIN_AREA_UM2) -> tuple[np.ndarray, float]:
    """Tissue mask of the whole slide at a low resolution, and its µm/px.

    The mask is read from the smallest pyramid level whose shorter side still has
    ``min_level_px`` pixels (the base level when none has). A level of more than
    ``max_read_px`` pixels (low levels missing, e.g. a pyramid of one level) is never decoded
    whole: it is read in bands of at most ``max_read_px`` pixels, each averaged down by the
    integer factor that brings the shorter side to about ``min_level_px``.

    Tissue is where the optical density summed over RGB, smoothed to tissue scale
    (:data:`TISSUE_SMOOTH_UM`), exceeds an Otsu threshold of that density over the slide (capped
    at :data:`TISSUE_OD_CAP`), and never below :data:`TISSUE_MIN_OD`: tinted or greyish glass
    (RGB 225-235, summed OD 0.25-0.38) falls below the threshold that separates it from
    stained tissue, where a fixed threshold near white would call it tissue. Every connected
    component of at least ``min_area_um2`` µm² is kept (fragmented biopsies); smaller specks
    and holes smaller than that are cleaned.

    Returns
    -------
    mask : np.ndarray
        (rows, cols) bool over the whole slide, True = tissue.
    mpp : float
        µm per mask pixel.
    """
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_holes, remove_small_objects

    rgb, mpp = _low_resolution_rgb(wsi, min_level_px, max_read_px)
    od = -np.log(np.clip(rgb.astype(np.float32) / 255.0, 1 / 255, 1.0)).sum(axis=-1)
    # At tissue scale, not nuclear scale: on a fine level the dark nuclei make a third mode that
    # Otsu would split off (seen on 1 µm/px levels: threshold 0.95, no tissue left).
    od = ndimage.gaussian_filter(od, TISSUE_SMOOTH_UM / mpp)
    capped = np.minimum(od, TISSUE_OD_CAP)
    threshold = TISSUE_MIN_OD
    if float(capped.max()) > float(capped.min()):
        threshold = max(TISSUE_MIN_OD, float(threshold_otsu(capped)))
    min_px = max(1, round(min_area_um2 / (mpp * mpp)))
    mask = remove_small_objects(od > threshold, max_size=min_px - 1)
    mask = remove_small_holes(mask, max_size=min_px - 1)
    LOGGER.debug("tissue mask at %.2f µm/px, OD threshold %.3f, %.1f %% tissue", mpp,
                 threshold, 100 * mask.mean())
    return mask, mpp


def _low_resolution_rgb(wsi: WsiDicom, min_level_px: int, max_read_px: int
                        ) -> tuple[np.ndarray, float]:
    """The whole slide as (rows, cols, 3) uint8 at low resolution, and its µm/px."""
    levels = sorted(wsi.levels, key=lambda lv: lv.size.width * lv.size.height)
    big_enough = [lv for lv in levels if min(lv.size.width, lv.size.height) >= min_level_px]
    level = big_enough[0] if big_enough else levels[-1]
    width, height = level.size.width, level.size.height
    mpp = float(level.mpp.width)
    if width * height <= max_read_px:
        rgb = np.asarray(wsi.read_region((0, 0), level.level, (width, height), as_array=True))
        return rgb[..., :3], mpp
    factor = max(1, min(width, height) // min_level_px)
    if width * factor > max_read_px:
        raise FeatureError(f"the slide's smallest usable level is {width} px wide: too wide to "
                           f"read {factor} rows at a time within {max_read_px} pixels")
    band = max(factor, max_read_px // width // factor * factor)
    out_rows, out_cols = height // factor, width // factor
    out = np.empty((out_rows, out_cols, 3), np.uint8)
    for row in range(0, out_rows * factor, band):
        rows = min(band, out_rows * factor - row)
        part = np.asarray(wsi.read_region((0, row), level.level, (out_cols * factor, rows),
                                          as_array=True))[..., :3].astype(np.float32)
        pooled = part.reshape(rows // factor, factor, out_cols, factor, 3).mean(axis=(1, 3))
        out[row // factor : (row + rows) // factor] = np.round(pooled).astype(np.uint8)
    return out, mpp * factor


def region_from_tissue(wsi: WsiDicom) -> list[np.ndarray]:
    """One outline per tissue fragment, in level-0 pixels (the automatic region).

    Every component of the tissue mask (:func:`detect_tissue`, which already dropped those
    under the area floor) gives the polygon of its outer boundary.
    """
    from skimage.measure import find_contours, label

    mask, mpp = detect_tissue(wsi)
    labels, count = label(mask, return_num=True)
    scale = mpp / float(wsi.mpp.width)
    polygons = []
    for component in range(1, count + 1):
        # padded so that tissue touching the slide edge still gives one closed contour
        contours = find_contours(np.pad((labels == component).astype(float), 1), 0.5)
        contour = max(contours, key=len) - 1  # (row, col) at mask scale
        polygons.append(np.column_stack([contour[:, 1], contour[:, 0]]) * scale)
    return polygons


MPP_TOLERANCE = 1e-3
"""Relative difference between a level's µm/px and the one asked for that counts as equal.
Producers round the pixel spacing they write (Orthanc's WSI Dicomizer writes 0.5 µm/px as
``0.000500000024`` mm, a float32 printed), and wsidicom reads only from levels at least as fine as
asked: asking such a slide for 0.5 µm/px finds no level at all."""


def reading_mpp(base_mpp: float, target_mpp: float, name: str) -> float:
    """The µm/px to ask wsidicom for so that tiles come at ``target_mpp``.

    ``target_mpp`` itself, unless the base level is coarser than it only by a producer's
    rounding (:data:`MPP_TOLERANCE`): then the base level's own.

    Raises
    ------
    FeatureError
        The base level is coarser than ``target_mpp``: the slide was scanned at a lower
        resolution than the features need.
    """
    if base_mpp <= target_mpp:
        return target_mpp
    if base_mpp <= target_mpp * (1 + MPP_TOLERANCE):
        return base_mpp
    raise FeatureError(f"slide {name} was scanned at {base_mpp:.4g} µm/px, coarser than the "
                       f"{target_mpp:.4g} µm/px its tiles are read at")


def tile_region(wsi: WsiDicom, region: Region, params: TilingParameters, name: str) -> Tiles:
    """Cut the tiles of ``region`` at ``params.target_mpp``.

    Raises
    ------
    FeatureError
        The region lies outside the slide or holds no tissue tile.
    """
    base_mpp = float(wsi.mpp.width)
    read_mpp = reading_mpp(base_mpp, params.target_mpp, name)
    tile_um = params.tile_px * params.target_mpp
    paths = [PolygonPath(p) for p in region.polygons_px]
    all_points = np.concatenate(region.polygons_px)
    x_lo, y_lo = np.clip(all_points.min(axis=0), 0, None) * base_mpp
    x_hi = min(all_points[:, 0].max(), wsi.size.width) * base_mpp
    y_hi = min(all_points[:, 1].max(), wsi.size.height) * base_mpp
    if x_hi - x_lo < tile_um or y_hi - y_lo < tile_um:
        raise FeatureError(f"slide {name}: the tumour region is smaller than one tile or "
                           "outside the slide")
    xs = np.arange(x_lo, x_hi - tile_um + 1e-6, tile_um)
    ys = np.arange(y_lo, y_hi - tile_um + 1e-6, tile_um)
    corners = np.array([(x, y) for y in ys for x in xs])
    centres_px = (corners + tile_um / 2) / base_mpp
    inside = np.zeros(len(corners), dtype=bool)
    for path in paths:
        inside |= path.contains_points(centres_px)
    tissue, tissue_mpp = detect_tissue(wsi)
    cells = np.clip(((corners + tile_um / 2) / tissue_mpp).astype(int), 0,
                    np.array(tissue.shape[::-1]) - 1)
    half = max(1, int(tile_um / tissue_mpp / 2))
    fractions = np.array([tissue[max(0, r - half) : r + half, max(0, c - half) : c + half].mean()
                          for c, r in cells])
    keep = np.flatnonzero(inside & (fractions >= params.min_tissue_fraction))
    if len(keep) == 0:
        raise FeatureError(f"slide {name}: no tissue tile inside the tumour region")
    if len(keep) > params.max_tiles:
        keep = keep[np.round(np.linspace(0, len(keep) - 1, params.max_tiles)).astype(int)]
    # a hair more than tile_px: wsidicom floors size / spacing, which float rounding can put
    # one pixel short
    side_mm = params.tile_px * read_mpp * (1 + 1e-9) / 1000
    size_mm = (side_mm, side_mm)
    rgb = np.stack([
        np.asarray(wsi.read_region_mpp((float(x) / 1000, float(y) / 1000), read_mpp,
                                       size_mm, as_array=True))[: params.tile_px,
                                                                : params.tile_px, :3]
        for x, y in corners[keep]
    ])
    if rgb.shape[1:3] != (params.tile_px, params.tile_px):
        raise FeatureError(f"slide {name}: tiles came back as {rgb.shape[1:3]}, not "
                           f"{params.tile_px} px")
    flags = ["automatic_roi"] if region.automatic else []
    return Tiles(rgb.astype(np.uint8), corners[keep] + tile_um / 2, params.target_mpp, flags)


UPSAMPLED = "tiles_upsampled"  # flag: the slide's finest level is coarser than was asked for
GLASS_RGB = 255  # what is read beyond the slide's edge


def upsampled(wsi: WsiDicom, mpp: float) -> bool:
    """Whether reading ``mpp`` µm/px from ``wsi`` needs interpolation: its finest level is
    coarser than ``mpp`` by more than a producer's rounding (:data:`MPP_TOLERANCE`)."""
    return float(wsi.mpp.width) > mpp * (1 + MPP_TOLERANCE)


def read_region_um(wsi: WsiDicom, x_um: float, y_um: float, width_um: float, height_um: float,
                   mpp: float, name: str = "slide") -> np.ndarray:
    """(rows, cols, 3) uint8 pixels of a rectangle at ``mpp`` µm/px, µm from the slide origin.

    rows = round(height_um / mpp), cols = round(width_um / mpp). The part outside the slide
    (a context margin at the slide's edge) is white, like glass. When ``mpp`` is finer than the
    slide's finest level (:func:`upsampled`), the rectangle is read at that level and
    interpolated (bilinear): a model trained at 0.25 µm/px then sees nuclei of the right size
    in pixels, though without the detail a 0.25 µm/px scan would hold; callers flag it
    (:data:`UPSAMPLED`).

    Raises
    ------
    FeatureError
        The slide cannot be read at that resolution (``name`` identifies it).
    """
    rows, cols = round(height_um / mpp), round(width_um / mpp)
    base_mpp = float(wsi.mpp.width)
    read_mpp = max(mpp, base_mpp)
    scale = mpp / read_mpp  # output pixels per read pixel, <= 1
    read_rows, read_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
    out = np.full((read_rows, read_cols, 3), GLASS_RGB, np.uint8)
    x0, y0 = max(x_um, 0.0), max(y_um, 0.0)
    # a hair inside the last pixel, so that float rounding never reaches past the slide
    x1 = min(x_um + width_um, (wsi.size.width - 0.01) * base_mpp)
    y1 = min(y_um + height_um, (wsi.size.height - 0.01) * base_mpp)
    if x1 > x0 and y1 > y0:
        try:
            # a hair more: wsidicom floors size / spacing, which rounding can put a pixel short
            hair = 1 + 1e-9
            part = np.asarray(wsi.read_region_mpp((x0 / 1000, y0 / 1000), read_mpp,
                                                  ((x1 - x0) * hair / 1000,
                                                   (y1 - y0) * hair / 1000),
                                                  as_array=True))[..., :3]
        except Exception as exc:  # wsidicom raises its own types for a missing resolution
            raise FeatureError(f"{name}: cannot read {mpp} µm/px from this pyramid (base "
                               f"{base_mpp} µm/px): {exc}") from exc
        r0, c0 = round((y0 - y_um) / read_mpp), round((x0 - x_um) / read_mpp)
        h, w = min(part.shape[0], read_rows - r0), min(part.shape[1], read_cols - c0)
        out[r0 : r0 + h, c0 : c0 + w] = part[:h, :w]
    if out.shape[:2] == (rows, cols):
        return out
    from skimage.transform import resize

    return np.clip(resize(out.astype(np.float32), (rows, cols), order=1, preserve_range=True,
                          anti_aliasing=False) + 0.5, 0, 255).astype(np.uint8)
