"""Where the lesion is on an ultrasound frame: a mask of the outline drawn in an SR, a
presentation state or a segmentation, on the frame it was drawn on; or, as a flagged fallback,
a box (Pascal-VOC file, calipers, or the automatic candidate when nothing was drawn).

Masks are (rows, columns) bool arrays of the referenced frame (:class:`Lesion`). Boxes are
``(x0, y0, x1, y1)``: inclusive pixel indices, x = column, y = row. Drawn coordinates follow
DICOM's pixel space for SCOORDs and presentation-state graphics: (0, 0) is the top left corner
of the top left pixel, whose centre is (0.5, 0.5); a pixel belongs to a shape when its centre
lies inside. The branch as a whole is sketched in :mod:`mrrp_pacs.features.us_image`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from scipy import ndimage
from skimage.draw import polygon as draw_polygon

from mrrp_pacs.errors import FeatureError, SidecarError
from mrrp_pacs.intake.dicom import PRESENTATION_STATE_CLASSES, SEGMENTATION, SR_CLASSES
from mrrp_pacs.intake.sidecars import parse_xml

LOGGER = logging.getLogger(__name__)

Box = tuple[int, int, int, int]
"""(x0, y0, x1, y1): inclusive pixel indices, x = column, y = row."""

AUTOMATIC_ROI = "automatic_roi"
BOX_ROI = "box_roi"
"""Flag: the features describe a box, not a drawn outline (VOC box, calipers, automatic)."""
ROI_OUTLINE, ROI_BOX = "outline", "box"
LESION_ROI_VERSION = "2"
"""What a lesion ROI is (2: masks of drawn outlines on the referenced frame; 1: boxes); part
of the US families' cache key."""

_MEASUREMENT_GROUP = ("125007", "DCM")  # (125007, DCM, "Measurement Group")
_TRACKING_IDENTIFIER = ("112039", "DCM")  # (112039, DCM, "Tracking Identifier")

_MAX_VOC_BYTES = 1 << 20  # a LabelImg file is ~1 kB; anything far larger is not one


@dataclass(frozen=True)
class Lesion:
    """One lesion on one frame: its mask and where the mask came from.

    Attributes
    ----------
    mask : np.ndarray
        (rows, columns) bool, the lesion's pixels.
    frame : int | None
        0-based frame it was drawn on; None when the source names no frame (the caller then
        reads the middle frame of a cine loop).
    source : str
        ``sr``, ``gsps``, ``seg``, ``voc`` or ``automatic``.
    outline : bool
        True for a drawn outline or segmentation; False for a box standing in for it (a
        Pascal-VOC box, calipers, the automatic candidate): flagged ``box_roi``.
    label : str
        The tracking identifier, segment label or layer, when the source gives one.
    """

    mask: np.ndarray
    frame: int | None
    source: str
    outline: bool
    label: str = ""

    @property
    def box(self) -> Box:
        """(x0, y0, x1, y1) of the mask, inclusive pixel indices."""
        rows = np.flatnonzero(self.mask.any(axis=1))
        columns = np.flatnonzero(self.mask.any(axis=0))
        return int(columns[0]), int(rows[0]), int(columns[-1]), int(rows[-1])

    @property
    def roi_shape(self) -> str:
        """``outline`` or ``box``: what the features describe."""
        return ROI_OUTLINE if self.outline else ROI_BOX


@dataclass(frozen=True)
class _Shape:
    graphic_type: str
    points: np.ndarray  # (n, 2) (column, row); (0, 0) is the top left corner of the image
    frame: int | None  # 0-based


def _pixel_centres(bounds: tuple[float, float, float, float], shape: tuple[int, int]
                   ) -> tuple[slice, slice, np.ndarray, np.ndarray] | None:
    """Rows/columns slices covering ``bounds`` (xmin, ymin, xmax, ymax) inside the image, with
    the (x, y) of their pixel centres; None when nothing of the image is covered."""
    rows, columns = shape
    c0, c1 = max(math.floor(bounds[0]), 0), min(math.ceil(bounds[2]), columns)
    r0, r1 = max(math.floor(bounds[1]), 0), min(math.ceil(bounds[3]), rows)
    if c1 <= c0 or r1 <= r0:
        return None
    y, x = np.mgrid[r0:r1, c0:c1].astype(np.float64) + 0.5
    return slice(r0, r1), slice(c0, c1), x, y


