"""Synthetic H&E slides with every nucleus known.

The slide is rendered in optical density (Beer–Lambert): per pixel a hematoxylin and an eosin
concentration, mixed with the stain vectors of the site's stain batch
(:class:`~mrrp_pacs.phantom.sites.StainBatch`) over the optical density of its glass. Tissue is an
irregular section on glass; inside it a tumour region (the annotated polygon) holds nests of
tumour cells; stroma carries spindle (stromal) nuclei along its fibres, a few normal ducts and
lymphocytes.

The section is planned in micrometres on a 0.5 µm grid (:data:`PLAN_MPP`) and drawn at the
scanner's resolution, so the same random stream gives the same tissue and the same nuclei (in
µm) at 0.25 and at 0.5 µm/px: only the pixels differ.

Traits planted (see :mod:`cohort`), with realistic sizes:
- ``nuclear_size``: tumour nuclear diameter, mean 10.5 µm + 1.6 µm per SD;
- ``pleomorphism``: spread of tumour nuclear size, elongation and staining;
- ``tumour_density``: spacing of tumour cells (about 16 µm, closer when dense);
- ``lymphocytes``: count of lymphocytes (6–7.5 µm, dark, round);
- ``lymph_clustering``: share of lymphocytes gathered in aggregates at the tumour edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.draw import polygon as fill_polygon

from mrrp_pacs.phantom.sites import RUIFROK_JOHNSTON, StainBatch

PLAN_MPP = 0.5  # µm per pixel of the grid the section is planned on
MASK_FACTOR = 8  # region masks are held at 1/MASK_FACTOR of the plan grid (4 µm cells)
FIBRE_TILE_PX = 1024  # the stroma fibre texture repeats every 512 µm
NUCLEUS_TYPES = ("tumour", "inflammatory", "stromal", "normal")
TUMOUR, INFLAMMATORY, STROMAL, NORMAL = range(4)


@dataclass
class Nuclei:
    """Every nucleus drawn: centres in level-0 pixels (x = column, y = row), sizes in µm."""

    x_px: np.ndarray
    y_px: np.ndarray
    kind: np.ndarray  # index into NUCLEUS_TYPES
    major_um: np.ndarray
    minor_um: np.ndarray
    angle_rad: np.ndarray
    stain: np.ndarray  # hematoxylin concentration at the nucleus centre

    def __len__(self) -> int:
        return len(self.x_px)


@dataclass
class Slide:
    rgb: np.ndarray  # (rows, cols, 3) uint8
    mpp: float
    tumour_polygon_px: np.ndarray  # (n, 2) closed outline, (x, y) level-0 pixels
    nuclei: Nuclei


def _blob_radius(rng: np.random.Generator, angles: np.ndarray, roughness: float) -> np.ndarray:
    """Relative radius 1 + low-order harmonics: an irregular, star-free outline."""
    radius = np.ones_like(angles)
    for k in range(2, 7):
        radius += roughness / k * rng.normal() * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    return np.clip(radius, 0.6, 1.4)


def _resample_index(size_px: int, mpp: float, cell_um: float, cells: int) -> np.ndarray:
    """For each of ``size_px`` pixels at ``mpp``: the index of its ``cell_um`` cell."""
    return np.minimum((np.arange(size_px) * (mpp / cell_um)).astype(np.int64), cells - 1)


def _upsample(low: np.ndarray, mpp: float, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a mask-grid field (4 µm cells) to pixels at ``mpp``."""
    cell_um = MASK_FACTOR * PLAN_MPP
    rows = _resample_index(shape[0], mpp, cell_um, low.shape[0])
    cols = _resample_index(shape[1], mpp, cell_um, low.shape[1])
    return low[rows[:, None], cols[None, :]]


