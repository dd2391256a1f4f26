"""Breast ultrasound branch of MRRP: frame reading, tumour ROI, crop, and the ResNet encoder.

Pipeline for one ultrasound instance::

    box = roi_from_sr(sr, uid)           # or roi_from_gsps(state, uid), roi_from_voc(xml)
    image = read_ultrasound(path, roi=box)   # luma in [0, 255] + (row, column) mm/px
    # no ROI drawn: box = automatic_lesion_candidate(image.gray, image.pixel_mm),
    #               and the case is flagged AUTOMATIC_ROI
    crop = crop_roi(image.gray, box)     # (256, 256) float32, box + 6 px margin
    tokens = encode_crops(model, crop[None])  # (1, 256, 64): the 16 × 16 map, 64-d tokens

Boxes are ``(x0, y0, x1, y1)``: inclusive pixel indices, x = column, y = row, of the
referenced frame (the convention of ``mrrp_pacs.phantom.ultrasound``).

The encoder (:class:`UsResNet`) is trained in this project without outcome labels, by 4-way
rotation prediction on lesion crops (:func:`train_us_encoder`), and kept in the model store
under kind ``us-encoder`` (:func:`save_us_encoder`, :func:`load_us_encoder`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import safetensors.torch
import torch
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, get_decoder
from scipy import ndimage
from skimage.transform import resize
from torch import nn
from torch.nn import functional

from model_store import ModelStore, ModelStoreError, ModelVersion
from mrrp_pacs.features.errors import FeatureError
from mrrp_pacs.intake.dicom import SR_CLASSES, US_CLASSES, DicomError, sr_rois
from mrrp_pacs.intake.sidecars import SidecarError, parse_xml

LOGGER = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
"""(x0, y0, x1, y1): inclusive pixel indices, x = column, y = row."""

DEFAULT_PIXEL_MM = 0.1
"""mm/px assumed when an image has neither a calibrated US region nor PixelSpacing."""
FALLBACK_SPACING = "fallback_spacing"
AUTOMATIC_ROI = "automatic_roi"

CROP_MARGIN_PX = 6
CROP_SIZE_PX = 256

# Region Spatial Format 1 = 2D; Physical Units 3 = cm (PS3.3 C.8.5.5.1.1, C.8.5.5.1.15)
_REGION_2D = 1
_REGION_TISSUE = 1
_UNITS_CM = 3
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as YBR_FULL's Y
_PRESENTATION_STATE_PREFIX = "1.2.840.10008.5.1.4.1.1.11."
_MAX_VOC_BYTES = 1 << 20  # a LabelImg file is ~1 kB; anything far larger is not one


@dataclass
class UltrasoundImage:
    """One ultrasound frame as grayscale.

    Attributes
    ----------
    gray : np.ndarray
        (rows, columns) float32 luma in [0, 255] (MONOCHROME1 inverted, colour → BT.601 luma).
    pixel_mm : tuple[float, float] | None
        (row, column) pixel size in mm; None only when no spacing is known and no default given.
    flags : list[str]
        ``fallback_spacing`` when the size did not come from a calibrated US region.
    sop_instance_uid : str
    frame : int
        0-based frame read.
    """

    gray: np.ndarray
    pixel_mm: tuple[float, float] | None
    flags: list[str] = field(default_factory=list)
    sop_instance_uid: str = ""
    frame: int = 0


# --------------------------------------------------------------------------- reading


def read_ultrasound(source: Path | Dataset, frame: int | None = None, source_name: str = "",
                    *, roi: Box | None = None,
                    default_pixel_mm: float | None = DEFAULT_PIXEL_MM) -> UltrasoundImage:
    """Read one frame of an Ultrasound (Multi-frame) Image as grayscale with its mm/px.

    Decoding goes through pydicom's pixel handlers; with this project's environment that is
    uncompressed (implicit/explicit VR little endian, deflated), RLE Lossless (pydicom),
    JPEG Baseline and JPEG 2000 lossless/lossy (Pillow) and JPEG-LS lossless/near-lossless
    (pyjpegls), each tested. JPEG Lossless (process 14) and HTJ2K have no decoder installed
    (pylibjpeg or GDCM would add them) and raise :class:`FeatureError`.

    Parameters
    ----------
    source : Path | pydicom.Dataset
        A DICOM file or a dataset already read (with pixel data).
    frame : int | None
        0-based frame of a multi-frame image; default: the middle frame (``n // 2``), the one
        most likely to show the lesion in a sweep. Single-frame images accept only 0.
    source_name : str
        What to call the source in errors (default: the file name, or "dataset").
    roi : Box | None
        The lesion box, used to choose the US region that contains it (centre of the box).
    default_pixel_mm : float | None
        mm/px when no calibrated 2D region and no PixelSpacing exist (flagged
        ``fallback_spacing``); None leaves ``pixel_mm`` None in that case.

    Returns
    -------
    UltrasoundImage

    Raises
    ------
    FeatureError
        Unreadable file, not an ultrasound SOP class, no pixel data, frame out of range,
        undecodable transfer syntax; the message names the SOP Instance UID.
    """
    name = source_name or (source.name if isinstance(source, Path) else "dataset")
    ds: Dataset
    if isinstance(source, Path):
        try:
            ds = pydicom.dcmread(source)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise FeatureError(f"ultrasound {name}: cannot be read as DICOM ({exc})") from exc
    else:
        ds = source
    uid = str(ds.get("SOPInstanceUID", "")) or "(no SOP Instance UID)"
    where = f"ultrasound {name} (SOP Instance UID {uid})"
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in US_CLASSES:
        raise FeatureError(f"{where}: SOP class {sop_class or '(none)'} is not an Ultrasound "
                           "Image or Ultrasound Multi-frame Image")
    if "PixelData" not in ds:
        raise FeatureError(f"{where}: has no pixel data")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    chosen = n_frames // 2 if frame is None else frame
    if not 0 <= chosen < n_frames:
        raise FeatureError(f"{where}: frame {chosen} out of range, the image has {n_frames}")
    gray = _decode_gray(ds, chosen, where)
    pixel_mm, flags = _pixel_mm(ds, roi, default_pixel_mm)
    return UltrasoundImage(gray, pixel_mm, flags, uid, chosen)


def _decode_gray(ds: Dataset, frame: int, where: str) -> np.ndarray:
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        raise FeatureError(f"{where}: no Transfer Syntax UID, the pixel data cannot be decoded")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise FeatureError(f"{where}: no pixel decoder for transfer syntax {syntax}") from exc
    if not decoder.is_available:
        raise FeatureError(f"{where}: transfer syntax {syntax.name} ({syntax}) has no decoder "
                           "installed; transcode it (e.g. to explicit VR little endian)")
    try:
        array, decoded = decoder.as_array(ds, index=frame)
    except (ValueError, RuntimeError, AttributeError, KeyError, TypeError) as exc:
        raise FeatureError(f"{where}: pixel data cannot be decoded ({exc})") from exc
    photometric = str(decoded.get("photometric_interpretation", ""))
    bits = int(decoded.get("bits_stored", 8))
    if photometric == "PALETTE COLOR":
        depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
        try:
            rgb = apply_color_lut(array, ds).astype(np.float32)
        except (ValueError, AttributeError, IndexError) as exc:
            raise FeatureError(f"{where}: palette colour lookup table unusable ({exc})") from exc
        return (rgb[..., :3] @ _LUMA) * (255.0 / (2**depth - 1))
    if photometric == "RGB":
        return (array[..., :3].astype(np.float32) @ _LUMA) * (255.0 / (2**bits - 1))
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise FeatureError(f"{where}: photometric interpretation {photometric!r} not supported")
    values = array.astype(np.float32)
    if int(decoded.get("pixel_representation", 0)):
        values += 2 ** (bits - 1)  # signed → the same range shifted to start at 0
    if photometric == "MONOCHROME1":
        values = (2**bits - 1) - values
    return values * (255.0 / (2**bits - 1))


def _pixel_mm(ds: Dataset, roi: Box | None, default_pixel_mm: float | None
              ) -> tuple[tuple[float, float] | None, list[str]]:
    """(row, column) mm/px from the Sequence of Ultrasound Regions; fallbacks are flagged."""
    calibrated = []
    for region in ds.get("SequenceOfUltrasoundRegions", []):
        try:
            if (int(region.RegionSpatialFormat) != _REGION_2D
                    or int(region.PhysicalUnitsXDirection) != _UNITS_CM
                    or int(region.PhysicalUnitsYDirection) != _UNITS_CM):
                continue
            dx_mm = abs(float(region.PhysicalDeltaX)) * 10
            dy_mm = abs(float(region.PhysicalDeltaY)) * 10
            bounds = (int(region.RegionLocationMinX0), int(region.RegionLocationMinY0),
                      int(region.RegionLocationMaxX1), int(region.RegionLocationMaxY1))
            tissue = int(region.get("RegionDataType", 0)) == _REGION_TISSUE
        except (AttributeError, TypeError, ValueError):
            continue  # an incomplete region cannot calibrate anything
        if dx_mm > 0 and dy_mm > 0 and math.isfinite(dx_mm) and math.isfinite(dy_mm):
            calibrated.append(((dy_mm, dx_mm), bounds, tissue))
    if calibrated:
        pool = calibrated
        if roi is not None:
            cx, cy = (roi[0] + roi[2]) / 2, (roi[1] + roi[3]) / 2
            holding = [c for c in calibrated
                       if c[1][0] <= cx <= c[1][2] and c[1][1] <= cy <= c[1][3]]
            pool = holding or calibrated
        best = max(pool, key=lambda c: (c[2], (c[1][2] - c[1][0]) * (c[1][3] - c[1][1])))
        return best[0], []
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2 and all(float(s) > 0 for s in spacing):
        return (float(spacing[0]), float(spacing[1])), [FALLBACK_SPACING]
    if default_pixel_mm is None:
        return None, [FALLBACK_SPACING]
    return (default_pixel_mm, default_pixel_mm), [FALLBACK_SPACING]


# --------------------------------------------------------------------------- ROI sources


def _shape_bounds(graphic_type: str, points: np.ndarray) -> tuple[float, float, float, float]:
    """(xmin, ymin, xmax, ymax) of one graphic; CIRCLE and ELLIPSE by their true extent."""
    if graphic_type == "CIRCLE":
        if len(points) != 2:
            raise ValueError(f"a CIRCLE needs 2 points, got {len(points)}")
        radius = float(np.hypot(*(points[1] - points[0])))
        (cx, cy) = points[0]
        return cx - radius, cy - radius, cx + radius, cy + radius
    if graphic_type == "ELLIPSE":
        if len(points) != 4:
            raise ValueError(f"an ELLIPSE needs 4 points, got {len(points)}")
        centre = (points[0] + points[1]) / 2
        major, minor = (points[1] - points[0]) / 2, (points[3] - points[2]) / 2
        half = np.sqrt(major**2 + minor**2)  # extent of a rotated ellipse along x and y
        return (centre[0] - half[0], centre[1] - half[1], centre[0] + half[0],
                centre[1] + half[1])
    return (float(points[:, 0].min()), float(points[:, 1].min()),
            float(points[:, 0].max()), float(points[:, 1].max()))


def _union_box(bounds: Sequence[tuple[float, float, float, float]], source: str) -> Box:
    x0 = math.floor(min(b[0] for b in bounds))
    y0 = math.floor(min(b[1] for b in bounds))
    x1 = math.ceil(max(b[2] for b in bounds))
    y1 = math.ceil(max(b[3] for b in bounds))
    if x1 <= x0 or y1 <= y0:
        raise FeatureError(f"{source}: the ROI is degenerate (box {x0},{y0}-{x1},{y1} has no "
                           "area)")
    if x1 < 0 or y1 < 0:
        raise FeatureError(f"{source}: the ROI lies outside the image (box {x0},{y0}-{x1},{y1})")
    if len(bounds) > 1:
        LOGGER.info("%d shapes reference the image; their union is taken as the lesion",
                    len(bounds))
    return x0, y0, x1, y1


def roi_from_sr(ds: Dataset, image_uid: str) -> Box:
    """Lesion box from a TID 1500 SR: every SCOORD that references ``image_uid``.

    The SCOORDs (POINT, MULTIPOINT, POLYLINE, POLYGON, CIRCLE, ELLIPSE) are found by the intake
    reader's content-tree walk (:func:`mrrp_pacs.intake.dicom.sr_rois`), which also reads
    each one's IMAGE child. Several shapes referencing the image (e.g. two caliper lines) are
    combined into the box of their union.

    Parameters
    ----------
    ds : pydicom.Dataset
        Enhanced, Comprehensive or Comprehensive 3D SR.
    image_uid : str
        SOP Instance UID of the ultrasound image.

    Returns
    -------
    Box

    Raises
    ------
    FeatureError
        Not an SR, no SCOORD referencing the image, bad graphic data, or an empty box.
    """
    source = f"SR {ds.get('SOPInstanceUID', '(no SOP Instance UID)')}"
    if str(ds.get("SOPClassUID", "")) not in SR_CLASSES:
        raise FeatureError(f"{source}: SOP class {ds.get('SOPClassUID', '(none)')} is not a "
                           "structured report")
    try:
        rois = sr_rois(ds)
    except DicomError as exc:
        raise FeatureError(f"{source}: {exc}") from exc
    bounds = []
    for roi in rois:
        if roi.kind != "sr_scoord" or roi.referenced_sop_instance_uid != image_uid:
            continue
        for shape in roi.shapes or []:
            try:
                bounds.append(_shape_bounds(roi.graphic_type, np.asarray(shape, dtype=float)))
            except ValueError as exc:
                raise FeatureError(f"{source}: {exc}") from exc
    if not bounds:
        raise FeatureError(f"{source}: no image region (SCOORD) references image {image_uid}")
    return _union_box(bounds, source)


def roi_from_gsps(ds: Dataset, image_uid: str) -> Box:
    """Lesion box from a softcopy presentation state's graphic annotations on ``image_uid``.

    Graphic objects in PIXEL units (POINT, POLYLINE, INTERPOLATED, CIRCLE, ELLIPSE) of every
    Graphic Annotation that references the image (or, when it names no image, of a
    presentation state that references it) are combined into the box of their union.
    DISPLAY-unit objects depend on the viewer's displayed area and are not used.

    Raises
    ------
    FeatureError
        Not a presentation state, no PIXEL-unit graphic on the image, or an empty box.
    """
    source = f"presentation state {ds.get('SOPInstanceUID', '(no SOP Instance UID)')}"
    if not str(ds.get("SOPClassUID", "")).startswith(_PRESENTATION_STATE_PREFIX):
        raise FeatureError(f"{source}: SOP class {ds.get('SOPClassUID', '(none)')} is not a "
                           "softcopy presentation state")
    state_images = {str(image.ReferencedSOPInstanceUID)
                    for series in ds.get("ReferencedSeriesSequence", [])
                    for image in series.get("ReferencedImageSequence", [])}
    bounds, display_only = [], 0
    for annotation in ds.get("GraphicAnnotationSequence", []):
        refs = annotation.get("ReferencedImageSequence")
        applies = ({str(r.ReferencedSOPInstanceUID) for r in refs} if refs else state_images)
        if image_uid not in applies:
            continue
        for graphic in annotation.get("GraphicObjectSequence", []):
            if str(graphic.get("GraphicAnnotationUnits", "")) != "PIXEL":
                display_only += 1
                continue
            values = [float(v) for v in graphic.get("GraphicData", [])]
            if not values or len(values) % 2:
                raise FeatureError(f"{source}: graphic data of {len(values)} values is not a "
                                   "list of (column, row) points")
            try:
                bounds.append(_shape_bounds(str(graphic.get("GraphicType", "")),
                                            np.reshape(values, (-1, 2))))
            except ValueError as exc:
                raise FeatureError(f"{source}: {exc}") from exc
    if not bounds:
        extra = f" ({display_only} in DISPLAY units, not used)" if display_only else ""
        raise FeatureError(f"{source}: no PIXEL-unit graphic references image "
                           f"{image_uid}{extra}")
    return _union_box(bounds, source)


def roi_from_voc(source: Path | str | bytes) -> Box:
    """Lesion box from a Pascal-VOC / LabelImg XML annotation.

    Coordinates are VOC's 1-based inclusive pixel indices, shifted to 0-based (LabelImg
    writes 0-based values clamped to ≥ 1; the one-pixel difference is inside the crop margin).
    With several ``<object>`` elements the largest box is taken.

    Parameters
    ----------
    source : Path | str | bytes
        A file (Path), or the XML text itself (str or bytes). Treated as hostile: at most 1 MiB,
        no DOCTYPE, no entity declarations.

    Raises
    ------
    FeatureError
        Unreadable, declarations present, no ``<object><bndbox>``, non-numeric or empty box,
        or a box outside the ``<size>`` it declares.
    """
    if isinstance(source, Path):
        name = f"VOC file {source.name}"
        try:
            if source.stat().st_size > _MAX_VOC_BYTES:
                raise FeatureError(f"{name}: larger than {_MAX_VOC_BYTES} bytes, not a VOC file")
            data: bytes | str = source.read_bytes()
        except OSError as exc:
            raise FeatureError(f"{name}: cannot be read ({exc})") from exc
    else:
        name, data = "VOC annotation", source
        if len(data) > _MAX_VOC_BYTES:
            raise FeatureError(f"{name}: larger than {_MAX_VOC_BYTES} bytes, not a VOC file")
    try:
        root = parse_xml(data)
    except SidecarError as exc:
        raise FeatureError(f"{name} {exc}") from None
    boxes = []
    for number, obj in enumerate(root.iter("object"), start=1):
        bndbox = obj.find("bndbox")
        if bndbox is None:
            continue
        try:
            x0, y0, x1, y1 = (float(bndbox.findtext(tag, "")) - 1
                              for tag in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as exc:
            raise FeatureError(f"{name}: object {number} has a non-numeric bndbox") from exc
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise FeatureError(f"{name}: object {number} has a non-finite bndbox")
        boxes.append(_union_box([(max(x0, 0.0), max(y0, 0.0), x1, y1)],
                                f"{name} object {number}"))
    if not boxes:
        raise FeatureError(f"{name}: no <object><bndbox> found")
    box = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
    size = root.find("size")
    if size is not None and size.findtext("width") and size.findtext("height"):
        try:
            shape = (int(float(size.findtext("height", ""))),
                     int(float(size.findtext("width", ""))))
        except ValueError as exc:
            raise FeatureError(f"{name}: <size> is not numeric") from exc
        clip_box(box, shape, name)
    return box


def clip_box(box: Box, shape: tuple[int, int], source: str) -> Box:
    """``box`` clipped to an image of ``shape`` (rows, columns).

    Raises
    ------
    FeatureError
        The box does not overlap the image, or nothing with area is left after clipping.
    """
    rows, columns = shape
    x0, y0 = max(box[0], 0), max(box[1], 0)
    x1, y1 = min(box[2], columns - 1), min(box[3], rows - 1)
    if x1 <= x0 or y1 <= y0:
        raise FeatureError(f"{source}: ROI {box} lies outside the {columns} × {rows} image or "
                           "has no area inside it")
    return x0, y0, x1, y1


def automatic_lesion_candidate(gray: np.ndarray, pixel_mm: tuple[float, float]) -> Box:
    """A lesion box when no ROI was drawn: the most plausible large hypoechoic region.

    The frame is reduced to ~0.5 mm/px (block mean) and smoothed (σ = 1 mm); pixels darker than
    0.75 × the median of the central 20–80 % of depth form candidate regions (after a 1 mm
    opening). Regions touching the border, smaller than 12 mm² or longer than 60 mm are
    dropped; the rest are scored by area × closeness to the upper-middle of the frame (40 % of
    depth, mid-width). The caller flags the case ``automatic_roi``.

    Parameters
    ----------
    gray : np.ndarray
        (rows, columns) grayscale in [0, 255].
    pixel_mm : tuple[float, float]
        (row, column) mm/px.

    Returns
    -------
    Box
        In the pixels of ``gray``.

    Raises
    ------
    FeatureError
        No plausible region.
    """
    rows, columns = gray.shape
    step = (max(1, round(0.5 / pixel_mm[0])), max(1, round(0.5 / pixel_mm[1])))
    coarse_mm = (pixel_mm[0] * step[0], pixel_mm[1] * step[1])
    height, width = rows // step[0], columns // step[1]
    small = (gray[: height * step[0], : width * step[1]].astype(np.float32)
             .reshape(height, step[0], width, step[1]).mean(axis=(1, 3)))
    smooth = ndimage.gaussian_filter(small, (1.0 / coarse_mm[0], 1.0 / coarse_mm[1]))
    reference = float(np.median(smooth[int(height * 0.2) : int(height * 0.8)]))
    dark = smooth < 0.75 * reference
    opening = np.ones((max(1, round(1 / coarse_mm[0])) * 2 + 1,
                       max(1, round(1 / coarse_mm[1])) * 2 + 1), dtype=bool)
    dark = ndimage.binary_opening(dark, structure=opening)
    labels, _ = ndimage.label(dark)
    best: tuple[float, Box] | None = None
    for label, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        rs, cs = found
        if rs.start == 0 or cs.start == 0 or rs.stop == height or cs.stop == width:
            continue
        area_mm2 = float(np.count_nonzero(labels[found] == label)) * coarse_mm[0] * coarse_mm[1]
        extent_mm = max((rs.stop - rs.start) * coarse_mm[0], (cs.stop - cs.start) * coarse_mm[1])
        if area_mm2 < 12.0 or extent_mm > 60.0:
            continue
        cy, cx = (rs.start + rs.stop) / 2 / height, (cs.start + cs.stop) / 2 / width
        score = area_mm2 * math.exp(-(((cx - 0.5) / 0.3) ** 2) - ((cy - 0.4) / 0.3) ** 2)
        box = (cs.start * step[1], rs.start * step[0],
               min(cs.stop * step[1], columns) - 1, min(rs.stop * step[0], rows) - 1)
        if best is None or score > best[0]:
            best = (score, box)
    if best is None:
        raise FeatureError("automatic ROI: no hypoechoic region of plausible size and position")
    return best[1]


def crop_roi(gray: np.ndarray, box: Box, margin_px: int = CROP_MARGIN_PX,
             size_px: int = CROP_SIZE_PX) -> np.ndarray:
    """The lesion crop the encoder sees.

    The box grows by ``margin_px`` on every side (clipped to the image); the shorter side is
    then zero-padded symmetrically to a square, so the aspect ratio is kept (orientation —
    taller than wide — is a BI-RADS feature), and the square is resized to ``size_px`` with
    bilinear interpolation (Gaussian anti-aliasing when shrinking). Absolute size is not kept.

    Parameters
    ----------
    gray : np.ndarray
        (rows, columns) grayscale in [0, 255].
    box : Box
    margin_px : int
    size_px : int

    Returns
    -------
    np.ndarray
        (size_px, size_px) float32 in [0, 255].

    Raises
    ------
    FeatureError
        The box is outside the image or has no area inside it.
    """
    x0, y0, x1, y1 = clip_box(box, gray.shape, "crop")
    x0, y0 = max(x0 - margin_px, 0), max(y0 - margin_px, 0)
    x1, y1 = min(x1 + margin_px, gray.shape[1] - 1), min(y1 + margin_px, gray.shape[0] - 1)
    patch = gray[y0 : y1 + 1, x0 : x1 + 1].astype(np.float32)
    side = max(patch.shape)
    top, left = (side - patch.shape[0]) // 2, (side - patch.shape[1]) // 2
    square = np.zeros((side, side), dtype=np.float32)
    square[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
    out = resize(square, (size_px, size_px), order=1, anti_aliasing=side > size_px,
                 preserve_range=True)
    return np.clip(out, 0.0, 255.0).astype(np.float32)


# --------------------------------------------------------------------------- encoder

US_ENCODER_VERSION = "1"
US_ENCODER_KIND = "us-encoder"
US_ENCODER_NAME = "usresnet-small"
PRETEXT_TASK = "rotation-4way"
TOKEN_GRID = 16
TOKEN_DIM = 64
ARCHITECTURE: dict[str, Any] = {
    "name": "UsResNet",
    "input": [1, CROP_SIZE_PX, CROP_SIZE_PX],
    "stem": {"kernel": 4, "stride": 4, "width": 16},
    "stages": [{"width": 32, "stride": 2}, {"width": TOKEN_DIM, "stride": 2}],
    "blocks_per_stage": 1,
    "norm": "GroupNorm(4)",
    "feature_map": [TOKEN_DIM, TOKEN_GRID, TOKEN_GRID],
    "pretext_head": {"pool": [4, 4], "classes": 4},
}


class _BasicBlock(nn.Module):
    """ResNet basic block (two 3×3 convolutions) with a projection shortcut when the shape
    changes."""

    def __init__(self, in_width: int, out_width: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_width, out_width, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(4, out_width)
        self.conv2 = nn.Conv2d(out_width, out_width, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(4, out_width)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_width != out_width:
            self.shortcut = nn.Sequential(nn.Conv2d(in_width, out_width, 1, stride, bias=False),
                                          nn.GroupNorm(4, out_width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = functional.relu(self.norm1(self.conv1(x)))
        return functional.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class UsResNet(nn.Module):
    """Lightweight ResNet for 1 × 256 × 256 ultrasound crops; last residual block 64 × 16 × 16.

    Stem: 4 × 4 convolution, stride 4 → 16 × 64 × 64 (a patchifying stem: a classic stride-2
    stem spends most of its CPU time on 128 × 128 maps and made training ~2.5 × slower here).
    Two stages of one basic block each: 32 @ 32 × 32 (stride 2), then 64 @ 16 × 16 (stride 2),
    whose output is the token map. GroupNorm (4 groups) instead of BatchNorm: training batches
    are small (16 crops, a few hundred patients in all), and the encoder then behaves the same
    in training and inference, one crop at a time, with no running statistics to drift.
    The pretext head (rotation, 4 classes) is linear on the map average-pooled to 4 × 4: with
    a global average pool the head cannot see where things are, and rotation on 64 crops did
    not get below chance in 6 epochs.

    Input crops are grayscale in [0, 255]; they are scaled to [-1, 1] inside the model.
    """

    def __init__(self) -> None:
        super().__init__()
        stem = ARCHITECTURE["stem"]
        self.stem = nn.Sequential(nn.Conv2d(1, stem["width"], stem["kernel"], stem["stride"],
                                            bias=False),
                                  nn.GroupNorm(4, stem["width"]), nn.ReLU())
        blocks, width = [], stem["width"]
        for stage in ARCHITECTURE["stages"]:
            blocks.append(_BasicBlock(width, stage["width"], stage["stride"]))
            width = stage["width"]
        self.blocks = nn.Sequential(*blocks)
        head = ARCHITECTURE["pretext_head"]
        self.head = nn.Linear(width * head["pool"][0] * head["pool"][1], head["classes"])
        # a zero head starts the pretext at chance (loss ln 4) instead of a random bias
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def feature_map(self, crops: torch.Tensor) -> torch.Tensor:
        """(n, 1, 256, 256) crops in [0, 255] → (n, 64, 16, 16) output of the last block."""
        return self.blocks(self.stem(crops / 127.5 - 1.0))

    def encode(self, crops: torch.Tensor) -> torch.Tensor:
        """(n, 1, 256, 256) → (n, 256, 64) tokens: the 16 × 16 map flattened row-major."""
        return self.feature_map(crops).flatten(2).transpose(1, 2)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """(n, 1, 256, 256) → (n, 4) rotation logits (k × 90° counter-clockwise)."""
        pooled = functional.adaptive_avg_pool2d(self.feature_map(crops),
                                                ARCHITECTURE["pretext_head"]["pool"])
        return self.head(pooled.flatten(1))


def token_positions() -> np.ndarray:
    """(256, 2) int (row, column) of each token in the 16 × 16 grid, the order of
    :meth:`UsResNet.encode`; token (r, c) covers crop pixels [16 r, 16 r + 16) × [16 c, 16 c + 16).
    """
    rows, columns = np.divmod(np.arange(TOKEN_GRID * TOKEN_GRID), TOKEN_GRID)
    return np.stack([rows, columns], axis=1)


def encode_crops(model: UsResNet, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Tokens of each crop.

    Parameters
    ----------
    model : UsResNet
    crops : np.ndarray
        (n, 256, 256) grayscale in [0, 255] (from :func:`crop_roi`).
    batch_size : int

    Returns
    -------
    np.ndarray
        (n, 256, 64) float32; positions from :func:`token_positions`.
    """
    _check_crops(crops)
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(crops), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(crops[start : start + batch_size],
                                                          dtype=np.float32))
            out.append(model.encode(batch[:, None]).numpy())
    return np.concatenate(out) if out else np.zeros((0, TOKEN_GRID**2, TOKEN_DIM), np.float32)