def _area_mask(shape: _Shape, image_shape: tuple[int, int], source: str) -> np.ndarray | None:
    """The pixels whose centre lies inside an area shape; None for POINT, MULTIPOINT and a
    two-point line (a caliper), which have no area."""
    kind, points = shape.graphic_type, shape.points
    mask = np.zeros(image_shape, dtype=bool)
    if kind == "CIRCLE":
        if len(points) != 2:
            raise FeatureError(f"{source}: a CIRCLE needs 2 points, got {len(points)}")
        radius = float(np.hypot(*(points[1] - points[0])))
        (cx, cy) = points[0]
        grid = _pixel_centres((cx - radius, cy - radius, cx + radius, cy + radius),
                              image_shape)
        if grid is None:
            return mask
        rs, cs, x, y = grid
        mask[rs, cs] = (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
        return mask
    if kind == "ELLIPSE":
        if len(points) != 4:
            raise FeatureError(f"{source}: an ELLIPSE needs 4 points, got {len(points)}")
        centre = (points[0] + points[1]) / 2
        major, minor = (points[1] - points[0]) / 2, (points[3] - points[2]) / 2
        if not (np.dot(major, major) > 0 and np.dot(minor, minor) > 0):
            return None
        half = np.sqrt(major**2 + minor**2)  # extent of a rotated ellipse along x and y
        grid = _pixel_centres((centre[0] - half[0], centre[1] - half[1],
                               centre[0] + half[0], centre[1] + half[1]), image_shape)
        if grid is None:
            return mask
        rs, cs, x, y = grid
        dx, dy = x - centre[0], y - centre[1]
        u = (dx * major[0] + dy * major[1]) / np.dot(major, major)
        v = (dx * minor[0] + dy * minor[1]) / np.dot(minor, minor)
        mask[rs, cs] = u**2 + v**2 <= 1.0
        return mask
    if kind in ("POLYLINE", "POLYGON", "INTERPOLATED") and len(points) >= 3:
        x, y = points[:, 0], points[:, 1]
        if abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))) == 0:
            return None  # collinear: a line, not an outline
        # pixel (r, c) has its centre at (c + 0.5, r + 0.5); skimage tests integer points
        rr, cc = draw_polygon(y - 0.5, x - 0.5, image_shape)
        mask[rr, cc] = True
        return mask
    if kind in ("POINT", "MULTIPOINT", "POLYLINE", "POLYGON", "INTERPOLATED"):
        return None
    raise FeatureError(f"{source}: graphic type {kind!r} is not a 2D region")


def _lesion(shapes: Sequence[_Shape], image_shape: tuple[int, int], source: str, kind: str,
            label: str) -> Lesion:
    """One lesion from its shapes: the union of the area shapes on the frame with the most
    lesion pixels; with no area shape (calipers, points), the box around all points, flagged."""
    by_frame: dict[int | None, np.ndarray] = {}
    for shape in shapes:
        area = _area_mask(shape, image_shape, source)
        if area is None:
            continue
        by_frame[shape.frame] = by_frame.get(shape.frame, np.zeros(image_shape, bool)) | area
    drawn = {frame: mask for frame, mask in by_frame.items() if mask.any()}
    if drawn:
        frame = max(drawn, key=lambda f: int(drawn[f].sum()))
        if len(drawn) > 1:
            LOGGER.info("%s: lesion %r is drawn on %d frames; frame %s (the largest) is used",
                        source, label, len(drawn), "?" if frame is None else frame + 1)
        return Lesion(drawn[frame], frame, kind, True, label)
    if by_frame:
        raise FeatureError(f"{source}: lesion {label!r} lies outside the "
                           f"{image_shape[1]} × {image_shape[0]} image")
    points = np.concatenate([s.points for s in shapes])
    x0, y0 = math.floor(points[:, 0].min()), math.floor(points[:, 1].min())
    x1, y1 = math.floor(points[:, 0].max()), math.floor(points[:, 1].max())
    if x1 <= x0 or y1 <= y0:
        raise FeatureError(f"{source}: the ROI is degenerate (box {x0},{y0}-{x1},{y1} has no "
                           "area)")
    frames = [s.frame for s in shapes if s.frame is not None]
    return box_lesion((x0, y0, x1, y1), image_shape, kind, frames[0] if frames else None,
                      label)


