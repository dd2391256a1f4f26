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
