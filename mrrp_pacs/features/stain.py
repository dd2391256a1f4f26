"""Stain estimation and normalisation of H&E: per-image (or per-slide) vectors, concentrations.

A bright-field H&E pixel obeys Beer–Lambert: its optical density relative to the empty glass,
``OD = -ln((RGB + 1) / (glass + 1))`` per channel, is ``c_H · h + c_E · e`` with ``h`` and ``e``
the unit optical-density vectors of the two dyes as *this* laboratory and scanner produced them.
Fixed vectors (Ruifrok & Johnston's, which :func:`skimage.color.rgb2hed` inverts) and a fixed
near-white glass only fit slides stained and scanned like theirs. Here every image (or every
slide, :func:`estimate_stain` over pixels pooled from its tiles) gets its own:

- **glass**: the per-channel median of the brightest 1 % of pixels when they are glass-bright
  (every channel ≥ :data:`GLASS_MIN_RGB`: no stained tissue transmits that much in all three
  channels), else the illuminant a tile full of tissue is assumed to sit on,
  :data:`ASSUMED_GLASS_RGB`. Tinted glass (a cool or warm white balance) is thus divided out.
- **background exclusion** by an adaptive optical-density threshold: pixels whose OD norm
  exceeds the spread of the glass pixels (:data:`NOISE_SIGMAS` robust standard deviations
  above their median, never below :data:`MIN_TISSUE_OD`) are tissue. The noise comes
  from the image (JPEG, grain, tinted glass), so no fixed 0.15 OD level is assumed.
- **vectors** by Macenko et al.'s method ("A method for normalizing histology slides for
  quantitative analysis", ISBI 2009): the plane of the two largest principal directions of the
  tissue ODs (here uncentred, through zero OD), the 1st and 99th percentile of the angle in that
  plane, measured from the mean tissue direction, as the two dyes; the dye
  with the larger red optical density is hematoxylin (it absorbs red; eosin barely does). A
  third, residual vector completes the basis: the unit cross product, positive.
- **concentrations** ``C = M⁻¹ · OD`` with ``M = [h, e, r]``: the optical density each dye
  contributes *along its own unit vector* (natural log, the Ruifrok–Johnston convention), so a
  nucleus of the same dye load reads the same number whatever the dye's hue at a site. This is
  the normalised space: no reference RGB matrix is involved, and the residual ``r`` measures
  colour outside the H&E plane (pen, pigment, DAB).

Why not torchstain (1.4.1, a dependency) for the estimate: its ``MacenkoNormalizer`` assumes a
grey-white illuminant (one scalar ``Io`` = 240) where glass can be tinted per channel; it drops
every pixel with *any* channel below a fixed β = 0.15 OD, which removes pure-eosin pixels whose
red optical density is low (Ruifrok–Johnston eosin's red is 0.07: the eosin end of the angle
range is then never seen); its principal axes keep numpy's arbitrary sign, so the angles can
wrap around ±π and the percentiles pick the wrong dyes; its centred covariance finds one
direction only in a field of two kinds of pixel (a nucleus on stroma); and its only output
besides the vectors is an RGB image re-coloured to its reference matrix (the Macenko reference
matrix, which one of the phantom's sites uses as its stain). The estimator below follows the
same published steps on numpy with those five points changed; the tests check it agrees with
torchstain's on white glass where torchstain's assumptions hold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mrrp_pacs.errors import FeatureError

STAIN_VERSION = "1"  # part of the version of every family that reads concentrations

GLASS_MIN_RGB = 200.0  # glass transmits at least ~78 % in every channel on a bright-field scanner
ASSUMED_GLASS_RGB = (242.0, 242.0, 242.0)  # illuminant assumed under a tile with no glass
BRIGHT_SHARE = 0.01  # the brightest 1 % of pixels: glass if glass-bright
NOISE_SIGMAS = 6.0
MIN_TISSUE_OD = 0.03  # below this even noise-free pixels have too little dye to give a direction
MACENKO_ALPHA = 1.0  # percentile of the angle taken as each dye's extreme
MIN_TISSUE_PIXELS = 400  # fewer: no estimate (too few to find two directions)
MIN_DYE_ANGLE_DEG = 8.0  # closer vectors cannot be told apart: no estimate
MAX_SAMPLE = 250_000  # pixels used for the estimate (a fixed stride over the image)


@dataclass(frozen=True)
class StainEstimate:
    """One image's (or slide's) glass and dye vectors.

    Attributes
    ----------
    glass_rgb
        (3,) float64, the empty-glass colour divided out.
    vectors
        (3, 3) float64 unit optical-density vectors as columns: hematoxylin, eosin, residual.
    tissue_od
        OD norm above which a pixel is tissue (adaptive, from the image's own noise).
    glass_found
        True when glass was seen; False when :data:`ASSUMED_GLASS_RGB` was assumed.
    """

    glass_rgb: np.ndarray
    vectors: np.ndarray
    tissue_od: float
    glass_found: bool

    def __post_init__(self) -> None:
        if self.glass_rgb.shape != (3,) or self.vectors.shape != (3, 3):
            raise FeatureError(f"stain estimate needs a (3,) glass and (3, 3) vectors, got "
                               f"{self.glass_rgb.shape} and {self.vectors.shape}")

    @property
    def hematoxylin(self) -> np.ndarray:
        return self.vectors[:, 0]

    @property
    def eosin(self) -> np.ndarray:
        return self.vectors[:, 1]

    def optical_density(self, rgb: np.ndarray) -> np.ndarray:
        """(..., 3) uint8 RGB → (..., 3) float32 natural-log OD relative to the glass."""
        return _optical_density(rgb, self.glass_rgb)

    def concentrations(self, rgb: np.ndarray) -> np.ndarray:
        """(..., 3) uint8 RGB → (..., 3) float32 hematoxylin, eosin and residual concentrations.

        Hematoxylin and eosin are clipped at 0; the residual keeps its sign.
        """
        od = self.optical_density(rgb)
        unmix = np.linalg.inv(self.vectors).T.astype(np.float32)
        out = od @ unmix
        np.maximum(out[..., :2], 0.0, out=out[..., :2])
        return out

    def tissue(self, rgb: np.ndarray) -> np.ndarray:
        """(..., 3) uint8 RGB → (...) bool, tissue (OD norm above :attr:`tissue_od`)."""
        od = self.optical_density(rgb)
        return np.sqrt((od * od).sum(axis=-1)) > self.tissue_od


def _optical_density(rgb: np.ndarray, glass_rgb: np.ndarray) -> np.ndarray:
    return (np.log((glass_rgb + 1.0).astype(np.float32))
            - np.log(rgb.astype(np.float32) + 1.0)).astype(np.float32)


def _sample(rgb: np.ndarray) -> np.ndarray:
    pixels = np.asarray(rgb).reshape(-1, 3)
    stride = max(1, len(pixels) // MAX_SAMPLE)
    return pixels[::stride]


def estimate_glass(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The glass colour of (n, 3) uint8 pixels (see the module docstring).

    Returns
    -------
    glass_rgb
        (3,) float64.
    glass_pixels
        The brightest pixels the colour was taken from, or None when they were not
        glass-bright and :data:`ASSUMED_GLASS_RGB` was assumed.
    """
    brightness = pixels.astype(np.int32).sum(axis=1)
    count = max(1, round(BRIGHT_SHARE * len(pixels)))
    brightest = pixels[np.argpartition(-brightness, count - 1)[:count]]
    glass = np.median(brightest.astype(np.float64), axis=0)
    if np.all(glass >= GLASS_MIN_RGB):
        return glass, brightest
    return np.asarray(ASSUMED_GLASS_RGB, np.float64), None


def tissue_threshold(glass_od_norm: np.ndarray | None) -> float:
    """Adaptive OD-norm level between background and tissue, from the glass's own noise.

    Parameters
    ----------
    glass_od_norm
        OD norms of the glass pixels (relative to the glass colour), or None when no glass was
        seen: then every pixel above :data:`MIN_TISSUE_OD` is tissue.

    The glass's spread (JPEG, grain, uneven illumination) is its robust standard deviation
    (1.4826 × MAD) about its median; tissue lies :data:`NOISE_SIGMAS` deviations above that
    median, and at least :data:`MIN_TISSUE_OD` above zero.
    """
    if glass_od_norm is None or len(glass_od_norm) == 0:
        return MIN_TISSUE_OD
    centre = float(np.median(glass_od_norm))
    noise = 1.4826 * float(np.median(np.abs(glass_od_norm - centre)))
    return max(MIN_TISSUE_OD, centre + NOISE_SIGMAS * noise)


def macenko_vectors(od: np.ndarray, alpha: float = MACENKO_ALPHA) -> np.ndarray | None:
    """Hematoxylin and eosin unit vectors from (n, 3) tissue optical densities (Macenko 2009).

    Returns
    -------
    np.ndarray or None
        (3, 2) columns hematoxylin, eosin; None when the two directions are closer than
        :data:`MIN_DYE_ANGLE_DEG` (one dye only: no basis can be found).
    """
    # the plane through zero OD that holds the pixels best: uncentred second moments (mixtures
    # of two dyes span a plane through the origin; the centred covariance of a field with few
    # kinds of pixel, e.g. nuclei on stroma, has one meaningful direction only)
    _, axes = np.linalg.eigh(od.T @ od / len(od))
    plane = axes[:, 1:3]
    projected = od @ plane
    # angles are measured from the mean tissue direction: the dye cone (narrower than 180°)
    # then lies within ±90° and never wraps around ±π, whatever sign numpy gave the axes
    mean = projected.mean(axis=0)
    mean /= np.linalg.norm(mean)
    phi = np.arctan2(projected[:, 1] * mean[0] - projected[:, 0] * mean[1], projected @ mean)
    low, high = np.percentile(phi, [alpha, 100 - alpha])
    ends = [plane @ (mean * np.cos(a) + np.array([-mean[1], mean[0]]) * np.sin(a))
            for a in (low, high)]
    ends = [v / np.linalg.norm(v) for v in ends]
    if ends[0] @ ends[1] > np.cos(np.radians(MIN_DYE_ANGLE_DEG)):
        return None
    hema, eosin = (ends[0], ends[1]) if ends[0][0] > ends[1][0] else (ends[1], ends[0])
    return np.stack([np.abs(hema), np.abs(eosin)], axis=1)


def estimate_stain(rgb: np.ndarray) -> StainEstimate | None:
    """Estimate glass, tissue level and dye vectors from an image or a stack of tiles.

    Parameters
    ----------
    rgb
        (..., 3) uint8 RGB: one tile, or all tiles of a slide (a per-slide estimate).

    Returns
    -------
    StainEstimate or None
        None when fewer than :data:`MIN_TISSUE_PIXELS` pixels are tissue or only one dye is
        present (blank glass, a speck): there is then nothing to measure.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.shape[-1:] != (3,):
        raise FeatureError(f"stain estimation needs (..., 3) uint8 RGB, got {rgb.dtype} "
                           f"{rgb.shape}")
    pixels = _sample(rgb)
    if len(pixels) == 0:
        return None
    glass, glass_pixels = estimate_glass(pixels)
    od = _optical_density(pixels, glass).astype(np.float64)
    norm = np.sqrt((od * od).sum(axis=1))
    level = tissue_threshold(None if glass_pixels is None else np.sqrt(
        (_optical_density(glass_pixels, glass).astype(np.float64) ** 2).sum(axis=1)))
    tissue = od[(norm > level) & np.all(od > -level, axis=1)]
    if len(tissue) < MIN_TISSUE_PIXELS:
        return None
    pair = macenko_vectors(tissue)
    if pair is None:
        return None
    residual = np.cross(pair[:, 0], pair[:, 1])
    residual /= np.linalg.norm(residual)
    if residual.sum() < 0:
        residual = -residual
    return StainEstimate(glass, np.column_stack([pair, residual]), level,
                         glass_pixels is not None)