def box_lesion(box: Box, image_shape: tuple[int, int], source: str,
               frame: int | None = None, label: str = "") -> Lesion:
    """A box standing in for the lesion (clipped to the image); ``outline`` is False."""
    x0, y0, x1, y1 = clip_box(box, image_shape, source)
    mask = np.zeros(image_shape, dtype=bool)
    mask[y0 : y1 + 1, x0 : x1 + 1] = True
    return Lesion(mask, frame, source, False, label)


def largest_lesion(lesions: Sequence[Lesion]) -> Lesion:
    """The lesion the features describe when several are drawn: outlines before boxes, then
    the largest."""
    if not lesions:
        raise FeatureError("no lesion")
    if len(lesions) > 1:
        LOGGER.info("%d lesions drawn; the largest is used", len(lesions))
    return max(lesions, key=lambda lesion: (lesion.outline, int(lesion.mask.sum())))


def _frame_index(values: object, n_frames: int, source: str) -> int | None:
    """0-based frame from a ReferencedFrameNumber value (1-based; the first when several)."""
    if values is None or values == "":
        return None
    numbers = list(values) if isinstance(values, (list, tuple, MultiValue)) else [values]
    if not numbers:
        return None
    try:
        number = int(str(numbers[0]))
    except (TypeError, ValueError) as exc:
        raise FeatureError(f"{source}: Referenced Frame Number {numbers[0]!r} is not a "
                           "number") from exc
    if not 1 <= number <= n_frames:
        raise FeatureError(f"{source}: Referenced Frame Number {number} is outside the "
                           f"image's {n_frames} frame(s)")
    return number - 1


def _points(values: Sequence[object], source: str) -> np.ndarray:
    data = [float(str(v)) for v in values]
    if not data or len(data) % 2:
        raise FeatureError(f"{source}: graphic data of {len(data)} values is not a list of "
                           "(column, row) points")
    points = np.reshape(data, (-1, 2))
    if not np.isfinite(points).all():
        raise FeatureError(f"{source}: graphic data holds non-finite values")
    return points


def _image_geometry(image: Dataset) -> tuple[tuple[int, int], int]:
    return (int(image.Rows), int(image.Columns)), int(image.get("NumberOfFrames", 1) or 1)


def lesions_from_sr(ds: Dataset, image: Dataset) -> list[Lesion]:
    """Lesion masks from a TID 1500 SR: one per Measurement Group, on the frame drawn on.

    Every SCOORD whose IMAGE child references ``image`` is rasterised: POLYLINE (three points
    or more, closed implicitly), POLYGON, CIRCLE and ELLIPSE fill the pixels whose centre lies
    inside (SCOORD's pixel space: (0, 0) is the top left corner of the image, a pixel centre is
    at (column + 0.5, row + 0.5)). The frame is the IMAGE item's Referenced Frame Number (the
    middle frame is left to the caller when none is given). SCOORDs of one Measurement Group
    (TID 1410/1411) form one lesion; SCOORDs outside any group form one lesion together. A group
    with only points or two-point lines (calipers) gives the box around them, flagged
    (``outline`` False).

    Parameters
    ----------
    ds : pydicom.Dataset
        Enhanced, Comprehensive or Comprehensive 3D SR.
    image : pydicom.Dataset
        The ultrasound image (header enough): its SOP Instance UID, Rows, Columns and Number
        of Frames.

    Raises
    ------
    FeatureError
        Not an SR, no SCOORD referencing the image, bad graphic data or frame number, or a
        lesion with no area inside the image.
    """
    source = f"SR {ds.get('SOPInstanceUID', '(no SOP Instance UID)')}"
    image_uid = str(image.SOPInstanceUID)
    if str(ds.get("SOPClassUID", "")) not in SR_CLASSES:
        raise FeatureError(f"{source}: SOP class {ds.get('SOPClassUID', '(none)')} is not a "
                           "structured report")
    image_shape, n_frames = _image_geometry(image)
    groups: dict[int, tuple[str, list[_Shape]]] = {}
    loose: list[_Shape] = []
    # (item, enclosing measurement group id or None)
    stack: list[tuple[Dataset, int | None]] = [(item, None)
                                               for item in ds.get("ContentSequence", [])]
    while stack:
        item, group = stack.pop()
        value_type = str(item.get("ValueType", ""))
        concept = item.get("ConceptNameCodeSequence")
        if value_type == "CONTAINER" and _code(concept) == _MEASUREMENT_GROUP:
            group = id(item)
            groups[group] = (_tracking_identifier(item), [])
        if value_type == "SCOORD":
            shape = _sr_shape(item, image_uid, n_frames, source)
            if shape is not None:
                (groups[group][1] if group is not None else loose).append(shape)
        stack.extend((child, group) for child in item.get("ContentSequence", []))
    lesions = [_lesion(shapes, image_shape, source, "sr", label)
               for label, shapes in groups.values() if shapes]
    if loose:
        lesions.append(_lesion(loose, image_shape, source, "sr", ""))
    if not lesions:
        raise FeatureError(f"{source}: no image region (SCOORD) references image {image_uid}")
    return lesions


