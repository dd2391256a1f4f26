"""Nucleus segmentation and typing on H&E tiles (the sc-MTOP cell layer).

A :class:`NucleusSegmenter` turns an RGB tile into a :class:`SegmentedNuclei`: an instance label
image, one type per nucleus (:data:`NUCLEUS_TYPES`) and centroids in pixels. Two backends:

- :class:`ClassicalSegmenter` (default, CPU, no weights): stain concentrations with the image's
  (or the slide's) own glass and dye vectors (:mod:`mrrp_pacs.features.stain`), an adaptive
  hematoxylin threshold (Otsu within the tissue), distance-transform watershed to split touching
  nuclei, then typing by a small softmax model over per-nucleus measurements in µm and
  normalised concentration, calibrated on phantom slides (``mrrp_pacs/data/nucleus_types.toml``;
  seeds and procedure are written there).
- :class:`~mrrp_pacs.features.hovernet.HoverNetSegmenter`: HoVer-Net as tiatoolbox defines it,
  from a local checkpoint (never downloaded), at the model's own µm/px.

Every size is in µm and converted with the tile's ``mpp`` (µm per pixel).

Border policy: a nucleus belongs to the tile that holds its centroid. A segmenter labels every
nucleus it sees in the array it is given, including those cut by the array's edge, and flags
them in :attr:`SegmentedNuclei.touches_border`. Best: read the tile with ~16 µm of context on
each side, segment that, and keep the nuclei :meth:`SegmentedNuclei.centred_in` the tile; they
are then measured whole and no nucleus is counted in two tiles. Without context, counts and
fractions still use every nucleus, but shape statistics should use only the whole ones
(:func:`mrrp_pacs.features.morphology.patch_token` takes the flag), because a cut outline is
smaller and straighter than the nucleus, and a sliver of a nucleus centred in the neighbouring
tile may be counted here too.

:func:`match_detections` scores detections against known centres (one-to-one, Hungarian).
"""

from __future__ import annotations

import hashlib
import logging
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Protocol

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment, minimize
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import expand_labels, relabel_sequential, watershed

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.stain import STAIN_VERSION, StainEstimate, estimate_stain

LOGGER = logging.getLogger(__name__)

NUCLEUS_TYPES = ("tumour", "inflammatory", "stromal", "normal")
TUMOUR, INFLAMMATORY, STROMAL, NORMAL = range(4)

# Segmentation constants. Densities are normalised stain concentrations
# (:mod:`mrrp_pacs.features.stain`: natural-log optical density along each dye's own unit vector).
# The nucleus threshold is adaptive: Otsu on the logarithm of the smoothed hematoxylin
# concentration over the tile's tissue. In log space the step between tissue (cytoplasm, stroma)
# and nuclei is far larger than the step between pale tumour nuclei and dark lymphocytes, so a
# tile of both keeps the pale nuclei, and a change of stain intensity (a factor on every
# concentration) moves the threshold with it.
MIN_NUCLEAR_CONTRAST = 0.2  # the two Otsu classes' mean hematoxylin differ less: no nuclei
# Lymphocytes stain darker than tumour nuclei: a dark layer (above DARK_RATIO times the median
# hematoxylin of the foreground) gives them their own watershed seeds where they overlap a paler
# nucleus and the distance map alone has one peak.
DARK_RATIO = 1.3
SMOOTHING_UM = 0.5  # Gaussian sigma: removes stain grain, keeps 1 µm detail
SEED_SPACING_UM = 2.5  # watershed seeds at least this far apart: below a lymphocyte's radius
DARK_SEED_MIN_DEPTH_UM = 1.0  # a dark seed needs a dark core this deep
MIN_AREA_UM2 = 12.0  # fragments below a third of the smallest nucleus (lymphocyte ~25 µm²)
CONTEXT_RING_UM = 6.0  # ring beyond each nucleus whose eosin tells nest from stroma
CONTEXT_BOX_UM = 24.0  # window for glass (duct lumen) and surrounding eosin
GLASS_CONCENTRATION = 0.15  # below this in both dyes a pixel is lumen or glass

TYPE_MODEL_RESOURCE = "nucleus_types.toml"
CLASSICAL_VERSION = "2"  # 2: per-image/per-slide stain vectors, adaptive threshold