def _check_crops(crops: np.ndarray) -> None:
    if crops.ndim != 3 or crops.shape[1:] != (CROP_SIZE_PX, CROP_SIZE_PX):
        raise FeatureError(f"crops must be (n, {CROP_SIZE_PX}, {CROP_SIZE_PX}), got "
                           f"{crops.shape}")


@dataclass(frozen=True)
class PretextHistory:
    """What one training run did; ``losses`` are mean cross-entropy (nats) per epoch."""

    losses: list[float]
    accuracies: list[float]
    seconds: float
    n_crops: int
    epochs: int
    seed: int
    batch_size: int
    learning_rate: float


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch and demand deterministic kernels, restoring the caller's state after."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)


def train_us_encoder(crops: np.ndarray, *, epochs: int = 6, seed: int = 0, batch_size: int = 16,
                     learning_rate: float = 1e-3) -> tuple[UsResNet, PretextHistory]:
    """Train :class:`UsResNet` by 4-way rotation prediction (no outcome labels).

    Why rotation: B-mode images have a strong up/down and depth structure (skin on top,
    posterior shadowing or enhancement below the lesion, attenuation with depth), so telling
    0/90/180/270° apart forces the encoder to represent the lesion's orientation, posterior
    features and outline — the BI-RADS descriptors — while needing no negatives, large batches
    or long schedules (unlike SimCLR), which a few hundred crops on a CPU cannot afford. Each
    epoch every crop is seen once, randomly mirrored left-right (anatomy has no left/right
    preference) and rotated by a random multiple of 90°.

    Deterministic on CPU for a given seed and thread count (seeded generator,
    ``torch.use_deterministic_algorithms``; the caller's RNG and flags are restored).

    Parameters
    ----------
    crops : np.ndarray
        (n, 256, 256) grayscale crops in [0, 255] (from :func:`crop_roi`).
    epochs, seed, batch_size : int
    learning_rate : float
        Adam step size.

    Returns
    -------
    tuple[UsResNet, PretextHistory]
        The model in eval mode, and per-epoch loss and accuracy.
    """
    _check_crops(crops)
    if len(crops) == 0 or epochs < 1:
        raise FeatureError(f"training needs crops and epochs ≥ 1 (got {len(crops)} crops, "
                           f"{epochs} epochs)")
    data = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))[:, None]
    losses, accuracies = [], []
    started = time.perf_counter()
    with _seeded(seed):
        generator = torch.Generator().manual_seed(seed)
        model = UsResNet()
        optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
        model.train()
        for epoch in range(epochs):
            order = torch.randperm(len(data), generator=generator)
            total_loss, correct = 0.0, 0
            for start in range(0, len(data), batch_size):
                batch = data[order[start : start + batch_size]]
                mirror = torch.rand(len(batch), generator=generator) < 0.5
                batch = torch.where(mirror[:, None, None, None], batch.flip(-1), batch)
                turns = torch.randint(0, 4, (len(batch),), generator=generator)
                rotated = torch.empty_like(batch)
                for k in range(4):
                    chosen = turns == k
                    rotated[chosen] = torch.rot90(batch[chosen], k, dims=(2, 3))
                logits = model(rotated)
                loss = functional.cross_entropy(logits, turns)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total_loss += float(loss.detach()) * len(batch)
                correct += int((logits.argmax(1) == turns).sum())
            losses.append(total_loss / len(data))
            accuracies.append(correct / len(data))
            LOGGER.info("us encoder epoch %d/%d: loss %.4f, accuracy %.3f", epoch + 1, epochs,
                        losses[-1], accuracies[-1])
    model.eval()
    history = PretextHistory(losses, accuracies, time.perf_counter() - started, len(crops),
                             epochs, seed, batch_size, learning_rate)
    return model, history


