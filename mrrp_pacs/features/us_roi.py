"""Where the lesion is on an ultrasound frame: the box drawn in an SR, a presentation state or
a Pascal-VOC file, or, when none was drawn, an automatic candidate.

Boxes are ``(x0, y0, x1, y1)``: inclusive pixel indices, x = column, y = row, of the
referenced frame (the convention of ``mrrp_pacs.phantom.ultrasound``). The branch as a whole is
sketched in :mod:`mrrp_pacs.features.us_image`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from mrrp_pacs.errors import DicomError, FeatureError, SidecarError
from mrrp_pacs.intake.dicom import SR_CLASSES, sr_rois
from mrrp_pacs.intake.sidecars import parse_xml

LOGGER = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
"""(x0, y0, x1, y1): inclusive pixel indices, x = column, y = row."""

AUTOMATIC_ROI = "automatic_roi"

_PRESENTATION_STATE_PREFIX = "1.2.840.10008.5.1.4.1.1.11."
_MAX_VOC_BYTES = 1 << 20  # a LabelImg file is ~1 kB; anything far larger is not one


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
