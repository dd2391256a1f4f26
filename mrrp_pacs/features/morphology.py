"""Nuclear morphology (sc-MTOP): shape, contour curvature and chromatin texture per nucleus.

:func:`nucleus_features` measures every nucleus of a :class:`SegmentedNuclei` in µm;
:func:`patch_token` summarises one tile's nuclei per cell type into a fixed-length token.

Definitions (``mpp`` converts pixels to µm):

- area: pixel count × mpp²; bounding-box area likewise; major/minor axis: lengths of the
  ellipse with the region's second moments (:func:`~mrrp_pacs.features.nuclei.moment_axes_px`);
  eccentricity: of that ellipse.
- contour: the outline at half height of the nucleus mask (marching squares), resampled every
  :data:`CONTOUR_STEP_UM` and smoothed along its length by a Gaussian of
  :data:`CONTOUR_SMOOTHING_UM` (this removes the pixel staircase, which would otherwise
  dominate curvature). Perimeter is its length; circularity 4πA/P² (1 for a disc).
- curvature: turning angle of the contour per µm of arc, positive where the outline is convex
  (a disc of radius r has 1/r everywhere), measured over a sliding window of
  :data:`CURVATURE_WINDOW_UM` (pixel-scale turns are noise). Mean: total turning over the
  perimeter (2π/P for any simple outline, so it grows as nuclei shrink); max and min pick
  out bulges and dents (negative: concave, e.g. where a neighbour pressed in).
- texture: gray-level co-occurrence matrix of the hematoxylin optical density inside the
  nucleus, quantised to :data:`GLCM_LEVELS` levels over [0, :data:`GLCM_MAX_OD`] OD, pixel pairs
  :data:`GLCM_DISTANCE_UM` apart at 0°, 45°, 90° and 135° (both pixels in the same nucleus),
  symmetric and normalised; ASM, contrast, homogeneity (``skimage.feature.graycoprops``
  definitions) and entropy −ΣP ln P, averaged over the four angles.
- intensity: mean and standard deviation of hematoxylin optical density over the nucleus.

Hematoxylin is the normalised concentration of :func:`~mrrp_pacs.features.nuclei.stain_density`
(natural-log OD along the slide's own hematoxylin vector, :mod:`mrrp_pacs.features.stain`), so
texture and intensity do not move with a laboratory's dye hue.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.nuclei import (
    NUCLEUS_TYPES,
    SegmentedNuclei,
    check_tile,
    moment_axes_px,
    stain_density,
)
from mrrp_pacs.features.stain import StainEstimate

MORPHOLOGY_VERSION = "2"  # 2: hematoxylin in the normalised stain space

FEATURE_NAMES = (
    "area_um2",
    "perimeter_um",
    "bbox_area_um2",
    "major_axis_um",
    "minor_axis_um",
    "eccentricity",
    "circularity",
    "curvature_mean_per_um",
    "curvature_max_per_um",
    "curvature_min_per_um",
    "glcm_asm",
    "glcm_contrast",
    "glcm_entropy",
    "glcm_homogeneity",
    "hematoxylin_mean_od",
    "hematoxylin_std_od",
)
TOKEN_STATISTICS = ("mean", "std", "q10", "q50", "q90")
_QUANTILES = (0.10, 0.50, 0.90)

CONTOUR_STEP_UM = 0.25
CONTOUR_SMOOTHING_UM = 0.5
CURVATURE_WINDOW_UM = 3.0
GLCM_LEVELS = 32
GLCM_MAX_OD = 2.0  # darkest hematoxylin the phantom and typical H&E reach
GLCM_DISTANCE_UM = 1.0
GLCM_ANGLES = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)


def nucleus_features(rgb: np.ndarray, segmented: SegmentedNuclei, mpp: float,
                     stain: StainEstimate | None = None) -> tuple[np.ndarray, list[str]]:
    """Morphology of every segmented nucleus.

    Parameters
    ----------
    rgb
        (rows, cols, 3) uint8 H&E tile the nuclei were segmented on.
    segmented
        Its nuclei, labels of the same (rows, cols).
    mpp
        Resolution in µm/px.
    stain
        The slide's stain estimate; None estimates it from ``rgb``.

    Returns
    -------
    features
        (n, len(FEATURE_NAMES)) float32, row ``i`` for label ``i + 1``; finite everywhere.
    names
        :data:`FEATURE_NAMES` as a list.
    """
    check_tile(rgb, mpp)
    labels = segmented.labels
    if labels.shape != rgb.shape[:2]:
        raise FeatureError(f"nucleus labels {labels.shape} do not match the tile "
                           f"{rgb.shape[:2]}")
    n = len(segmented)
    if n == 0:
        return np.zeros((0, len(FEATURE_NAMES)), np.float32), list(FEATURE_NAMES)
    hema = stain_density(rgb, stain)[..., 0].astype(np.float64)
    shape = _moment_shape(labels, n, mpp)
    contour = _contour_shape(labels, n, mpp, shape["area_um2"])
    texture = _glcm_texture(labels, hema, n, mpp)
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n + 1)[1:]
    hema_mean = np.bincount(flat, hema.ravel(), n + 1)[1:] / count
    hema_var = np.bincount(flat, hema.ravel() ** 2, n + 1)[1:] / count - hema_mean**2
    columns = {**shape, **contour, **texture, "hematoxylin_mean_od": hema_mean,
               "hematoxylin_std_od": np.sqrt(np.maximum(hema_var, 0.0))}
    features = np.stack([columns[name] for name in FEATURE_NAMES], axis=1).astype(np.float32)
    return np.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0), list(FEATURE_NAMES)


def _moment_shape(labels: np.ndarray, n: int, mpp: float) -> dict[str, np.ndarray]:
    count = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    major_px, minor_px = moment_axes_px(labels)
    boxes = ndimage.find_objects(labels, max_label=n)
    box_px = np.array([(b[0].stop - b[0].start) * (b[1].stop - b[1].start) if b else 0
                       for b in boxes], np.float64)
    return {
        "area_um2": count * mpp * mpp,
        "bbox_area_um2": box_px * mpp * mpp,
        "major_axis_um": major_px * mpp,
        "minor_axis_um": minor_px * mpp,
        "eccentricity": np.sqrt(1 - (minor_px / major_px) ** 2),
    }


def _contour_shape(labels: np.ndarray, n: int, mpp: float, area_um2: np.ndarray
                   ) -> dict[str, np.ndarray]:
    perimeter = np.zeros(n)
    curvature = np.zeros((n, 3))  # mean, max, min
    step_px = CONTOUR_STEP_UM / mpp
    sigma_steps = CONTOUR_SMOOTHING_UM / CONTOUR_STEP_UM
    window_steps = 2 * round(CURVATURE_WINDOW_UM / CONTOUR_STEP_UM / 2) + 1
    for i, box in enumerate(ndimage.find_objects(labels, max_label=n)):
        if box is None:
            continue
        # pad so that an outline cut by the tile edge still closes (along the edge)
        mask = np.pad(labels[box] == i + 1, 1).astype(np.float64)
        outline = max(find_contours(mask, 0.5), key=len)
        points = _resample_closed(outline, step_px)
        if len(points) < 4:
            continue
        points = ndimage.gaussian_filter1d(points, sigma_steps, axis=0, mode="wrap")
        edges = np.diff(np.vstack([points, points[:1]]), axis=0)
        lengths = np.hypot(edges[:, 0], edges[:, 1])
        perimeter[i] = lengths.sum() * mpp
        heading = np.arctan2(edges[:, 0], edges[:, 1])
        turn = np.angle(np.exp(1j * (np.roll(heading, -1) - heading)))
        # find_contours' winding is not fixed: orient so that the total turn is +2π (convex > 0)
        turn *= np.sign(turn.sum()) or 1.0
        # turning over a window / arc length of the window, so uneven steps do not bias it
        vertex_um = 0.5 * (lengths + np.roll(lengths, -1)) * mpp
        per_um = ndimage.uniform_filter1d(turn, window_steps, mode="wrap") / \
            ndimage.uniform_filter1d(vertex_um, window_steps, mode="wrap")
        curvature[i] = turn.sum() / vertex_um.sum(), per_um.max(), per_um.min()
    circularity = np.where(perimeter > 0, 4 * np.pi * area_um2 / np.maximum(perimeter, 1e-9)**2,
                           0.0)
    return {"perimeter_um": perimeter, "circularity": circularity,
            "curvature_mean_per_um": curvature[:, 0], "curvature_max_per_um": curvature[:, 1],
            "curvature_min_per_um": curvature[:, 2]}


def _resample_closed(points: np.ndarray, step: float) -> np.ndarray:
    """(k, 2) closed polyline → points every ``step`` along it (same units), last ≠ first."""
    if np.array_equal(points[0], points[-1]):
        points = points[:-1]
    ring = np.vstack([points, points[:1]])
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(*np.diff(ring, axis=0).T))])
    count = int(arc[-1] // step)
    if count < 4:
        return points
    at = np.linspace(0.0, arc[-1], count, endpoint=False)
    return np.stack([np.interp(at, arc, ring[:, 0]), np.interp(at, arc, ring[:, 1])], axis=1)


def _glcm_texture(labels: np.ndarray, hema: np.ndarray, n: int, mpp: float
                  ) -> dict[str, np.ndarray]:
    levels = GLCM_LEVELS
    level = np.clip((hema / GLCM_MAX_OD * levels).astype(np.int64), 0, levels - 1)
    distance = max(1, round(GLCM_DISTANCE_UM / mpp))
    i_level, j_level = np.ogrid[0:levels, 0:levels]
    gap2 = ((i_level - j_level) ** 2).astype(np.float64)
    totals = {"glcm_asm": np.zeros(n), "glcm_contrast": np.zeros(n),
              "glcm_entropy": np.zeros(n), "glcm_homogeneity": np.zeros(n)}
    rows, cols = labels.shape
    for angle in GLCM_ANGLES:
        # offsets rounded as skimage.feature.graycomatrix rounds them
        d_row, d_col = round(np.sin(angle) * distance), round(np.cos(angle) * distance)
        first = (slice(max(0, -d_row), rows - max(0, d_row)),
                 slice(max(0, -d_col), cols - max(0, d_col)))
        second = (slice(max(0, d_row), rows - max(0, -d_row)),
                  slice(max(0, d_col), cols - max(0, -d_col)))
        owner = labels[first]
        same = (owner == labels[second]) & (owner > 0)
        index = ((owner[same] - 1) * levels + level[first][same]) * levels + level[second][same]
        counts = np.bincount(index, minlength=n * levels * levels).reshape(n, levels, levels)
        glcm = (counts + counts.transpose(0, 2, 1)).astype(np.float64)
        glcm /= np.maximum(glcm.sum(axis=(1, 2), keepdims=True), 1.0)
        log_p = np.log(glcm, where=glcm > 0, out=np.zeros_like(glcm))
        totals["glcm_asm"] += (glcm**2).sum(axis=(1, 2))
        totals["glcm_contrast"] += (glcm * gap2).sum(axis=(1, 2))
        totals["glcm_entropy"] -= (glcm * log_p).sum(axis=(1, 2))
        totals["glcm_homogeneity"] += (glcm / (1.0 + gap2)).sum(axis=(1, 2))
    return {name: total / len(GLCM_ANGLES) for name, total in totals.items()}


def patch_token(features: np.ndarray, kinds: np.ndarray, whole: np.ndarray | None = None
                ) -> tuple[np.ndarray, list[str]]:
    """One tile's nuclei as a fixed-length token: per cell type, statistics of each feature.

    Parameters
    ----------
    features
        (n, len(FEATURE_NAMES)) from :func:`nucleus_features`.
    kinds
        (n,) type index per nucleus (:data:`NUCLEUS_TYPES`).
    whole
        (n,) bool, nuclei whose outline is complete (``~SegmentedNuclei.touches_border``);
        statistics use only these, counts and fractions use every nucleus (the border policy of
        :mod:`mrrp_pacs.features.nuclei`). None means every nucleus is whole.

    Returns
    -------
    token
        (T,) float32, T = 4 × (2 + len(FEATURE_NAMES) × len(TOKEN_STATISTICS)) = 328: per type
        (in :data:`NUCLEUS_TYPES` order) the count, the fraction of all nuclei, then for each
        feature its mean, standard deviation and 10th/50th/90th percentiles over the type's whole
        nuclei. Zero where a type has no (whole) nucleus; never NaN.
    names
        (T,) names ``<type>_count``, ``<type>_fraction``, ``<type>_<feature>_<statistic>``.
    """
    n_features = len(FEATURE_NAMES)
    features = np.asarray(features, np.float64)
    kinds = np.asarray(kinds)
    if features.ndim != 2 or features.shape[1] != n_features or len(kinds) != len(features):
        raise FeatureError(f"patch token needs (n, {n_features}) features and (n,) kinds, got "
                           f"{features.shape} and {kinds.shape}")
    whole = np.ones(len(kinds), bool) if whole is None else np.asarray(whole, bool)
    if whole.shape != kinds.shape:
        raise FeatureError(f"whole-nucleus flags {whole.shape} do not match kinds {kinds.shape}")
    parts: list[np.ndarray] = []
    for kind in range(len(NUCLEUS_TYPES)):
        of_kind = kinds == kind
        count = int(of_kind.sum())
        block = np.zeros((n_features, len(TOKEN_STATISTICS)))
        measured = features[of_kind & whole]
        if len(measured):
            block[:, 0] = measured.mean(axis=0)
            block[:, 1] = measured.std(axis=0)
            block[:, 2:] = np.quantile(measured, _QUANTILES, axis=0).T
        parts.append(np.array([count, count / max(len(kinds), 1)]))
        parts.append(block.ravel())
    token = np.nan_to_num(np.concatenate(parts), nan=0.0, posinf=0.0, neginf=0.0)
    return token.astype(np.float32), token_names()


def token_names() -> list[str]:
    """Names of the :func:`patch_token` entries, in order."""
    names: list[str] = []
    for kind in NUCLEUS_TYPES:
        names += [f"{kind}_count", f"{kind}_fraction"]
        names += [f"{kind}_{feature}_{stat}" for feature in FEATURE_NAMES
                  for stat in TOKEN_STATISTICS]
    return names