def _jittered_grid(rng: np.random.Generator, size_px: int, spacing_px: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    steps = np.arange(spacing_px / 2, size_px, spacing_px)
    gx, gy = np.meshgrid(steps, steps)
    jitter = rng.uniform(-0.35, 0.35, (2, *gx.shape)) * spacing_px
    return (gx + jitter[0]).ravel(), (gy + jitter[1]).ravel()


def _inside(mask: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Look up level-0 pixel positions in a region mask held at 1/MASK_FACTOR resolution."""
    rows = np.clip((y // MASK_FACTOR).astype(int), 0, mask.shape[0] - 1)
    cols = np.clip((x // MASK_FACTOR).astype(int), 0, mask.shape[1] - 1)
    return mask[rows, cols]


def _outline(rng: np.random.Generator, angles: np.ndarray, cx: float, cy: float, radius: float,
             roughness: float) -> np.ndarray:
    """Closed irregular outline, (n, 2) as (x, y) pixels."""
    r = radius * _blob_radius(rng, angles, roughness)
    return np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)


def _fill(outline: np.ndarray, size: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    rr, cc = fill_polygon(outline[:, 1], outline[:, 0], mask.shape)
    mask[rr, cc] = True
    return mask


def _softplus(x: float) -> float:
    return float(np.log1p(np.exp(x)))


def render_slide(rng: np.random.Generator, traits: dict[str, float], size_px: int = 4096,
                 mpp: float = PLAN_MPP, stain: StainBatch = RUIFROK_JOHNSTON) -> Slide:
    """Render one square H&E slide of ``size_px`` pixels at ``mpp`` µm/px.

    The section covers ``size_px * mpp`` µm, which must be a whole number of plan pixels
    (0.5 µm). The random stream is consumed identically whatever ``mpp`` and ``stain``: the
    same ``rng`` state gives the same section and nuclei (in µm) at every resolution.
    """
    plan_px = size_px * mpp / PLAN_MPP
    if mpp <= 0 or plan_px != int(plan_px) or plan_px < 2 * MASK_FACTOR:
        raise ValueError(f"a slide of {size_px} px at {mpp} µm/px is not a whole number of "
                         f"{PLAN_MPP} µm plan pixels (at least {2 * MASK_FACTOR})")
    scale = PLAN_MPP / mpp  # slide pixels per plan pixel
    shape = (size_px, size_px)

    # the plan: outlines, regions and nuclei on the 0.5 µm grid (and its 4 µm mask grid)
    size_plan = int(plan_px)
    um = 1.0 / PLAN_MPP  # plan pixels per µm
    centre = size_plan / 2
    low = size_plan // MASK_FACTOR
    angles = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    tissue_outline = _outline(rng, angles, centre, centre, 0.46 * size_plan, 0.25)
    offset = rng.uniform(-0.06, 0.06, 2) * size_plan
    outline = _outline(rng, angles, centre + offset[0], centre + offset[1], 0.27 * size_plan,
                       0.45)
    tissue = _fill(tissue_outline / MASK_FACTOR, low)
    tumour = _fill(outline / MASK_FACTOR, low) & tissue
    nest_noise = ndimage.gaussian_filter(rng.standard_normal((low, low)).astype(np.float32), 2.0)
    nests = nest_noise > -0.55 * nest_noise.std()  # ~70 % of the tumour is cellular
    cellular = tumour & nests
    stroma = tissue & ~cellular

    # stain concentrations, drawn at the scanner's pixels: eosin everywhere in tissue (denser,
    # fibrous, in stroma)
    eosin_low = np.where(stroma, 0.42, np.where(cellular, 0.30, 0.0)).astype(np.float32)
    eosin = _upsample(eosin_low, mpp, shape)
    fibre_block = ndimage.gaussian_filter(
        rng.standard_normal((FIBRE_TILE_PX, FIBRE_TILE_PX)).astype(np.float32), (0.6, 5.0))
    fibre_block *= 0.10 / (fibre_block.std() + 1e-6)
    fibre_index = (np.arange(size_px) * (mpp / PLAN_MPP)).astype(np.int64) % FIBRE_TILE_PX
    eosin += fibre_block[fibre_index[:, None], fibre_index[None, :]] * _upsample(stroma, mpp,
                                                                                  shape)
    hema = _upsample(np.where(tissue, 0.06, 0.0).astype(np.float32), mpp, shape)

    ducts = _ducts(rng, stroma, size_plan, um)
    planned = _place_nuclei(rng, traits, cellular, stroma, tissue, outline, ducts, size_plan, um)
    nuclei = Nuclei(planned.x_px * np.float32(scale), planned.y_px * np.float32(scale),
                    planned.kind, planned.major_um, planned.minor_um, planned.angle_rad,
                    planned.stain)
    px_per_um = 1.0 / mpp
    for i in range(len(nuclei)):
        _stamp(hema, eosin, nuclei.x_px[i], nuclei.y_px[i], nuclei.major_um[i] * px_per_um / 2,
               nuclei.minor_um[i] * px_per_um / 2, nuclei.angle_rad[i], nuclei.stain[i])
    for duct_x, duct_y, plan_radius in ducts:
        radius = round(plan_radius * scale)
        yy0, xx0 = np.ogrid[-radius:radius + 1, -radius:radius + 1]
        lumen = (xx0**2 + yy0**2) < (0.55 * radius) ** 2
        rows = slice(int(duct_y * scale) - radius, int(duct_y * scale) + radius + 1)
        cols = slice(int(duct_x * scale) - radius, int(duct_x * scale) + radius + 1)
        eosin[rows, cols][lumen] = 0.05
    return Slide(_to_rgb(hema, eosin, rng, stain), mpp, outline * scale, nuclei)


def _place_nuclei(rng: np.random.Generator, traits: dict[str, float], cellular: np.ndarray,
                  stroma: np.ndarray, tissue: np.ndarray, outline: np.ndarray,
                  ducts: list[tuple[float, float, int]], size_px: int, um: float) -> Nuclei:
    parts: list[tuple[np.ndarray, ...]] = []
    pleo = _softplus(traits["pleomorphism"])

    # tumour cells on a jittered grid over the cellular nests
    spacing = 16.0 * np.exp(-0.12 * traits["tumour_density"]) * um
    x, y = _jittered_grid(rng, size_px, spacing)
    keep = _inside(cellular, x, y)
    x, y = x[keep], y[keep]
    n = len(x)
    diameter = np.clip(rng.normal(10.5 + 1.6 * traits["nuclear_size"], 0.6 + 0.9 * pleo, n),
                       5.5, 24.0)
    aspect = 1.0 + np.abs(rng.normal(0, 0.12 + 0.12 * pleo, n))
    stain = np.clip(rng.normal(0.85, 0.08 + 0.10 * pleo, n), 0.45, 1.6)
    parts.append((x, y, np.full(n, TUMOUR), diameter * np.sqrt(aspect), diameter /
                  np.sqrt(aspect), rng.uniform(0, np.pi, n), stain))

    # lymphocytes: aggregates at the tumour edge, the rest scattered through tissue
    count = round(700 * np.exp(0.7 * traits["lymphocytes"]) * (size_px / 4096) ** 2)
    clustered = round(count / (1 + np.exp(-1.5 * traits["lymph_clustering"])))
    n_aggregates = max(1, clustered // 60)
    edge = outline[rng.integers(0, len(outline), n_aggregates)]
    direction = edge - size_px / 2
    edge = edge + direction / (np.linalg.norm(direction, axis=1, keepdims=True) + 1e-9) * \
        rng.uniform(-40, 120, (n_aggregates, 1)) * um
    member = rng.integers(0, n_aggregates, clustered)
    lx = np.concatenate([edge[member, 0] + rng.normal(0, 22 * um, clustered),
                         rng.uniform(0, size_px, 4 * (count - clustered))])
    ly = np.concatenate([edge[member, 1] + rng.normal(0, 22 * um, clustered),
                         rng.uniform(0, size_px, 4 * (count - clustered))])
    keep = _inside(tissue, lx, ly)
    lx, ly = lx[keep][: count], ly[keep][: count]
    n = len(lx)
    d = rng.uniform(6.0, 7.5, n)
    parts.append((lx, ly, np.full(n, INFLAMMATORY), d, d * rng.uniform(0.9, 1.0, n),
                  rng.uniform(0, np.pi, n), rng.uniform(1.25, 1.45, n)))

    # stromal spindle cells along the fibres (the fibre texture runs along x)
    sx, sy = rng.uniform(0, size_px, (2, int(900 * (size_px / 4096) ** 2)))
    keep = _inside(stroma, sx, sy)
    sx, sy = sx[keep], sy[keep]
    n = len(sx)
    parts.append((sx, sy, np.full(n, STROMAL), rng.uniform(12, 16, n), rng.uniform(3.0, 4.5, n),
                  rng.normal(0, 0.2, n), rng.uniform(0.7, 0.9, n)))

    # normal ducts: rings of small uniform epithelial nuclei
    for duct_x, duct_y, radius in ducts:
        k = max(8, int(2 * np.pi * radius * 0.8 / (8 * um)))
        phi = np.linspace(0, 2 * np.pi, k, endpoint=False)
        ring = 0.78 * radius
        parts.append((duct_x + ring * np.cos(phi), duct_y + ring * np.sin(phi),
                      np.full(k, NORMAL), rng.uniform(7.5, 8.5, k), rng.uniform(6.0, 7.0, k),
                      phi + np.pi / 2, rng.uniform(0.65, 0.75, k)))

    columns = [np.concatenate(c) for c in zip(*parts, strict=True)]
    margin = 12 * um  # keep whole nuclei on the slide
    keep = ((columns[0] > margin) & (columns[0] < size_px - margin) & (columns[1] > margin)
            & (columns[1] < size_px - margin))
    x, y, kind, major, minor, angle, stain = (c[keep] for c in columns)
    return Nuclei(x.astype(np.float32), y.astype(np.float32), kind.astype(np.int8),
                  major.astype(np.float32), minor.astype(np.float32), angle.astype(np.float32),
                  stain.astype(np.float32))


def _ducts(rng: np.random.Generator, stroma: np.ndarray, size_px: int, um: float
           ) -> list[tuple[float, float, int]]:
    """Up to five normal ducts in stroma, apart from each other: (x, y, radius) in pixels."""
    found: list[tuple[float, float, int]] = []
    for _ in range(40):
        x, y = rng.uniform(0.1, 0.9, 2) * size_px
        radius = int(rng.uniform(28, 45) * um)
        fits = min(x, y) > radius + 1 and max(x, y) < size_px - radius - 2
        if fits and _inside(stroma, np.array([x]), np.array([y]))[0] and all(
                np.hypot(x - fx, y - fy) > 3 * radius for fx, fy, _ in found):
            found.append((float(x), float(y), radius))
        if len(found) == 5:
            break
    return found


def _stamp(hema: np.ndarray, eosin: np.ndarray, x: float, y: float, a_px: float, b_px: float,
           angle: float, stain: float) -> None:
    """Add one anti-aliased elliptical nucleus with coarse chromatin to the stain maps."""
    reach = int(np.ceil(a_px)) + 2
    row0, col0 = int(y) - reach, int(x) - reach
    if row0 < 0 or col0 < 0 or row0 + 2 * reach + 1 > hema.shape[0] or \
            col0 + 2 * reach + 1 > hema.shape[1]:
        return
    yy, xx = np.ogrid[row0 : row0 + 2 * reach + 1, col0 : col0 + 2 * reach + 1]
    dx, dy = xx - x, yy - y
    cos, sin = np.cos(angle), np.sin(angle)
    u = (dx * cos + dy * sin) / a_px
    v = (-dx * sin + dy * cos) / b_px
    q = np.sqrt(u * u + v * v)
    alpha = np.clip((1.0 - q) * b_px + 0.5, 0.0, 1.0).astype(np.float32)
    chromatin = 1.0 + 0.18 * np.cos(3.1 * u * a_px / 2.2 + x) * np.cos(2.7 * v * b_px / 2.2 + y)
    window_h = hema[row0 : row0 + 2 * reach + 1, col0 : col0 + 2 * reach + 1]
    window_e = eosin[row0 : row0 + 2 * reach + 1, col0 : col0 + 2 * reach + 1]
    window_h += alpha * (stain * chromatin - window_h) * 0.95
    window_e *= 1.0 - 0.6 * alpha


def _to_rgb(hema: np.ndarray, eosin: np.ndarray, rng: np.random.Generator, stain: StainBatch
            ) -> np.ndarray:
    """Beer–Lambert mix over the glass through a 256×256 lookup table (fast on 16 M pixels)."""
    hematoxylin, eosin_od = stain.vectors()
    h_levels = np.linspace(0, 2.0, 256, dtype=np.float32)
    e_levels = np.linspace(0, 1.0, 256, dtype=np.float32)
    od = (h_levels[:, None, None] * hematoxylin + e_levels[None, :, None] * eosin_od
          + stain.glass_od())
    table = np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8).reshape(-1, 3)
    grain = rng.normal(0, 0.02, (256, 256)).astype(np.float32)  # tiled stain grain
    reps = (hema.shape[0] // 256 + 1, hema.shape[1] // 256 + 1)
    grain_full = np.tile(grain, reps)[: hema.shape[0], : hema.shape[1]]
    h_index = np.clip((hema + grain_full) * (255 / 2.0), 0, 255).astype(np.uint16)
    e_index = np.clip((eosin + grain_full * 0.5) * 255, 0, 255).astype(np.uint16)
    return table[h_index * 256 + e_index]
