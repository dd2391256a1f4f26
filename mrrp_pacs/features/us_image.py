"""Ultrasound frames as grayscale with their pixel size in mm: the reading step of the
ultrasound branch.

The branch for one ultrasound instance, module by module::

    lesion = us_roi.largest_lesion(us_roi.lesions_from_sr(sr, header))  # or _gsps, _seg;
    #   a VOC box: us_roi.box_lesion(us_roi.roi_from_voc(xml), shape, "voc") (flagged box_roi)
    image = us_image.read_ultrasound(path, frame=lesion.frame, roi=lesion.box)  # the frame
    #   drawn on; luma in [0, 255] + (row, column) mm/px
    # no ROI drawn: box = us_roi.automatic_lesion_candidate(image.gray, image.pixel_mm),
    #               flagged AUTOMATIC_ROI and BOX_ROI
    crop = us_encoder.crop_roi(image.gray, lesion.box)  # (256, 256) float32, box + 6 px margin
    tokens = us_encoder.encode_crops(model, crop[None])  # (1, 256, 64): 16 × 16 map, 64-d tokens

Radiomics (:mod:`mrrp_pacs.features.radiomics`) reads the same image, on the lesion's mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, get_decoder

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.us_roi import Box
from mrrp_pacs.intake.dicom import US_CLASSES

DEFAULT_PIXEL_MM = 0.1
"""mm/px assumed when an image has neither a calibrated US region nor PixelSpacing."""
FALLBACK_SPACING = "fallback_spacing"

# Region Spatial Format 1 = 2D; Physical Units 3 = cm (PS3.3 C.8.5.5.1.1, C.8.5.5.1.15)
_REGION_2D = 1
_REGION_TISSUE = 1
_UNITS_CM = 3
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as YBR_FULL's Y


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
