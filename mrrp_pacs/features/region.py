"""Nuclei of a tumour region, segmented in overlapping blocks, each nucleus once.

sc-MTOP builds its nucleus graph over the whole region, not per tile. Here the region is
segmented in square blocks laid on the tile grid (:func:`plan_blocks`): each block's *core* is
read with a context margin on every side (:func:`segment_blocks`), segmented whole, and only
the nuclei whose centroid lies in the core are kept. Cores do not overlap, so a nucleus on a
block edge is counted once (by the block that holds its centroid) and measured whole (the
margin holds the rest of it). All nuclei of all blocks then form one k-NN graph
(:func:`mrrp_pacs.features.topology.node_features`); patch tokens are statistics over the
nuclei inside each sampled tile.

The block reader takes the resolution and margin of the segmenter (a model that works at
0.25 µm/px reads its blocks at 0.25 µm/px); positions are in µm from the slide origin, so
nuclei found at any resolution share one coordinate frame.

Work is bounded by ``max_region_mm2``: blocks that hold sampled tiles are segmented whole,
most-sampled first, while their summed core area stays within the limit; a sampled tile in a
block beyond the limit is segmented on its own (its core is the tile), so every tile gets
its nuclei while the area segmented stays at most the limit or the tiles' own area.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.nuclei import NucleusSegmenter

REGION_VERSION = "1"

# Defaults (FeaturesConfig overrides them): a block of 4 x 4 tiles (448 µm at 224 px and
# 0.5 µm/px), 16 µm of context (more than the largest nuclear radius), and at most 1 mm² of
# blocks per patient (~4 Mpx at 0.5 µm/px: ~5 s of the classical segmenter on one core).
BLOCK_TILES = 4
MARGIN_UM = 16.0
MAX_REGION_MM2 = 1.0


@dataclass(frozen=True)
class Block:
    """A block's core: [x0, x1) x [y0, y1) in µm from the slide origin."""

    x0_um: float
    y0_um: float
    x1_um: float
    y1_um: float

    @property
    def area_mm2(self) -> float:
        return (self.x1_um - self.x0_um) * (self.y1_um - self.y0_um) / 1e6


@dataclass
class RegionNuclei:
    """Every nucleus of the segmented blocks, once.

    Attributes
    ----------
    xy_um
        (n, 2) float64 centroids (x, y) in µm from the slide origin.
    kinds
        (n,) int8 nucleus types (:data:`mrrp_pacs.features.nuclei.NUCLEUS_TYPES`).
    features
        (n, F) float32 morphology (:func:`mrrp_pacs.features.morphology.nucleus_features`),
        measured in the block it was segmented in; NaN rows for nuclei left unmeasured (outside
        ``measure`` of :func:`segment_blocks`).
    whole
        (n,) bool, False where the outline reaches the edge of the block read (margin included).
    block
        (n,) int64 index of the block that owns the nucleus.
    n_blocks
        Blocks segmented (some may hold no nucleus).
    """

    xy_um: np.ndarray
    kinds: np.ndarray
    features: np.ndarray
    whole: np.ndarray
    block: np.ndarray
    n_blocks: int


# (x_um, y_um, width_um, height_um, mpp) -> (rows, cols, 3) uint8 read at mpp from the slide
Reader = Callable[[float, float, float, float, float], np.ndarray]


def plan_blocks(tile_centres_um: np.ndarray, tile_um: float, *, block_tiles: int = BLOCK_TILES,
                max_region_mm2: float = MAX_REGION_MM2) -> list[Block]:
    """Blocks that cover every sampled tile, within the area limit (module docstring).

    Parameters
    ----------
    tile_centres_um
        (n, 2) centres of the sampled tiles (one grid of pitch ``tile_um``), µm.
    tile_um
        Tile side, µm.
    block_tiles
        Block side in tiles, >= 1.
    max_region_mm2
        Summed core area of the whole blocks, mm²; > 0.

    Returns
    -------
    list of Block
        Non-overlapping cores, in a deterministic order (whole blocks first).
    """
    if block_tiles < 1 or not max_region_mm2 > 0:
        raise FeatureError(f"region blocks need block_tiles >= 1 and max_region_mm2 > 0, got "
                           f"{block_tiles} and {max_region_mm2}")
    centres = np.asarray(tile_centres_um, np.float64).reshape(-1, 2)
    if not len(centres):
        return []
    corners = centres - tile_um / 2
    origin = corners.min(axis=0)
    cells = np.round((corners - origin) / tile_um).astype(np.int64)
    blocks_of = cells // block_tiles
    keys, counts = np.unique(blocks_of, axis=0, return_counts=True)
    order = np.lexsort((keys[:, 0], keys[:, 1], -counts))  # most tiles first, then grid order
    side_um = block_tiles * tile_um
    whole: list[Block] = []
    single: list[Block] = []
    used_mm2 = 0.0
    for key in keys[order]:
        x0, y0 = origin + key * side_um
        block = Block(float(x0), float(y0), float(x0 + side_um), float(y0 + side_um))
        if used_mm2 + block.area_mm2 <= max_region_mm2 + 1e-12:
            whole.append(block)
            used_mm2 += block.area_mm2
            continue
        inside = np.flatnonzero((blocks_of == key).all(axis=1))
        for cell in cells[inside]:
            cx, cy = origin + cell * tile_um
            single.append(Block(float(cx), float(cy), float(cx + tile_um), float(cy + tile_um)))
    return whole + single


