"""HoVer-Net (tiatoolbox's definition) with random weights: checkpoint loading, shapes, decoding
of NP/HV/TP maps whose answer is known, tiling with valid padding, and a run through `extract`.

The expected key names and shapes below are read off tiatoolbox's
``tiatoolbox/models/architecture/hovernet.py`` (module names) and its pretrained-model config
(``hovernet_fast-pannuke``: 6 types, fast, 256 → 164 px; ``hovernet_original-kumar``: no types,
original, 270 → 80 px), not off the module under test.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from listeners.file_drop import ingest_paths
from mrrp_pacs.cli import main
from mrrp_pacs.config import load_config
from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.cache import FeatureCache
from mrrp_pacs.features.hovernet import (
    LAYOUTS,
    HoVerNet,
    HoverNetSegmenter,
    instance_types,
    instances_from_np_hv,
    load_hovernet,
    pannuke_to_nuclei,
    sobel_kernels,
)
from mrrp_pacs.features.nuclei import INFLAMMATORY, NORMAL, STROMAL, TUMOUR
from mrrp_pacs.intake import Intake
from mrrp_pacs.phantom.generator import PhantomSpec, generate
from mrrp_pacs.store import Store

# (key, shape) pairs of tiatoolbox's HoVer-Net, fast mode with 6 types (PanNuke)
TIATOOLBOX_FAST_KEYS = {
    "conv0./.weight": (64, 3, 7, 7),
    "conv0.bn.running_var": (64,),
    "d0.units.0.conv1.weight": (64, 64, 1, 1),
    "d0.units.1.preact/bn.weight": (256,),
    "d0.shortcut.weight": (256, 64, 1, 1),
    "d1.units.0.conv2.weight": (128, 128, 3, 3),
    "d3.units.2.conv3.weight": (2048, 512, 1, 1),
    "d3.blk_bna.bn.bias": (2048,),
    "conv_bot.weight": (1024, 2048, 1, 1),
    "decoder.np.u3.conva.weight": (256, 1024, 3, 3),
    "decoder.np.u3.dense.units.0.preact_bna/bn.weight": (256,),
    "decoder.np.u3.dense.units.7.conv2.weight": (32, 32, 3, 3),  # 128 → 32, groups=4
    "decoder.hv.u3.dense.blk_bna.bn.weight": (512,),
    "decoder.hv.u3.convf.weight": (512, 512, 1, 1),
    "decoder.tp.u2.dense.units.3.conv1/bn.running_mean": (128,),
    "decoder.tp.u1.conva.weight": (64, 256, 3, 3),
    "decoder.tp.u0.conv.weight": (6, 64, 1, 1),
    "decoder.tp.u0.conv.bias": (6,),
    "decoder.hv.u0.conv.bias": (2,),
    "upsample2x.unpool_mat": (2, 2),
}


def _save(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def fast_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return _save(HoVerNet(6, "fast"), tmp_path_factory.mktemp("hovernet") / "fast-pannuke.pth")


def test_the_architecture_has_tiatoolbox_keys_and_a_random_checkpoint_loads_strictly(
        fast_checkpoint):
    saved = torch.load(fast_checkpoint, weights_only=True)
    for key, shape in TIATOOLBOX_FAST_KEYS.items():
        assert tuple(saved[key].shape) == shape, key
    # bottleneck units: 3, 4, 6, 3; dense units: 8 (u3) and 4 (u2) per branch
    units = {k.split(".")[0]: int(k.split(".")[2]) for k in saved if k.startswith("d")
             and ".units." in k and not k.startswith("decoder")}
    assert units == {"d0": 2, "d1": 3, "d2": 5, "d3": 2}
    model = load_hovernet(fast_checkpoint)
    assert (model.mode, model.num_types) == ("fast", 6)
    loaded = model.state_dict()
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_an_original_checkpoint_without_types_and_the_authors_wrapping_load(tmp_path):
    original = HoVerNet(None, "original")
    # the authors' layout: {"desc": ...}, DataParallel's prefix, no BatchNorm counters (their
    # weights were converted from TensorFlow)
    state = {f"module.{k}": v for k, v in original.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    path = tmp_path / "kumar.tar"
    torch.save({"desc": state}, path)  # the HoVer-Net authors' checkpoint layout
    model = load_hovernet(path)
    assert (model.mode, model.num_types) == ("original", None)
    assert "tp" not in model.decoder


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "num_types", "size_in", "size_out"),
                         [("fast", 6, 256, 164), ("original", None, 270, 80)])
def test_valid_padding_output_shapes(mode, num_types, size_in, size_out):
    assert (LAYOUTS[mode].input_px, LAYOUTS[mode].output_px) == (size_in, size_out)
    model = HoVerNet(num_types, mode).eval()
    with torch.inference_mode():
        out = model(torch.rand(1, 3, size_in, size_in) * 255)
    expected = {"np": 2, "hv": 2} | ({"tp": num_types} if num_types else {})
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        k: (1, c, size_out, size_out) for k, c in expected.items()}


def test_wrong_checkpoints_are_refused_naming_the_file(tmp_path, fast_checkpoint):
    missing = tmp_path / "absent.pth"
    with pytest.raises(FeatureError, match=re.escape(str(missing))):
        load_hovernet(missing)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(FeatureError, match=re.escape(str(junk)) + ".*not a torch checkpoint"):
        load_hovernet(junk)
    other = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(FeatureError, match="not a HoVer-Net checkpoint"):
        load_hovernet(other)

    state = torch.load(fast_checkpoint, weights_only=True)
    del state["d2.units.4.conv2.weight"]
    state["decoder.np.extra.weight"] = torch.zeros(1)
    state["conv_bot.weight"] = torch.zeros(1024, 2048, 3, 3)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(FeatureError) as caught:
        load_hovernet(broken)
    message = str(caught.value)
    assert str(broken) in message
    assert "1 missing (d2.units.4.conv2.weight)" in message
    assert "1 unexpected (decoder.np.extra.weight)" in message
    assert "conv_bot.weight (1024, 2048, 3, 3) ≠ (1024, 2048, 1, 1)" in message


def test_a_device_that_is_not_there_is_refused(fast_checkpoint):
    with pytest.raises(FeatureError, match="'gpu0' is not a torch device"):
        HoverNetSegmenter(fast_checkpoint, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(FeatureError, match="no CUDA device here"):
            HoverNetSegmenter(fast_checkpoint, device="cuda")


def test_a_typing_head_other_than_pannuke_is_refused(tmp_path):
    path = _save(HoVerNet(5, "fast"), tmp_path / "monusac.pth")  # 5 types: MoNuSAC, CoNSeP
    with pytest.raises(FeatureError, match=r"5 classes; only PanNuke's 6"):
        HoverNetSegmenter(path)


# -- decoding ---------------------------------------------------------------------------------

def _disc_maps(shape, discs):
    """NP and HV maps of ideal nuclei: each pixel belongs to its nearest centre within its
    radius; HV is the offset from that centre over the radius (HoVer-Net's training target)."""
    rows, cols = np.indices(shape, dtype=float)
    owner = np.full(shape, -1)
    best = np.full(shape, np.inf)
    for k, (cy, cx, r) in enumerate(discs):
        d = np.hypot(rows - cy, cols - cx)
        inside = (d <= r) & (d < best)
        owner[inside], best[inside] = k, d[inside]
    nucleus = (owner >= 0).astype(float)
    hv = np.zeros((*shape, 2))
    for k, (cy, cx, r) in enumerate(discs):
        mask = owner == k
        hv[mask, 0] = (cols[mask] - cx) / r
        hv[mask, 1] = (rows[mask] - cy) / r
    return nucleus, hv, owner


def testsobel_kernels_are_opencvs():
    # cv2.getDerivKernels(1, 0, k): the values OpenCV documents for k = 3 and 5
    assert [list(v) for v in sobel_kernels(3)] == [[-1, 0, 1], [1, 2, 1]]
    assert [list(v) for v in sobel_kernels(5)] == [[-1, -2, 0, 2, 1], [1, 4, 6, 4, 1]]
    deriv, smooth = sobel_kernels(21)
    assert deriv.sum() == 0 and smooth.sum() == 2**20 and np.array_equal(deriv, -deriv[::-1])


def test_np_hv_decoding_separates_touching_nuclei():
    discs = [(40, 40, 12), (40, 61, 12), (95, 90, 10), (100, 40, 9)]  # the first two touch
    nucleus, hv, owner = _disc_maps((130, 130), discs)
    assert ((owner == 0) & np.roll(owner == 1, -1, axis=1)).any()  # one blob, two nuclei
    labels = instances_from_np_hv(nucleus, hv)
    assert labels.dtype == np.int32 and labels.max() == len(discs)
    for k in range(len(discs)):
        truth = owner == k
        found = np.bincount(labels[truth], minlength=len(discs) + 1)[1:].argmax() + 1
        region = labels == found
        iou = (region & truth).sum() / (region | truth).sum()
        assert iou > 0.85, (k, iou)
    assert not (labels[owner < 0]).any()


def test_instance_types_take_the_majority_and_skip_background():
    labels = np.zeros((4, 10), np.int32)
    labels[:, 0:3], labels[:, 3:6], labels[:, 6:10] = 1, 2, 3
    types = np.zeros((4, 10), np.int64)
    types[:, 0:3] = 1                      # all neoplastic
    types[:3, 3:6], types[3, 3:6] = 2, 1   # inflammatory 9, neoplastic 3
    types[:3, 6:10], types[3, 6:10] = 0, 3  # background 11, connective 4, non-neoplastic 1:
    types[0, 6] = 5                        # background wins, so the runner-up is taken
    assert list(instance_types(labels, types, 6)) == [1, 2, 3]


def test_pannuke_types_map_to_sc_mtop_and_dead_nuclei_are_dropped():
    labels = np.zeros((6, 12), np.int32)
    for k in range(6):
        labels[:, 2 * k : 2 * k + 2] = k + 1
    found = pannuke_to_nuclei(labels, np.array([1, 2, 3, 4, 5, 0]))
    assert list(found.kinds) == [TUMOUR, INFLAMMATORY, STROMAL, NORMAL]
    assert found.labels.max() == 4
    assert not found.labels[:, 6:8].any() and not found.labels[:, 10:].any()


class _CropEcho(torch.nn.Module):
    """Stands in for HoVer-Net's valid padding: each output is the centre crop of an input
    channel (NP logits from red, HV from green and blue, TP from red ≥ 128), so a correct tiling
    returns the input image itself."""

    def __init__(self, margin: int) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.margin
        crop = x[:, :, m:-m, m:-m]
        red = crop[:, :1]
        return {"np": torch.cat([torch.zeros_like(red), red / 10.0 - 12.8], dim=1),
                "hv": crop[:, 1:],
                "tp": torch.cat([(red < 128).float(), (red >= 128).float()] + [red * 0] * 4,
                                dim=1)}


def test_patches_with_valid_padding_cover_the_whole_tile(fast_checkpoint):
    segmenter = HoverNetSegmenter(fast_checkpoint)
    layout = segmenter.layout
    segmenter._model = _CropEcho(layout.margin_px)
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (3 * layout.output_px + 17, layout.output_px - 5, 3), np.uint8)
    nucleus, hv, types = segmenter.maps(rgb)
    red = rgb[..., 0].astype(np.float32)
    assert np.allclose(nucleus, 1 / (1 + np.exp(-(red / 10 - 12.8))), atol=1e-5)
    assert np.array_equal(hv, rgb[..., 1:].astype(np.float32))
    assert types is not None and np.array_equal(types, (red >= 128).astype(int))
    # the model's resolution and context come with it; tiles at another resolution are refused
    assert segmenter.mpp == 0.25
    assert segmenter.context_um == pytest.approx(46 * 0.25 + 10.0)
    with pytest.raises(FeatureError, match=r"0\.25 µm/px"):
        segmenter.segment(rgb, 0.5)