def _code(concept: object) -> tuple[str, str] | None:
    """(code value, coding scheme designator) of a Concept Name Code Sequence."""
    if not isinstance(concept, Sequence) or not concept:
        return None
    item = concept[0]
    return str(item.get("CodeValue", "")), str(item.get("CodingSchemeDesignator", ""))


def _tracking_identifier(group: Dataset) -> str:
    for child in group.get("ContentSequence", []):
        concept = child.get("ConceptNameCodeSequence")
        if _code(concept) == _TRACKING_IDENTIFIER and str(child.get("ValueType", "")) == "TEXT":
            return str(child.get("TextValue", ""))
    return ""


def _sr_shape(item: Dataset, image_uid: str, n_frames: int, source: str) -> _Shape | None:
    for child in item.get("ContentSequence", []):
        refs = child.get("ReferencedSOPSequence")
        if str(child.get("ValueType", "")) != "IMAGE" or not refs:
            continue
        if str(refs[0].get("ReferencedSOPInstanceUID", "")) != image_uid:
            continue
        frame = _frame_index(refs[0].get("ReferencedFrameNumber"), n_frames, source)
        return _Shape(str(item.get("GraphicType", "")),
                      _points(item.get("GraphicData", []), source), frame)
    return None


def lesions_from_gsps(ds: Dataset, image: Dataset) -> list[Lesion]:
    """Lesion masks from a softcopy presentation state's graphics on ``image``.

    Graphic objects in PIXEL units (POLYLINE and INTERPOLATED of three points or more, CIRCLE,
    ELLIPSE; POINT and two-point lines as calipers) of every Graphic Annotation that references
    the image (or, when it names no image, of a presentation state that references it) are
    rasterised as in :func:`lesions_from_sr`. The frame is the annotation's Referenced Frame
    Number. Objects sharing a Graphic Group ID form one lesion; the others of one Graphic
    Annotation item form one lesion. DISPLAY-unit objects depend on the viewer's displayed
    area and are not used.

    Raises
    ------
    FeatureError
        Not a presentation state, no PIXEL-unit graphic on the image, or a lesion with no area.
    """
    source = f"presentation state {ds.get('SOPInstanceUID', '(no SOP Instance UID)')}"
    image_uid = str(image.SOPInstanceUID)
    if str(ds.get("SOPClassUID", "")) not in PRESENTATION_STATE_CLASSES:
        raise FeatureError(f"{source}: SOP class {ds.get('SOPClassUID', '(none)')} is not a "
                           "softcopy presentation state")
    image_shape, n_frames = _image_geometry(image)
    state_frames: dict[str, object] = {}
    for series in ds.get("ReferencedSeriesSequence", []):
        for ref in series.get("ReferencedImageSequence", []):
            state_frames[str(ref.ReferencedSOPInstanceUID)] = ref.get("ReferencedFrameNumber")
    groups: dict[tuple[int, object], tuple[str, list[_Shape]]] = {}
    display_only = 0
    for number, annotation in enumerate(ds.get("GraphicAnnotationSequence", [])):
        refs = annotation.get("ReferencedImageSequence")
        if refs:
            frames = {str(r.ReferencedSOPInstanceUID): r.get("ReferencedFrameNumber")
                      for r in refs}
        else:
            frames = state_frames
        if image_uid not in frames:
            continue
        frame = _frame_index(frames[image_uid], n_frames, source)
        layer = str(annotation.get("GraphicLayer", ""))
        for graphic in annotation.get("GraphicObjectSequence", []):
            if str(graphic.get("GraphicAnnotationUnits", "")) != "PIXEL":
                display_only += 1
                continue
            key = (number, graphic.get("GraphicGroupID"))
            groups.setdefault(key, (layer, []))[1].append(
                _Shape(str(graphic.get("GraphicType", "")),
                       _points(graphic.get("GraphicData", []), source), frame))
    if not groups:
        extra = f" ({display_only} in DISPLAY units, not used)" if display_only else ""
        raise FeatureError(f"{source}: no PIXEL-unit graphic references image "
                           f"{image_uid}{extra}")
    return [_lesion(shapes, image_shape, source, "gsps", label)
            for label, shapes in groups.values()]