def save_us_encoder(store: ModelStore, model: UsResNet, history: PretextHistory,
                    training_info: Mapping[str, Any], name: str = US_ENCODER_NAME
                    ) -> ModelVersion:
    """Store weights (``weights.safetensors``) and a manifest under kind ``us-encoder``.

    ``training_info`` is the caller's provenance (e.g. which cases the crops came from, how
    the ROIs were found); it must be JSON-able and is kept under ``training.provenance``.
    """
    weights = safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()})
    manifest = {
        "code_version": US_ENCODER_VERSION,
        "architecture": ARCHITECTURE,
        "input_size_px": [CROP_SIZE_PX, CROP_SIZE_PX],
        "input_range": [0, 255],
        "output_shape": [TOKEN_DIM, TOKEN_GRID, TOKEN_GRID],
        "tokens": [TOKEN_GRID * TOKEN_GRID, TOKEN_DIM],
        "pretext_task": PRETEXT_TASK,
        "crop": {"margin_px": CROP_MARGIN_PX, "aspect_ratio": "kept (zero padding)",
                 "interpolation": "bilinear"},
        "training": {**asdict(history), "final_loss": history.losses[-1],
                     "provenance": dict(training_info)},
    }
    return store.save(US_ENCODER_KIND, name, {"weights.safetensors": weights}, manifest)


