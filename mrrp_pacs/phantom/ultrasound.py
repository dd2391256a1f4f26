"""Synthetic B-mode breast ultrasound with one lesion whose look carries the US traits.

A linear-probe frame (default 480 × 640 px at 0.1 mm/px: 48 mm deep, 64 mm wide) shows skin,
subcutaneous fat, glandular tissue and pectoral muscle under multiplicative speckle, with
log compression to 8 bits. The lesion is hypoechoic; its size is the tumour size.

A site's machine (:class:`~mrrp_pacs.phantom.sites.UltrasoundMachine`) chooses the field of
view, the pixel spacing and the gain. The anatomy and the lesion are laid out in millimetres
(the background texture on the reference 0.1 mm grid, resampled to the machine's pixels), so the
traits look the same on every machine; speckle is the machine's own. Traits:

- ``us_margin``: high-order harmonics and spicules on the outline (circumscribed → spiculated);
- ``us_orientation``: height / width ratio (parallel → taller than wide);
- ``us_shadowing``: posterior acoustic shadowing (negative values give enhancement);
- ``us_heterogeneity``: internal echo heterogeneity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.draw import polygon as fill_polygon

ROWS, COLUMNS = 480, 640
PIXEL_MM = 0.1  # the reference grid: the anatomy's texture is drawn on it


@dataclass
class UltrasoundFrame:
    pixels: np.ndarray  # (rows, columns) uint8; the middle frame of a cine loop
    pixel_mm: float
    lesion_box_px: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive, (column, row)
    lesion_outline_px: np.ndarray  # (n, 2) (x, y)
    # (frames, rows, columns) uint8 when more than one frame was asked for: the same section
    # under fresh speckle each frame (a held probe); ``pixels`` is frame ``frames // 2``
    cine: np.ndarray | None = None


def _outline(rng: np.random.Generator, traits: dict[str, float], size_mm: float,
             centre: tuple[float, float], pixel_mm: float) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    width_px = min(size_mm, 45.0) / pixel_mm
    height_ratio = 0.65 * np.exp(0.3 * traits["us_orientation"])  # > 1: taller than wide
    a, b = width_px / 2, width_px * height_ratio / 2
    radius = a * b / np.sqrt((b * np.cos(angles)) ** 2 + (a * np.sin(angles)) ** 2)
    irregular = 1 / (1 + np.exp(-1.4 * traits["us_margin"]))  # 0 circumscribed … 1 spiculated
    for k in range(6, 22, 3):  # lobulation and angular margins
        radius *= 1 + 0.04 * irregular * rng.normal() * np.cos(k * angles + rng.uniform(0, 6.3))
    spicules = round(16 * max(0.0, irregular - 0.4))
    for _ in range(spicules):  # thin spikes reaching out of the mass
        at = rng.uniform(0, 2 * np.pi)
        width = rng.uniform(0.03, 0.06)
        bump = np.exp(-0.5 * (np.angle(np.exp(1j * (angles - at))) / width) ** 2)
        radius *= 1 + rng.uniform(0.25, 0.55) * bump
    cx, cy = centre
    return np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)


def _to_machine(field: np.ndarray, rows: int, columns: int, pixel_mm: float) -> np.ndarray:
    """Resample a reference-grid field to a machine's pixels (centred laterally, from the skin)."""
    if (rows, columns, pixel_mm) == (ROWS, COLUMNS, PIXEL_MM):
        return field
    step = pixel_mm / PIXEL_MM
    r = np.arange(rows) * step
    c = np.arange(columns) * step + (COLUMNS - columns * step) / 2
    grid = np.meshgrid(r, c, indexing="ij")
    return ndimage.map_coordinates(field, grid, order=1, mode="nearest").astype(np.float32)