def lesions_from_seg(ds: Dataset, image: Dataset) -> list[Lesion]:
    """Lesion masks from a DICOM Segmentation of ``image``: one per segment, on the source
    frame each segment's frames were derived from (read with highdicom).

    A segment present on several source frames gives the frame where it is largest. FRACTIONAL
    segmentations are thresholded at one half.

    Raises
    ------
    FeatureError
        Not a SEG, unreadable, no segment of the image, or segments of another image size.
    """
    import highdicom as hd

    source = f"SEG {ds.get('SOPInstanceUID', '(no SOP Instance UID)')}"
    image_uid = str(image.SOPInstanceUID)
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION:
        raise FeatureError(f"{source}: SOP class {ds.get('SOPClassUID', '(none)')} is not a "
                           "segmentation")
    image_shape, n_frames = _image_geometry(image)
    if (int(ds.Rows), int(ds.Columns)) != image_shape:
        raise FeatureError(f"{source}: its {ds.Columns} × {ds.Rows} frames are not the "
                           f"{image_shape[1]} × {image_shape[0]} image")
    per_segment: dict[int, set[int | None]] = {}
    shared = (ds.SharedFunctionalGroupsSequence[0]
              if ds.get("SharedFunctionalGroupsSequence") else Dataset())
    for item in ds.get("PerFrameFunctionalGroupsSequence", []):
        # a functional group is per frame or, when the same for all frames, shared
        identification = (item.get("SegmentIdentificationSequence")
                          or shared.get("SegmentIdentificationSequence"))
        segment = int(identification[0].ReferencedSegmentNumber) if identification else None
        derivations = (item.get("DerivationImageSequence")
                       or shared.get("DerivationImageSequence") or [])
        for derivation in derivations:
            for ref in derivation.get("SourceImageSequence", []):
                if str(ref.get("ReferencedSOPInstanceUID", "")) == image_uid and segment:
                    per_segment.setdefault(segment, set()).add(
                        _frame_index(ref.get("ReferencedFrameNumber"), n_frames, source))
    if not per_segment:
        raise FeatureError(f"{source}: no segment is derived from image {image_uid}")
    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
        lesions = []
        for segment, frames in sorted(per_segment.items()):
            label = str(seg.get_segment_description(segment).segment_label)
            best: tuple[int, int | None, np.ndarray] | None = None
            for frame in frames:
                if n_frames == 1:
                    pixels = seg.get_pixels_by_source_instance(
                        [image_uid], segment_numbers=[segment])[0, ..., 0]
                else:
                    pixels = seg.get_pixels_by_source_frame(
                        image_uid, [1 + (frame or 0)], segment_numbers=[segment])[0, ..., 0]
                mask = np.asarray(pixels) >= 0.5 if seg.segmentation_type.value == \
                    "FRACTIONAL" else np.asarray(pixels) > 0
                if best is None or int(mask.sum()) > best[0]:
                    best = (int(mask.sum()), frame, mask)
            if best is not None and best[0] > 0:
                lesions.append(Lesion(best[2], best[1], "seg", True, label))
    except (ValueError, KeyError, AttributeError, IndexError, RuntimeError) as exc:
        raise FeatureError(f"{source}: cannot be read as a segmentation ({exc})") from exc
    if not lesions:
        raise FeatureError(f"{source}: the segments of image {image_uid} are empty")
    return lesions


def _voc_box(bounds: tuple[float, float, float, float], source: str) -> Box:
    x0, y0 = math.floor(bounds[0]), math.floor(bounds[1])
    x1, y1 = math.ceil(bounds[2]), math.ceil(bounds[3])
    if x1 <= x0 or y1 <= y0:
        raise FeatureError(f"{source}: the ROI is degenerate (box {x0},{y0}-{x1},{y1} has no "
                           "area)")
    if x1 < 0 or y1 < 0:
        raise FeatureError(f"{source}: the ROI lies outside the image (box {x0},{y0}-{x1},{y1})")
    return x0, y0, x1, y1


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
        boxes.append(_voc_box((max(x0, 0.0), max(y0, 0.0), x1, y1), f"{name} object {number}"))
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