@dataclass(frozen=True)
class SegmentedNuclei:
    """Nuclei found in one tile.

    Attributes
    ----------
    labels
        (rows, cols) int32 instance image: 0 is background, nucleus ``i`` has label ``i + 1``.
    kinds
        (n,) int8 index into :data:`NUCLEUS_TYPES` (0 tumour, 1 inflammatory, 2 stromal,
        3 normal epithelial).
    centroids_px
        (n, 2) float64 centroid per nucleus in pixels, (x = column, y = row).
    touches_border
        (n,) bool, the nucleus reaches the edge of the array and its outline may be cut.
    """

    labels: np.ndarray
    kinds: np.ndarray
    centroids_px: np.ndarray
    touches_border: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.kinds)
        if self.labels.ndim != 2 or self.labels.dtype != np.int32:
            raise FeatureError(f"nucleus labels must be a 2-D int32 array, got "
                               f"{self.labels.dtype} {self.labels.shape}")
        if self.centroids_px.shape != (n, 2) or self.touches_border.shape != (n,):
            raise FeatureError(f"{n} nucleus types but centroids {self.centroids_px.shape} and "
                               f"border flags {self.touches_border.shape}")
        top = int(self.labels.max(initial=0))
        if top != n:
            raise FeatureError(f"nucleus labels run to {top} but {n} types were given")

    def __len__(self) -> int:
        return len(self.kinds)

    @classmethod
    def from_labels(cls, labels: np.ndarray, kinds: np.ndarray) -> SegmentedNuclei:
        """Centroids and border flags of ``labels`` ((rows, cols) int32, 1..n) typed ``kinds``."""
        edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        touches = np.zeros(int(labels.max(initial=0)) + 1, bool)
        touches[edge] = True
        return cls(labels, np.asarray(kinds, np.int8), centroids_px(labels), touches[1:])

    def centred_in(self, col0: float, row0: float, col1: float, row1: float) -> np.ndarray:
        """(n,) bool: nuclei whose centroid lies in columns [col0, col1) and rows [row0, row1).

        With a margin of context around a tile (at least the largest nuclear radius, ~10 µm),
        segment the larger array and keep the nuclei centred in the tile: those cut by the
        tile's edge are then measured whole, and each nucleus is owned by exactly one tile.
        """
        x, y = self.centroids_px[:, 0], self.centroids_px[:, 1]
        return (x >= col0) & (x < col1) & (y >= row0) & (y < row1)

    def select(self, keep: np.ndarray) -> SegmentedNuclei:
        """The nuclei where ``keep`` ((n,) bool) is true, relabelled 1..m in their order."""
        keep = np.asarray(keep, bool)
        lookup = np.zeros(len(self) + 1, np.int32)
        lookup[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        return SegmentedNuclei(lookup[self.labels], self.kinds[keep], self.centroids_px[keep],
                               self.touches_border[keep])


def centroids_px(labels: np.ndarray) -> np.ndarray:
    """(rows, cols) labels 1..n → (n, 2) float64 centroids in pixels, (x = column, y = row)."""
    n = int(labels.max(initial=0))
    flat = labels.ravel()
    count = np.maximum(np.bincount(flat, minlength=n + 1)[1:], 1)
    grid = np.indices(labels.shape)
    x = np.bincount(flat, grid[1].ravel(), n + 1)[1:] / count
    y = np.bincount(flat, grid[0].ravel(), n + 1)[1:] / count
    return np.stack([x, y], axis=1)


def moment_axes_px(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Major and minor axis lengths in pixels of the ellipse with each region's second moments.

    Pixels count as unit squares (their own variance 1/12 px² is added), so a one-pixel-wide
    region has a minor axis near 1 px rather than 0 (``skimage.measure.regionprops`` treats
    pixels as points).

    Parameters
    ----------
    labels
        (rows, cols) int labels 1..n.

    Returns
    -------
    major_px, minor_px
        (n,) float64 each.
    """
    n = int(labels.max(initial=0))
    flat = labels.ravel()
    count = np.maximum(np.bincount(flat, minlength=n + 1)[1:], 1)
    grid = np.indices(labels.shape, dtype=np.float64)
    rows, cols = grid[0].ravel(), grid[1].ravel()

    def mean(values: np.ndarray) -> np.ndarray:
        return np.bincount(flat, values, n + 1)[1:] / count

    y, x = mean(rows), mean(cols)
    yy = mean(rows * rows) - y * y + 1 / 12
    xx = mean(cols * cols) - x * x + 1 / 12
    xy = mean(rows * cols) - x * y
    half_gap = np.sqrt(((xx - yy) / 2) ** 2 + xy**2)
    major_var = (xx + yy) / 2 + half_gap
    minor_var = np.maximum((xx + yy) / 2 - half_gap, 1 / 12)
    return 4 * np.sqrt(major_var), 4 * np.sqrt(minor_var)


class NucleusSegmenter(Protocol):
    """A nucleus segmentation backend; ``name`` and ``version`` key the feature cache."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def mpp(self) -> float | None:
        """µm/px the tiles must come at (a learned model's own); None: any."""
        ...

    @property
    def context_um(self) -> float:
        """Context (µm) to read on each side of a tile; the tile keeps the nuclei centred in it."""
        ...

    def segment(self, rgb: np.ndarray, mpp: float) -> SegmentedNuclei:
        """Segment and type the nuclei of ``rgb`` ((rows, cols, 3) uint8) at ``mpp`` µm/px."""
        ...


def check_tile(rgb: np.ndarray, mpp: float) -> None:
    """Raise :class:`FeatureError` unless ``rgb`` is an (rows, cols, 3) uint8 array and ``mpp``
    a positive, finite resolution in µm/px."""
    if not isinstance(rgb, np.ndarray):
        raise FeatureError(f"H&E tile must be a numpy array, got {type(rgb).__name__}")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise FeatureError(f"H&E tile must be (rows, cols, 3) uint8 RGB, got {rgb.dtype} "
                           f"{rgb.shape}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise FeatureError(f"H&E tile is empty: {rgb.shape}")
    if not (np.isfinite(mpp) and mpp > 0):
        raise FeatureError(f"tile resolution must be a positive number of µm/px, got {mpp}")


def stain_density(rgb: np.ndarray, stain: StainEstimate | None = None) -> np.ndarray:
    """Hematoxylin and eosin concentration in the normalised space (:mod:`.stain`).

    Parameters
    ----------
    rgb
        (rows, cols, 3) uint8 H&E image.
    stain
        The slide's stain estimate; None estimates it from ``rgb`` itself.

    Returns
    -------
    np.ndarray
        (rows, cols, 2) float32: hematoxylin (channel 0) and eosin (channel 1) concentration,
        natural-log optical density along each dye's unit vector, clipped at 0. All zero when
        no stain can be estimated (blank glass: nothing is stained).
    """
    return _densities(rgb, stain)[0]


def _densities(rgb: np.ndarray, stain: StainEstimate | None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols, 2) concentrations and (rows, cols) tissue mask (all False: no estimate)."""
    if stain is None:
        stain = estimate_stain(rgb)
    if stain is None:
        return np.zeros((*rgb.shape[:2], 2), np.float32), np.zeros(rgb.shape[:2], bool)
    return stain.concentrations(rgb)[..., :2], stain.tissue(rgb)


class ClassicalSegmenter:
    """Adaptive hematoxylin threshold + distance-transform watershed + measurement-based typing.

    Steps: stain concentrations with the slide's stain estimate, or the tile's own
    (:func:`stain_density`); Gaussian smoothing (0.5 µm); foreground where hematoxylin exceeds
    :func:`nucleus_level` (Otsu of log-hematoxylin over the tissue, then half-way between the
    classes; none when they differ by less than :data:`MIN_NUCLEAR_CONTRAST`); seeds at maxima
    of the distance transform (at least :data:`SEED_SPACING_UM` apart), plus maxima of the dark
    layer (above :data:`DARK_RATIO` × the foreground's median hematoxylin) that no seed already
    covers; watershed on the summed
    distance maps; removal of fragments below :data:`MIN_AREA_UM2`; typing by
    :class:`NucleusTypeModel` over the measurements of :func:`typing_measurements`.
    """

    name = "classical-hematoxylin-watershed"
    mpp = None  # works at the tiling's µm/px
    context_um = 0.0

    def __init__(self, type_model: NucleusTypeModel | None = None,
                 stain: StainEstimate | None = None) -> None:
        """Use ``type_model`` for typing, by default the shipped calibration.

        ``stain``: the slide's stain estimate (:meth:`for_slide`); None estimates it per tile.
        """
        self.type_model = type_model if type_model is not None else default_type_model()
        self.stain = stain
        # a refitted type model changes the output: it is part of the version
        self.version = (f"{CLASSICAL_VERSION}-stain{STAIN_VERSION}-types-"
                        f"{self.type_model.digest()}")

    def for_slide(self, rgb: np.ndarray) -> ClassicalSegmenter:
        """This segmenter bound to the stain estimated over one slide's pixels.

        Parameters
        ----------
        rgb
            (..., 3) uint8: the slide's tiles stacked (or any sample of its pixels). Pooling
            the tiles gives steadier vectors than each tile alone, and a tile without glass
            gets the slide's glass if any tile shows some.

        Returns
        -------
        ClassicalSegmenter
            Same type model and version; per-tile estimation if the slide gives no estimate.
        """
        return ClassicalSegmenter(self.type_model, estimate_stain(rgb))

    def segment(self, rgb: np.ndarray, mpp: float) -> SegmentedNuclei:
        """Segment and type nuclei.

        Parameters
        ----------
        rgb
            (rows, cols, 3) uint8 H&E tile.
        mpp
            Resolution in µm/px.

        Returns
        -------
        SegmentedNuclei
            Empty (no error) when the tile holds no nucleus, e.g. blank glass.
        """
        labels, measurements = measure_instances(rgb, mpp, self.stain)
        return SegmentedNuclei.from_labels(labels, self.type_model.predict(measurements))


def measure_instances(rgb: np.ndarray, mpp: float, stain: StainEstimate | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The classical pipeline up to typing: instances and their typing measurements.

    Parameters
    ----------
    rgb
        (rows, cols, 3) uint8 H&E tile.
    mpp
        Resolution in µm/px.
    stain
        The slide's stain estimate; None estimates it from ``rgb``.

    Returns
    -------
    labels
        (rows, cols) int32 instance labels 1..n (0 background).
    measurements
        (n, len(TYPING_MEASUREMENTS)) float64, see :func:`typing_measurements`.
    """
    check_tile(rgb, mpp)
    density, tissue = _densities(rgb, stain)
    hema = ndimage.gaussian_filter(density[..., 0], SMOOTHING_UM / mpp)
    level = nucleus_level(hema[tissue])
    if level is None:
        return np.zeros(hema.shape, np.int32), np.zeros((0, len(TYPING_MEASUREMENTS)))
    foreground = (hema > level) & tissue
    dark = hema > DARK_RATIO * float(np.median(hema[foreground]))
    labels = split_instances(foreground, dark, mpp)
    return labels, typing_measurements(labels, density, mpp)


def nucleus_level(hema: np.ndarray) -> float | None:
    """Hematoxylin level of the nuclear edge: Otsu on log concentration, then half-way.

    Otsu on the log concentration separates tissue from nuclei; the edge is then placed
    half-way between the two classes' medians (where a blurred step crosses its middle), or
    at the Otsu level if that is higher. Half-way keeps the measured area unbiased whatever the
    blur (JPEG, optics) and the nucleus's size; the Otsu level alone sits near the tissue's
    level and adds a ring of blur to every nucleus.

    Parameters
    ----------
    hema
        (n,) smoothed hematoxylin concentration of the tissue pixels.

    Returns
    -------
    float or None
        None when there are too few pixels or the classes differ by less than
        :data:`MIN_NUCLEAR_CONTRAST` (tissue without nuclei: Otsu would split its grain).
    """
    if hema.size < 64:
        return None
    log_hema = np.log(np.maximum(hema, 1e-3))
    if float(log_hema.max()) - float(log_hema.min()) < 1e-6:
        return None
    level = float(np.exp(threshold_otsu(log_hema)))
    upper, lower = hema[hema > level], hema[hema <= level]
    if len(upper) == 0 or len(lower) == 0 or upper.mean() - lower.mean() < MIN_NUCLEAR_CONTRAST:
        return None
    return max(level, float(np.median(lower) + np.median(upper)) / 2)


def split_instances(foreground: np.ndarray, dark: np.ndarray | None, mpp: float) -> np.ndarray:
    """Split a nucleus mask into instances by a seeded watershed on its distance transform.

    Parameters
    ----------
    foreground
        (rows, cols) bool nucleus mask.
    dark
        (rows, cols) bool mask of the darkest stain, or None. Its own distance maxima become extra
        seeds where they lie more than :data:`SEED_SPACING_UM` from every foreground seed (a dark
        lymphocyte overlapping a paler nucleus).
    mpp
        Resolution in µm/px.

    Returns
    -------
    np.ndarray
        (rows, cols) int32 labels 1..n, fragments below :data:`MIN_AREA_UM2` removed.
    """
    spacing_px = max(1, round(SEED_SPACING_UM / mpp))
    distance = ndimage.distance_transform_edt(foreground)
    seeds = peak_local_max(distance, min_distance=spacing_px, threshold_abs=0.0,
                           exclude_border=False)
    elevation = distance
    if dark is not None and dark.any():
        dark_distance = ndimage.distance_transform_edt(dark)
        dark_seeds = peak_local_max(dark_distance, min_distance=spacing_px,
                                    threshold_abs=DARK_SEED_MIN_DEPTH_UM / mpp,
                                    exclude_border=False)
        if len(dark_seeds) and len(seeds):
            gap = np.hypot(*(dark_seeds[:, None, :] - seeds[None, :, :]).transpose(2, 0, 1))
            dark_seeds = dark_seeds[gap.min(axis=1) > spacing_px]
        seeds = np.concatenate([seeds, dark_seeds])
        elevation = distance + dark_distance
    markers = np.zeros(foreground.shape, np.int32)
    markers[tuple(seeds.T)] = np.arange(1, len(seeds) + 1)
    labels = watershed(-elevation, markers, mask=foreground)
    area_um2 = np.bincount(labels.ravel()) * mpp * mpp
    too_small = area_um2 < MIN_AREA_UM2
    too_small[0] = False
    labels[too_small[labels]] = 0
    return relabel_sequential(labels)[0].astype(np.int32)


# ---------------------------------------------------------------------------------------------
# typing

TYPING_MEASUREMENTS = (
    "log_area_um2",        # size: lymphocytes 6-7.5 µm, tumour ~10.5 µm
    "log_elongation",      # log(major / minor): stromal spindles
    "log_minor_axis_um",   # thin stromal nuclei
    "hematoxylin_mean_od",  # lymphocytes stain darkest
    "log_hematoxylin_std_od",
    "eosin_mean_od",       # eosin left inside the nucleus
    "ring_eosin_od",       # just outside: tumour nests are paler than fibrous stroma
    "log_ring_glass",      # duct lumen touching the nucleus
    "log_box_glass",       # duct lumen nearby (normal epithelium lines ducts)
    "box_eosin_od",        # stroma vs nest, wider
)


def typing_measurements(labels: np.ndarray, density: np.ndarray, mpp: float) -> np.ndarray:
    """Per-nucleus measurements the type model reads, in µm and optical density.

    Parameters
    ----------
    labels
        (rows, cols) int32 instance labels 1..n.
    density
        (rows, cols, 2) hematoxylin and eosin concentration (:func:`stain_density`).
    mpp
        Resolution in µm/px.

    Returns
    -------
    np.ndarray
        (n, len(TYPING_MEASUREMENTS)) float64, columns in :data:`TYPING_MEASUREMENTS` order.
    """
    n = int(labels.max())
    flat = labels.ravel()
    hema, eosin = density[..., 0].astype(np.float64), density[..., 1].astype(np.float64)
    count = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)

    def mean(values: np.ndarray, index: np.ndarray = flat, size: np.ndarray = count
             ) -> np.ndarray:
        return np.bincount(index, values.ravel(), n + 1)[1:] / np.maximum(size, 1.0)

    major_px, minor_px = moment_axes_px(labels)
    major_um, minor_um = major_px * mpp, minor_px * mpp
    x, y = centroids_px(labels).T
    hema_mean = mean(hema)
    hema_std = np.sqrt(np.maximum(mean(hema * hema) - hema_mean**2, 0.0))

    glass = ((hema < GLASS_CONCENTRATION) & (eosin < GLASS_CONCENTRATION)).astype(np.float64)
    ring = expand_labels(labels, CONTEXT_RING_UM / mpp)
    ring[labels > 0] = 0
    ring_flat = ring.ravel()
    ring_count = np.bincount(ring_flat, minlength=n + 1)[1:].astype(np.float64)
    ring_eosin = mean(eosin, ring_flat, ring_count)
    ring_glass = mean(glass, ring_flat, ring_count)

    window = 2 * round(CONTEXT_BOX_UM / 2 / mpp) + 1
    box_glass = ndimage.uniform_filter(glass, window, mode="nearest")
    outside = (labels == 0).astype(np.float64)
    box_eosin = ndimage.uniform_filter(eosin * outside, window, mode="nearest") / np.maximum(
        ndimage.uniform_filter(outside, window, mode="nearest"), 1e-3)
    at_row = np.clip(np.round(y).astype(int), 0, labels.shape[0] - 1)
    at_col = np.clip(np.round(x).astype(int), 0, labels.shape[1] - 1)

    return np.stack([
        np.log(count * mpp * mpp),
        np.log(major_um / minor_um),
        np.log(minor_um),
        hema_mean,
        np.log(hema_std + 1e-3),
        mean(eosin),
        ring_eosin,
        np.log(ring_glass + 0.01),
        np.log(box_glass[at_row, at_col] + 0.01),
        box_eosin[at_row, at_col],
    ], axis=1)


def _quadratic_expansion(z: np.ndarray) -> np.ndarray:
    """(n, f) → (n, f + f(f+1)/2): the standardised measurements and their pairwise products."""
    upper_i, upper_j = np.triu_indices(z.shape[1])
    return np.concatenate([z, z[:, upper_i] * z[:, upper_j]], axis=1)


@dataclass(frozen=True)
class NucleusTypeModel:
    """Softmax regression over standardised measurements and their pairwise products.

    ``p(type | x) ∝ exp(intercept[k] + coef[k] · q(z))`` with ``z = (x - centre) / scale`` and
    ``q(z)`` the measurements followed by their pairwise products (upper triangle, row-major).

    Attributes
    ----------
    measurements
        Names of the columns of ``x``, :data:`TYPING_MEASUREMENTS`.
    centre, scale
        (f,) standardisation.
    coef
        (4, f + f(f+1)/2) weights, rows in :data:`NUCLEUS_TYPES` order.
    intercept
        (4,) biases.
    """

    measurements: tuple[str, ...]
    centre: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray

    def __post_init__(self) -> None:
        f = len(self.measurements)
        width = f + f * (f + 1) // 2
        if self.centre.shape != (f,) or self.scale.shape != (f,) or \
                self.coef.shape != (len(NUCLEUS_TYPES), width) or \
                self.intercept.shape != (len(NUCLEUS_TYPES),):
            raise FeatureError(f"nucleus type model for {f} measurements needs coef "
                               f"({len(NUCLEUS_TYPES)}, {width}), got {self.coef.shape}")

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(n, f) measurements → (n, 4) unnormalised log-probabilities."""
        q = _quadratic_expansion((x - self.centre) / self.scale)
        return q @ self.coef.T + self.intercept

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(n, f) measurements → (n,) int8 type index."""
        if len(x) == 0:
            return np.zeros(0, np.int8)
        return np.argmax(self.logits(x), axis=1).astype(np.int8)

    @classmethod
    def fit(cls, x: np.ndarray, kinds: np.ndarray, l2: float = 1e-3) -> NucleusTypeModel:
        """Fit by penalised maximum likelihood (L-BFGS).

        Parameters
        ----------
        x
            (n, len(TYPING_MEASUREMENTS)) measurements of nuclei whose type is known.
        kinds
            (n,) true type index.
        l2
            Ridge penalty on the weights (not the intercepts), per nucleus.
        """
        centre, scale = x.mean(axis=0), x.std(axis=0) + 1e-9
        q = _quadratic_expansion((x - centre) / scale)
        k, width = len(NUCLEUS_TYPES), q.shape[1]
        onehot = np.eye(k)[kinds]

        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = theta[: k * width].reshape(k, width), theta[k * width:]
            z = q @ w.T + b
            z -= z.max(axis=1, keepdims=True)
            log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            residual = (np.exp(log_p) - onehot) / len(q)
            value = -(onehot * log_p).sum() / len(q) + l2 * (w * w).sum()
            grad_w = residual.T @ q + 2 * l2 * w
            return float(value), np.concatenate([grad_w.ravel(), residual.sum(axis=0)])

        result = minimize(loss, np.zeros(k * width + k), jac=True, method="L-BFGS-B",
                          options={"maxiter": 5000})
        if not result.success:
            LOGGER.warning("nucleus type model fit stopped early: %s", result.message)
        return cls(TYPING_MEASUREMENTS, centre, scale,
                   result.x[: k * width].reshape(k, width), result.x[k * width:])

    def to_toml(self, provenance: str) -> str:
        """The model as TOML text, ``provenance`` (how it was fitted) as leading comments."""
        def row(values: np.ndarray) -> str:
            return "[" + ", ".join(f"{v:.8g}" for v in values) + "]"

        lines = [f"# {line}".rstrip() for line in provenance.splitlines()]
        lines += ["", "measurements = [" + ", ".join(f'"{m}"' for m in self.measurements) + "]",
                  f"centre = {row(self.centre)}", f"scale = {row(self.scale)}",
                  f"intercept = {row(self.intercept)}", "coef = ["]
        lines += [f"    {row(r)}," for r in self.coef] + ["]", ""]
        return "\n".join(lines)

    def digest(self) -> str:
        """First 12 hex digits of the SHA-256 of the parameters (as :meth:`to_toml` writes)."""
        return hashlib.sha256(self.to_toml("").encode()).hexdigest()[:12]

    @classmethod
    def from_toml(cls, text: str, source: str) -> NucleusTypeModel:
        """Parse :meth:`to_toml` output; ``source`` names the file in errors."""
        try:
            data = tomllib.loads(text)
            model = cls(tuple(data["measurements"]), np.asarray(data["centre"], float),
                        np.asarray(data["scale"], float), np.asarray(data["coef"], float),
                        np.asarray(data["intercept"], float))
        except (tomllib.TOMLDecodeError, KeyError, ValueError) as error:
            raise FeatureError(f"nucleus type model {source} is unreadable: {error}") from error
        if model.measurements != TYPING_MEASUREMENTS:
            raise FeatureError(f"nucleus type model {source} reads {model.measurements}, this "
                               f"code measures {TYPING_MEASUREMENTS}: refit it")
        return model


@cache
def default_type_model() -> NucleusTypeModel:
    """The type model shipped in ``mrrp_pacs/data/nucleus_types.toml``."""
    resource = resources.files("mrrp_pacs") / "data" / TYPE_MODEL_RESOURCE
    return NucleusTypeModel.from_toml(resource.read_text(encoding="utf-8"), str(resource))


# ---------------------------------------------------------------------------------------------
# evaluation against known nuclei


@dataclass(frozen=True)
class DetectionMatch:
    """One-to-one matching of detected to true nucleus centres.

    Attributes
    ----------
    pairs
        (m, 2) int indices (detected, true) of matched centres.
    precision, recall, f1
        Over all detections and all true centres given (1.0 when both are empty).
    """

    pairs: np.ndarray
    precision: float
    recall: float
    f1: float


def match_detections(pred_xy_px: np.ndarray, true_xy_px: np.ndarray, radius_px: float
                     ) -> DetectionMatch:
    """Match detections to true centres one-to-one within ``radius_px``.

    The assignment minimises the total distance (Hungarian, ``linear_sum_assignment``) among
    pairs closer than ``radius_px``; a detection matches at most one true nucleus and vice versa.

    Parameters
    ----------
    pred_xy_px, true_xy_px
        (n, 2) and (m, 2) centres in pixels (x, y).
    radius_px
        Largest distance in pixels at which a detection counts as finding a nucleus.
    """
    pred = np.asarray(pred_xy_px, float).reshape(-1, 2)
    true = np.asarray(true_xy_px, float).reshape(-1, 2)
    pairs = np.zeros((0, 2), int)
    if len(pred) and len(true):
        distance = np.hypot(pred[:, None, 0] - true[None, :, 0],
                            pred[:, None, 1] - true[None, :, 1])
        far = distance > radius_px
        # unreachable pairs cost more than any set of reachable ones, so they are chosen last
        cost = np.where(far, radius_px * (len(pred) + len(true) + 1.0), distance)
        rows, cols = linear_sum_assignment(cost)
        keep = ~far[rows, cols]
        pairs = np.stack([rows[keep], cols[keep]], axis=1)
    hits = len(pairs)
    precision = hits / len(pred) if len(pred) else float(len(true) == 0)
    recall = hits / len(true) if len(true) else float(len(pred) == 0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return DetectionMatch(pairs, precision, recall, f1)