def test_a_tile_is_segmented_and_typed_through_the_decoder(fast_checkpoint):
    discs = [(40, 40, 12), (40, 61, 12), (95, 90, 10)]
    nucleus, hv, owner = _disc_maps((130, 140), discs)
    kinds = np.array([1, 2, 4])  # neoplastic, inflammatory, dead
    segmenter = HoverNetSegmenter(fast_checkpoint)

    def maps(rgb):
        return nucleus, hv, np.where(owner >= 0, kinds[owner], 0)

    segmenter.maps = maps
    found = segmenter.segment(np.zeros((130, 140, 3), np.uint8), 0.25)
    assert len(found) == 2  # the dead one is dropped
    order = np.argsort(found.centroids_px[:, 0])
    assert list(found.kinds[order]) == [TUMOUR, INFLAMMATORY]
    assert np.allclose(found.centroids_px[order], [[40, 40], [61, 40]], atol=1.5)


# -- end to end ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_end_to_end_extract_with_a_random_weight_hovernet(tmp_path, fast_checkpoint):
    """`extract` with a HoVer-Net checkpoint (random weights): the nuclei family reads its blocks
    at the model's µm/px (0.5 here, the wsi tiles at 1.0) with the model's context, and stores
    what the family promises. Tiny: one patient, one 16 µm tile, one 256-px patch."""
    generate(PhantomSpec(patients=1, seed=5, slide_px=512, missing_wsi=0.0, missing_us=1.0,
                         missing_report=1.0), tmp_path / "phantom", workers=1)
    config = load_config(None, environ={}).with_db(tmp_path / "state" / "mrrp.sqlite3")
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        ingest_paths(Intake(store, config), [tmp_path / "phantom" / "dicom"])
    environ = {"MRRP__FEATURES__NUCLEI_MODEL": str(fast_checkpoint),
               "MRRP__FEATURES__NUCLEI_MODEL_MPP": "0.5",
               "MRRP__FEATURES__TARGET_MPP": "1.0", "MRRP__FEATURES__TILE_PX": "16",
               "MRRP__FEATURES__MAX_TILES": "1", "MRRP__FEATURES__NUCLEI_BLOCK_TILES": "1"}
    result = CliRunner().invoke(main, ["extract", "--families", "nuclei", "--json",
                                       "--db", str(config.paths.db_file)], env=environ)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["failed"] == [] and summary["computed"] == 1
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        key = store.conn.execute("SELECT patient_key FROM features").fetchone()[0]
        nuclei = FeatureCache(store).current(key, "nuclei")
    assert nuclei is not None
    assert nuclei.extractor == "hovernet-fast"
    assert "mpp0.5-sha256-" in nuclei.version
    # a block of one 16 µm tile at 0.5 µm/px = 32 px, plus the model's context (46 px + 10 µm
    # = 33 µm, more than the configured 16 µm) each side = 164 px: one patch
    assert nuclei.meta["mpp"] == 0.5 and nuclei.meta["context_um"] == 33.0
    assert nuclei.meta["region_blocks"] == 1
    assert nuclei.arrays["counts"].shape == (1, 4)
    assert np.isfinite(nuclei.arrays["morphology"]).all()
    assert np.isfinite(nuclei.arrays["topology"]).all()

    absent = tmp_path / "absent.pth"  # a checkpoint that is not there stops the run, named
    refused = CliRunner().invoke(main, ["extract", "--families", "nuclei", "--db",
                                        str(config.paths.db_file)],
                                 env={**environ, "MRRP__FEATURES__NUCLEI_MODEL": str(absent)})
    assert refused.exit_code == 1
    assert "nucleus model" in refused.output and str(absent) in refused.output
