"""PyRadiomics features of the ultrasound lesion ROI, grouped into tokens by feature class.

The frame is handed to PyRadiomics as a true 2D SimpleITK image with its spacing in mm: a
one-slice 3D volume makes PyRadiomics skip LoG silently, and ``force2D`` on a 3D volume turns
the wavelet into a 1-D one, so ``force2D`` stays off. Image types: Original, Wavelet (coif1,
four sub-bands LH/HL/HH/LL) and LoG (σ = 1, 2, 3 mm by default); feature classes firstorder,
glcm, glrlm, glszm, gldm, ngtdm and shape2D (enabled explicitly; PyRadiomics computes shape
on the original image only). That is 7 + 4 × 6 + 3 × 6 = 49 tokens of 24 values (glcm, the
largest class; shorter classes are zero-padded), 753 features in all.

Settings, and why:

- the image is resampled to 0.2 mm/px (B-spline) before extraction: features are then
  comparable between probes whose native spacing differs, and large lesions stay within the
  1 s budget (at the phantom's native 0.1 mm the slowest of 40 ROIs took 2.7 s, at 0.2 mm the
  slowest of 48 took 0.9 s; the margin signal below was the same at both spacings);
- a fixed bin count (32) rather than a bin width: B-mode intensities are log-compressed and
  device-dependent, not calibrated units;
- the mask is the lesion's mask (:class:`mrrp_pacs.features.us_roi.Lesion`): the drawn
  outline rasterised, so shape2D describes the outline and the texture classes see lesion
  pixels only. A box is accepted as the flagged fallback (``box_roi``) when no outline was
  drawn. On 24 phantom frames with the traced outline, shape2D sphericity reached Spearman
  0.96 against the latent margin trait; with the box of the same lesions the best shape
  feature reached 0.30 (``benchmarks/bench_lesion_masks.py``).

Feature values are PyRadiomics' raw values (scales differ by orders of magnitude); scaling is
the model's job, fitted on training data.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from radiomics import featureextractor, getFeatureClasses

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.us_roi import Box, clip_box

LOGGER = logging.getLogger(__name__)

RADIOMICS_VERSION = "2"  # 2: on the lesion mask (1: on its box)
FEATURE_CLASSES = ("firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm", "shape2D")
WAVELET_BANDS = ("LH", "HL", "HH", "LL")
MIN_ROI_PIXELS = 16


@dataclass(frozen=True)
class RadiomicsSettings:
    """Extraction settings; part of the feature cache key through ``RADIOMICS_VERSION``.

    Attributes
    ----------
    resampled_pixel_mm : float
        Isotropic pixel size (mm) the image and mask are resampled to.
    bin_count : int
        Gray-level bins per image type.
    log_sigmas_mm : tuple[float, ...]
        LoG σ (mm). The resampled crop is padded by 2 σ of the largest, so it always spans the
        σ / spacing + 1 pixels PyRadiomics requires.
    wavelet : str
        PyWavelets name.
    """

    resampled_pixel_mm: float = 0.2
    bin_count: int = 32
    log_sigmas_mm: tuple[float, ...] = (1.0, 2.0, 3.0)
    wavelet: str = "coif1"


def _image_types(settings: RadiomicsSettings) -> list[str]:
    """PyRadiomics' names for the derived images, in token order."""
    logs = [f"log-sigma-{str(float(s)).replace('.', '-')}-mm-3D" for s in settings.log_sigmas_mm]
    return ["original", *(f"wavelet-{band}" for band in WAVELET_BANDS), *logs]


@functools.cache
def _class_features(feature_class: str) -> tuple[str, ...]:
    """Non-deprecated feature names of a PyRadiomics class, sorted."""
    names = getFeatureClasses()[feature_class].getFeatureNames()
    return tuple(sorted(name for name, deprecated in names.items() if not deprecated))


def token_layout(settings: RadiomicsSettings | None = None) -> list[tuple[str, list[str]]]:
    """(token name, full feature names) for every token, in the order of
    :func:`radiomics_tokens`: image type (original, wavelet LH/HL/HH/LL, LoG by σ), then class.

    Feature names are PyRadiomics' (``<image type>_<class>_<feature>``).
    """
    settings = settings or RadiomicsSettings()
    layout = []
    for image_type in _image_types(settings):
        for feature_class in FEATURE_CLASSES:
            if feature_class == "shape2D" and image_type != "original":
                continue
            prefix = f"{image_type}_{feature_class}"
            layout.append((prefix, [f"{prefix}_{f}" for f in _class_features(feature_class)]))
    return layout


