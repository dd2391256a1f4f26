import numpy as np
import pytest
from skimage.measure import label

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.nuclei import SegmentedNuclei
from mrrp_pacs.features.region import Block, patch_of, plan_blocks, segment_blocks
from mrrp_pacs.features.topology import node_features, pair_graph

MPP = 0.5
TILE_UM = 56.0  # 112 px tiles
RADIUS_UM = 4.0


class DarkBlobSegmenter:
    """Test segmenter: every dark blob is a nucleus; darker than 75 is type 0, else type 1."""

    name = "dark-blobs"
    version = "test"

    def segment(self, rgb: np.ndarray, mpp: float) -> SegmentedNuclei:
        grey = rgb.mean(axis=-1)
        labels = label(grey < 160).astype(np.int32)
        n = int(labels.max())
        means = np.bincount(labels.ravel(), grey.ravel(), n + 1)[1:] / np.bincount(
            labels.ravel(), minlength=n + 1)[1:]
        return SegmentedNuclei.from_labels(labels, (means >= 75).astype(np.int8))


def _slide(centres_um: np.ndarray, shape_px: tuple[int, int]) -> np.ndarray:
    rows, cols = np.mgrid[: shape_px[0], : shape_px[1]]
    rgb = np.full((*shape_px, 3), 240, np.uint8)
    for i, (x, y) in enumerate(centres_um):
        disc = (cols * MPP + MPP / 2 - x) ** 2 + (rows * MPP + MPP / 2 - y) ** 2 <= RADIUS_UM**2
        rgb[disc] = 40 if i % 2 == 0 else 110
    return rgb


def _reader(rgb: np.ndarray):
    def read(x_um, y_um, width_um, height_um, mpp):
        assert mpp == MPP
        r0, c0 = round(y_um / mpp), round(x_um / mpp)
        out = np.full((round(height_um / mpp), round(width_um / mpp), 3), 240, np.uint8)
        src = rgb[max(r0, 0) : r0 + out.shape[0], max(c0, 0) : c0 + out.shape[1]]
        out[max(-r0, 0) : max(-r0, 0) + src.shape[0], max(-c0, 0) : max(-c0, 0) + src.shape[1]] \
            = src
        return out
    return read


# two blocks of 2 x 2 tiles side by side: cores x in [0, 112) and [112, 224) µm, y in [0, 112)
TILES = np.array([(TILE_UM * (i + 0.5), TILE_UM * (j + 0.5)) for j in range(2) for i in range(4)])
BOUNDARY_UM = 2 * TILE_UM * 1


def _nuclei_grid() -> np.ndarray:
    xs = np.arange(10.0, 224.0, 16.0)
    ys = np.arange(12.0, 112.0, 18.0)
    grid = [(x, y) for y in ys for x in xs if abs(x - BOUNDARY_UM) > 8]
    # one nucleus straddling the block edge, centroid just right of it
    return np.array([*grid, (BOUNDARY_UM + 0.5, 50.0)])


def test_a_nucleus_on_a_block_edge_is_counted_once_and_measured_whole():
    centres = _nuclei_grid()
    rgb = _slide(centres, (240, 480))
    blocks = plan_blocks(TILES, TILE_UM, block_tiles=2, max_region_mm2=1.0)
    assert blocks == [Block(0.0, 0.0, 112.0, 112.0), Block(112.0, 0.0, 224.0, 112.0)]
    found = segment_blocks(blocks, _reader(rgb), DarkBlobSegmenter(), MPP, margin_um=16.0)
    assert len(found.kinds) == len(centres)
    nearest = np.hypot(*(found.xy_um[:, None] - centres[None]).transpose(2, 0, 1)).argmin(1)
    assert sorted(nearest) == list(range(len(centres)))  # each true nucleus exactly once
    edge = np.flatnonzero(nearest == len(centres) - 1)
    assert len(edge) == 1 and found.block[edge[0]] == 1 and found.whole[edge[0]]
    assert np.abs(found.xy_um[edge[0]] - centres[-1]).max() < 0.3
    # without a margin each block sees half of it, and both halves are kept: the old bug
    halves = segment_blocks(blocks, _reader(rgb), DarkBlobSegmenter(), MPP, margin_um=0.0)
    assert len(halves.kinds) == len(centres) + 1


def test_one_graph_spans_the_blocks():
    centres = _nuclei_grid()
    found = segment_blocks(plan_blocks(TILES, TILE_UM, block_tiles=2, max_region_mm2=1.0),
                           _reader(_slide(centres, (240, 480))), DarkBlobSegmenter(), MPP)
    kinds = found.kinds.astype(np.int64)
    nodes, edges, _ = pair_graph(found.xy_um, kinds, 0, 1)
    assert len(nodes) == len(centres)  # every distinct nucleus is one node
    assert (found.block[edges[:, 0]] != found.block[edges[:, 1]]).any()  # edges cross blocks
    features, names = node_features(found.xy_um, kinds)
    size = features[:, names.index("T-I/component_size")]
    assert size.max() == len(centres)  # one component over both blocks


def test_blocks_beyond_the_area_limit_shrink_to_their_tiles():
    # sampled tiles: 3 in block (0, 0), 1 in block (1, 0), 2 in block (0, 1)
    cells = [(0, 0), (1, 0), (0, 1), (2, 0), (0, 2), (1, 3)]
    centres = np.array([(TILE_UM * (c + 0.5), TILE_UM * (r + 0.5)) for c, r in cells])
    block_mm2 = (2 * TILE_UM) ** 2 / 1e6
    blocks = plan_blocks(centres, TILE_UM, block_tiles=2, max_region_mm2=block_mm2 * 1.5)
    assert blocks[0] == Block(0.0, 0.0, 112.0, 112.0)  # the block holding most tiles, whole
    # the second block would pass the limit: its 3 sampled tiles are segmented on their own
    assert len(blocks) == 4
    assert all(b.area_mm2 == pytest.approx(TILE_UM**2 / 1e6) for b in blocks[1:])
    # every sampled tile is inside exactly one core, and the cores do not overlap
    owner = [[b.x0_um <= x < b.x1_um and b.y0_um <= y < b.y1_um for b in blocks]
             for x, y in centres]
    assert all(sum(row) == 1 for row in owner)
    assert np.array_equal(patch_of(centres, centres, TILE_UM), np.arange(len(centres)))
    with pytest.raises(FeatureError, match="max_region_mm2"):
        plan_blocks(centres, TILE_UM, max_region_mm2=0.0)


def test_only_the_wanted_nuclei_are_measured_and_they_measure_the_same():
    centres = _nuclei_grid()
    blocks = plan_blocks(TILES, TILE_UM, block_tiles=2, max_region_mm2=1.0)
    read = _reader(_slide(centres, (240, 480)))
    everything = segment_blocks(blocks, read, DarkBlobSegmenter(), MPP)
    left = segment_blocks(blocks, read, DarkBlobSegmenter(), MPP,
                          measure=lambda xy: xy[:, 0] < 100.0)
    assert np.array_equal(left.xy_um, everything.xy_um)
    wanted = left.xy_um[:, 0] < 100.0
    assert 0 < wanted.sum() < len(wanted)
    assert np.isnan(left.features[~wanted]).all()
    assert np.allclose(left.features[wanted], everything.features[wanted])