def segment_blocks(blocks: list[Block], read: Reader, segmenter: NucleusSegmenter, mpp: float,
                   margin_um: float = MARGIN_UM,
                   measure: Callable[[np.ndarray], np.ndarray] | None = None) -> RegionNuclei:
    """Segment every block with its margin and keep the nuclei centred in its core.

    Parameters
    ----------
    blocks
        From :func:`plan_blocks` (cores must not overlap).
    read
        Reads (x_um, y_um, width_um, height_um) at ``mpp`` µm/px from the slide.
    segmenter
        Any :class:`~mrrp_pacs.features.nuclei.NucleusSegmenter`.
    mpp
        µm/px the segmenter works at (its own, e.g. a model's ``model_mpp``).
    margin_um
        Context read around each core, µm; at least the largest nuclear radius.
    measure
        (n, 2) centroids in µm -> (n,) bool: the nuclei whose morphology is wanted (those in
        a patch token); None measures all. Morphology is most of the cost, and the graph needs
        only positions and types.
    """
    from mrrp_pacs.features.morphology import FEATURE_NAMES, nucleus_features

    xy: list[np.ndarray] = []
    kinds: list[np.ndarray] = []
    features: list[np.ndarray] = []
    whole: list[np.ndarray] = []
    owner: list[np.ndarray] = []
    for index, block in enumerate(blocks):
        x0, y0 = block.x0_um - margin_um, block.y0_um - margin_um
        rgb = read(x0, y0, block.x1_um - block.x0_um + 2 * margin_um,
                   block.y1_um - block.y0_um + 2 * margin_um, mpp)
        found = segmenter.segment(rgb, mpp)
        centre_um = np.asarray(found.centroids_px, np.float64).reshape(-1, 2) * mpp + (x0, y0)
        keep = ((centre_um[:, 0] >= block.x0_um) & (centre_um[:, 0] < block.x1_um)
                & (centre_um[:, 1] >= block.y0_um) & (centre_um[:, 1] < block.y1_um))
        wanted = keep if measure is None else keep & np.asarray(measure(centre_um), bool)
        measured, _ = nucleus_features(rgb, found.select(wanted), mpp)
        rows = np.full((int(keep.sum()), len(FEATURE_NAMES)), np.nan, np.float32)
        rows[wanted[keep]] = measured
        xy.append(centre_um[keep])
        kinds.append(np.asarray(found.kinds, np.int8)[keep])
        features.append(rows)
        whole.append(~np.asarray(found.touches_border, bool)[keep])
        owner.append(np.full(int(keep.sum()), index, np.int64))
    if not blocks:
        return RegionNuclei(np.zeros((0, 2)), np.zeros(0, np.int8),
                            np.zeros((0, len(FEATURE_NAMES)), np.float32), np.zeros(0, bool),
                            np.zeros(0, np.int64), 0)
    return RegionNuclei(np.concatenate(xy), np.concatenate(kinds), np.concatenate(features),
                        np.concatenate(whole), np.concatenate(owner), len(blocks))


def patch_of(xy_um: np.ndarray, tile_centres_um: np.ndarray, tile_um: float) -> np.ndarray:
    """(n,) index of the sampled tile whose square [centre ± tile_um / 2) holds each nucleus;
    -1 for a nucleus in no sampled tile (it is in the graph, in no patch token)."""
    xy = np.asarray(xy_um, np.float64).reshape(-1, 2)
    patch = np.full(len(xy), -1, np.int64)
    for index, (cx, cy) in enumerate(np.asarray(tile_centres_um, np.float64).reshape(-1, 2)):
        inside = ((xy[:, 0] >= cx - tile_um / 2) & (xy[:, 0] < cx + tile_um / 2)
                  & (xy[:, 1] >= cy - tile_um / 2) & (xy[:, 1] < cy + tile_um / 2))
        patch[inside & (patch < 0)] = index
    return patch