def render_frame(rng: np.random.Generator, traits: dict[str, float], size_mm: float,
                 rows: int = ROWS, columns: int = COLUMNS, pixel_mm: float = PIXEL_MM,
                 gain_db: float = 0.0, frames: int = 1) -> UltrasoundFrame:
    """Render one frame, or a cine loop of ``frames``; ``size_mm`` is the lesion's largest
    diameter (capped at 45 mm).

    ``rows`` x ``columns`` pixels of ``pixel_mm`` must fit in the reference field of view
    (48 mm deep, 64 mm wide); ``gain_db`` scales the echo before log compression.
    """
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    if rows * pixel_mm > ROWS * PIXEL_MM + 1e-6 or columns * pixel_mm > COLUMNS * PIXEL_MM + 1e-6:
        raise ValueError(f"a {rows}x{columns} frame at {pixel_mm} mm/px is larger than the "
                         f"{ROWS * PIXEL_MM:g} x {COLUMNS * PIXEL_MM:g} mm field of the anatomy")
    px = PIXEL_MM / pixel_mm  # machine pixels per reference pixel: texture scales in mm
    depth_mm = np.arange(rows, dtype=np.float32)[:, None] * pixel_mm
    tissue = np.empty((rows, columns), dtype=np.float32)
    fat = _to_machine(ndimage.gaussian_filter(
        rng.standard_normal((ROWS, COLUMNS)).astype(np.float32), 9), rows, columns, pixel_mm)
    gland = _to_machine(ndimage.gaussian_filter(
        rng.standard_normal((ROWS, COLUMNS)).astype(np.float32), (4, 12)), rows, columns,
        pixel_mm)
    tissue[:] = np.where(depth_mm < 2.0, 0.95, 0.0)                     # skin line
    sub = (depth_mm >= 2.0) & (depth_mm < 10.0)
    tissue += np.where(sub, 0.28 + 3.0 * np.clip(fat, -0.06, 0.06), 0.0)  # fat lobules
    glandular = (depth_mm >= 10.0) & (depth_mm < 38.0)
    tissue += np.where(glandular, 0.55 + 1.2 * np.clip(gland, -0.15, 0.15), 0.0)
    muscle = depth_mm >= 38.0
    striations = 0.5 + 0.25 * np.sin(depth_mm * 2.2 + 0.3 * gland * 20)
    tissue += np.where(muscle, 0.35 * striations, 0.0)

    centre = (columns / 2 + rng.uniform(-0.12, 0.12) * COLUMNS * px,
              rng.uniform(17.0, 24.0) / pixel_mm)
    outline = _outline(rng, traits, size_mm, centre, pixel_mm)
    lesion = np.zeros((rows, columns), dtype=bool)
    rr, cc = fill_polygon(outline[:, 1], outline[:, 0], lesion.shape)
    lesion[rr, cc] = True
    inner = ndimage.gaussian_filter(rng.standard_normal((rows, columns)).astype(np.float32),
                                    5 * px)
    inner /= inner.std() + 1e-6
    heterogeneity = 0.05 * np.log1p(np.exp(1.2 * traits["us_heterogeneity"]))
    lesion_echo = np.clip(0.12 + heterogeneity * inner, 0.02, 0.6)
    soft = ndimage.gaussian_filter(lesion.astype(np.float32), 1.2 * px)
    tissue = tissue * (1 - soft) + lesion_echo * soft

    # posterior features: a column band under the lesion, shadow (<1) or enhancement (>1)
    ys, xs = np.nonzero(lesion)
    factor = float(np.clip(np.exp(-0.55 * traits["us_shadowing"]), 0.25, 1.9))
    band = np.zeros(columns, dtype=np.float32)
    band[xs.min() : xs.max() + 1] = 1.0
    band = ndimage.gaussian_filter1d(band, 6 * px) * 0.8
    below = (np.arange(rows)[:, None] > ys.max()).astype(np.float32)
    decay = np.exp(-np.maximum(np.arange(rows) - ys.max(), 0) * pixel_mm / 40.0)[:, None]
    tissue *= 1 + (factor - 1) * below * decay * band[None, :]

    # speckle: Rayleigh amplitude, laterally correlated, then log compression; one draw a frame
    attenuation = np.exp(-depth_mm / 90.0)
    gain = 10 ** (gain_db / 20)
    loop = []
    for _ in range(frames):
        speckle = rng.rayleigh(1.0, (rows, columns)).astype(np.float32)
        speckle = ndimage.gaussian_filter(speckle, (0.7, 1.6)) / 1.25
        echo = np.clip(tissue, 0, None) * speckle * attenuation
        image = np.log1p(30 * gain * echo) / np.log1p(30 * 1.4)
        loop.append(np.clip(image * 255, 0, 255).astype(np.uint8))
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    return UltrasoundFrame(loop[frames // 2], pixel_mm, box, outline,
                           np.stack(loop) if frames > 1 else None)