def load_us_encoder(store: ModelStore, version: str | None = None,
                    name: str = US_ENCODER_NAME) -> tuple[UsResNet, ModelVersion]:
    """The stored encoder (given version, else promoted, else latest), in eval mode.

    Raises
    ------
    ModelStoreError
        Missing or altered files (checked by the store), or a manifest written for another
        architecture or code version than this module's.
    """
    stored = store.load(US_ENCODER_KIND, name, version)
    manifest = stored.manifest
    if manifest.get("code_version") != US_ENCODER_VERSION:
        raise ModelStoreError(
            f"{stored.label} was written by us-encoder code version "
            f"{manifest.get('code_version')!r}, this code is {US_ENCODER_VERSION!r}: train a new "
            "encoder (mrrp-pacs train-encoder us)")
    if manifest.get("architecture") != ARCHITECTURE:
        raise ModelStoreError(f"{stored.label} describes another architecture than this code's "
                              "UsResNet: train a new encoder (mrrp-pacs train-encoder us)")
    model = UsResNet()
    try:
        model.load_state_dict(safetensors.torch.load_file(stored.file("weights.safetensors")))
    except (RuntimeError, OSError) as exc:
        raise ModelStoreError(f"{stored.label}: weights do not fit UsResNet ({exc})") from exc
    model.eval()
    return model, stored


def train_from_crops(store: ModelStore, crops: np.ndarray, *, epochs: int = 6, seed: int = 0,
                     training_info: Mapping[str, Any] | None = None) -> ModelVersion:
    """Train on ``crops`` (n, 256, 256) and store the result: the body of
    ``mrrp-pacs train-encoder us``. Returns the new (not yet promoted) version."""
    model, history = train_us_encoder(crops, epochs=epochs, seed=seed)
    return save_us_encoder(store, model, history, training_info or {})
