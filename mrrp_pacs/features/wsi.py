"""Whole-slide images: open, find the tumour region, tile it.

The tumour region comes, in order of preference, from a DICOM Microscopy Bulk Simple
Annotations object on the slide, an ASAP XML or a QuPath GeoJSON sidecar, and otherwise from
tissue detection on a thumbnail (the case is then flagged ``automatic_roi``). Tiles of
``tile_px`` pixels at ``target_mpp`` µm/px are laid on a grid over the region; a tile is kept
when its centre is inside the region and enough of it is tissue; when more remain than
``max_tiles``, an evenly spaced subset (in grid order) is kept, so the choice is deterministic
and spread over the whole region.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from matplotlib.path import Path as PolygonPath
from wsidicom import WsiDicom

from mrrp_pacs.errors import FeatureError

LOGGER = logging.getLogger(__name__)

WSI_TILING_VERSION = "1"
THUMBNAIL_MPP = 16.0  # µm/px for tissue detection


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
    margin_px: int = 0  # context read around each tile, on every side (inside ``rgb``)


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
        raise FeatureError(f"slide {name} cannot be opened: {exc}") from exc
    if not wsi.levels or min(wsi.size.width, wsi.size.height) < 1:
        raise FeatureError(f"slide {name} has no usable pyramid level")
    return wsi


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


def detect_tissue(wsi: WsiDicom) -> tuple[np.ndarray, float]:
    """Tissue mask at about :data:`THUMBNAIL_MPP` µm/px and its µm/px.

    Tissue is where the optical density summed over RGB exceeds 0.15 (glass is near white);
    the threshold suits brightfield H&E.
    """
    size_mm = (wsi.size.width * wsi.mpp.width / 1000, wsi.size.height * wsi.mpp.height / 1000)
    thumb = np.asarray(wsi.read_region_mpp((0.0, 0.0), THUMBNAIL_MPP, size_mm, as_array=True))
    od = -np.log(np.clip(thumb[..., :3].astype(np.float32) / 255.0, 1 / 255, 1.0)).sum(axis=-1)
    return od > 0.15, THUMBNAIL_MPP


def region_from_tissue(wsi: WsiDicom) -> list[np.ndarray]:
    """The tissue's bounding polygon(s) in level-0 pixels (automatic region)."""
    from skimage.measure import find_contours, label

    mask, mpp = detect_tissue(wsi)
    if not mask.any():
        return []
    labels = label(mask)
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    # padded so that tissue touching the slide edge still gives one closed contour
    contours = find_contours(np.pad((labels == largest).astype(float), 1), 0.5)
    contour = max(contours, key=len) - 1  # (row, col) at thumbnail scale
    scale = mpp / wsi.mpp.width
    return [np.column_stack([contour[:, 1], contour[:, 0]]) * scale]


def tile_region(wsi: WsiDicom, region: Region, params: TilingParameters, name: str) -> Tiles:
    """Cut the tiles of ``region`` at ``params.target_mpp``.

    Raises
    ------
    FeatureError
        The region lies outside the slide or holds no tissue tile.
    """
    base_mpp = float(wsi.mpp.width)
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
    size_mm = (tile_um / 1000, tile_um / 1000)
    rgb = np.stack([
        np.asarray(wsi.read_region_mpp((float(x) / 1000, float(y) / 1000), params.target_mpp,
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


def read_squares(wsi: WsiDicom, centres_um: np.ndarray, size_px: int, mpp: float, name: str
                 ) -> tuple[np.ndarray, list[str]]:
    """Squares of ``size_px`` pixels at ``mpp`` µm/px centred on ``centres_um``.

    A square may reach beyond the slide (context around an edge tile): that part is white
    glass. When ``mpp`` is finer than the slide's finest level, the square is read at that
    level and interpolated (bilinear) to ``mpp``, and the result is flagged
    :data:`UPSAMPLED`: a model trained at 0.25 µm/px then sees nuclei of the right size in
    pixels, though without the detail a 0.25 µm/px scan would hold.

    Parameters
    ----------
    wsi
        The open slide.
    centres_um
        (n, 2) x, y from the image origin, µm.
    size_px
        Side of each square in pixels at ``mpp``.
    mpp
        µm/px of the squares.
    name
        The slide, for error messages.

    Returns
    -------
    rgb, flags
        (n, size_px, size_px, 3) uint8 and the flags of the read.
    """
    from skimage.transform import resize

    base_mpp = float(wsi.mpp.width)
    read_mpp = max(mpp, base_mpp)
    upsampled = read_mpp > mpp * 1.01
    slide_um = np.array([wsi.size.width, wsi.size.height], float) * base_mpp
    side_um = size_px * mpp
    read_px = round(side_um / read_mpp)
    out = np.empty((len(centres_um), size_px, size_px, 3), np.uint8)
    for index, centre in enumerate(np.asarray(centres_um, float)):
        corner = centre - side_um / 2
        lo = np.clip(corner, 0.0, slide_um)
        hi = np.clip(corner + side_um, 0.0, slide_um)
        canvas = np.full((read_px, read_px, 3), GLASS_RGB, np.uint8)
        if np.all(hi - lo >= read_mpp):
            part = np.asarray(wsi.read_region_mpp(
                (float(lo[0]) / 1000, float(lo[1]) / 1000), read_mpp,
                (float(hi[0] - lo[0]) / 1000, float(hi[1] - lo[1]) / 1000),
                as_array=True))[..., :3]
            col, row = np.round((lo - corner) / read_mpp).astype(int)
            part = part[: read_px - row, : read_px - col]
            canvas[row : row + part.shape[0], col : col + part.shape[1]] = part
        if canvas.shape[:2] != (size_px, size_px):
            canvas = np.clip(resize(canvas.astype(np.float32), (size_px, size_px), order=1,
                                    preserve_range=True, anti_aliasing=False) + 0.5,
                             0, 255).astype(np.uint8)
        out[index] = canvas
    if upsampled:
        LOGGER.info("slide %s: finest level %.3g µm/px, read at %.3g µm/px by interpolation",
                    name, base_mpp, mpp)
    return out, [UPSAMPLED] if upsampled else []