@functools.cache
def _extractor(settings: RadiomicsSettings, pad_px: int
               ) -> featureextractor.RadiomicsFeatureExtractor:
    # PyRadiomics logs every step at INFO and warns on routine events; feature errors reach
    # the caller as exceptions instead.
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    extractor = featureextractor.RadiomicsFeatureExtractor(
        binCount=settings.bin_count,
        resampledPixelSpacing=[settings.resampled_pixel_mm] * 2,
        interpolator="sitkBSpline",
        padDistance=pad_px,
        force2D=False,
        label=1,
        additionalInfo=False,
        minimumROIDimensions=2,
        minimumROISize=MIN_ROI_PIXELS,
    )
    extractor.disableAllFeatures()
    for feature_class in FEATURE_CLASSES:
        extractor.enableFeatureClassByName(feature_class)
    extractor.disableAllImageTypes()
    extractor.enableImageTypes(Original={}, Wavelet={"wavelet": settings.wavelet},
                               LoG={"sigma": [float(s) for s in settings.log_sigmas_mm]})
    return extractor


def radiomics_tokens(gray: np.ndarray, box_or_mask: Box | np.ndarray,
                     pixel_mm: tuple[float, float] | None, *,
                     settings: RadiomicsSettings | None = None
                     ) -> tuple[np.ndarray, list[str], list[list[str]]]:
    """Radiomics features of one lesion, one token per (image type, feature class).

    Parameters
    ----------
    gray : np.ndarray
        (rows, columns) grayscale frame in [0, 255].
    box_or_mask : Box | np.ndarray
        The (rows, columns) bool lesion mask, or, as the fallback when no outline was drawn,
        the ROI box ``(x0, y0, x1, y1)`` (inclusive pixel indices, x = column).
    pixel_mm : tuple[float, float] | None
        (row, column) mm/px of ``gray``.
    settings : RadiomicsSettings | None
        Defaults: 0.2 mm resampling, 32 bins, LoG σ 1/2/3 mm, coif1 wavelet.

    Returns
    -------
    tokens : np.ndarray
        (49, 24) float32 with the defaults: (n_tokens, longest class), zero-padded.
    token_names : list[str]
        ``<image type>_<class>``, e.g. ``wavelet-HH_glcm``.
    feature_names : list[list[str]]
        Per token, the PyRadiomics name of each value before the padding.

    Raises
    ------
    FeatureError
        No pixel size, an ROI outside the image or under 16 pixels, or PyRadiomics refusing the
        mask or leaving a token out.
    """
    settings = settings or RadiomicsSettings()
    if pixel_mm is None:
        raise FeatureError("radiomics: the image has no pixel size in mm; read it with a "
                           "default_pixel_mm")
    if gray.ndim != 2:
        raise FeatureError(f"radiomics: expected a 2D frame, got shape {gray.shape}")
    mask = _mask(box_or_mask, gray.shape)
    # pad the resampled crop so the largest LoG kernel (±2σ) sees tissue, not the crop edge
    pad_px = math.ceil(2 * max(settings.log_sigmas_mm, default=0.0)
                       / settings.resampled_pixel_mm)
    image = sitk.GetImageFromArray(np.ascontiguousarray(gray, dtype=np.float32))
    label = sitk.GetImageFromArray(mask.astype(np.uint8))
    spacing = (float(pixel_mm[1]), float(pixel_mm[0]))  # SimpleITK orders (x, y) = (column, row)
    image.SetSpacing(spacing)
    label.SetSpacing(spacing)
    try:
        result = _extractor(settings, pad_px).execute(image, label)
    except (ValueError, RuntimeError, IndexError) as exc:
        raise FeatureError(f"radiomics: PyRadiomics refused the ROI ({exc})") from exc
    layout = token_layout(settings)
    width = max(len(names) for _, names in layout)
    tokens = np.zeros((len(layout), width), dtype=np.float32)
    for row, (token, names) in enumerate(layout):
        missing = [n for n in names if n not in result]
        if missing:
            raise FeatureError(f"radiomics: PyRadiomics did not compute {token} "
                               f"({len(missing)} features missing, e.g. {missing[0]})")
        tokens[row, : len(names)] = [float(result[n]) for n in names]
    bad = ~np.isfinite(tokens)
    if bad.any():
        # undefined values (e.g. a correlation over a constant region) carry no information
        LOGGER.debug("radiomics: %d non-finite feature values set to 0", int(bad.sum()))
        tokens[bad] = 0.0
    return tokens, [token for token, _ in layout], [names for _, names in layout]


def _mask(box_or_mask: Box | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    rows, columns = shape
    if isinstance(box_or_mask, np.ndarray):
        if box_or_mask.shape != (rows, columns):
            raise FeatureError(f"radiomics: mask shape {box_or_mask.shape} differs from the "
                               f"frame's {(rows, columns)}")
        mask = box_or_mask.astype(bool)
    else:
        x0, y0, x1, y1 = clip_box(box_or_mask, (rows, columns), "radiomics")
        mask = np.zeros((rows, columns), dtype=bool)
        mask[y0 : y1 + 1, x0 : x1 + 1] = True
    if int(mask.sum()) < MIN_ROI_PIXELS:
        raise FeatureError(f"radiomics: the ROI has {int(mask.sum())} pixels, at least "
                           f"{MIN_ROI_PIXELS} are needed")
    return mask
