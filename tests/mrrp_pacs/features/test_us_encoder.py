"""The ultrasound encoder: the lesion crop, UsResNet, its rotation training and its store."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from stored_models import rewrite_manifest
from us_phantom import random_traits

from model_store import ModelStore
from mrrp_pacs.errors import FeatureError, ModelStoreError
from mrrp_pacs.features.us_encoder import (
    UsResNet,
    crop_roi,
    encode_crops,
    load_us_encoder,
    save_us_encoder,
    token_positions,
    train_from_crops,
    train_us_encoder,
)
from mrrp_pacs.phantom.ultrasound import render_frame


def test_crop_keeps_aspect_ratio_with_margin_and_clips():
    gray = np.zeros((480, 640), dtype=np.float32)
    gray[100:201, 100:301] = 200.0  # a box 201 wide, 101 tall
    crop = crop_roi(gray, (100, 100, 300, 200))
    assert crop.shape == (256, 256) and crop.dtype == np.float32
    # padded square side 213 (201 + 2 × 6): lesion rows 101 / 213 of the height, centred
    rows = np.nonzero(crop[:, 128] > 100)[0]
    assert abs(len(rows) - 256 * 101 / 213) <= 2 and abs(rows.mean() - 127.5) <= 1.5
    assert crop[128, 3] < 1 and crop[128, 10] > 199  # 6 px margin → ~7 crop px of background
    at_corner = crop_roi(gray, (0, 0, 50, 50))  # margin clipped at the image edge
    assert at_corner.shape == (256, 256)
    with pytest.raises(FeatureError, match="outside"):
        crop_roi(gray, (700, 10, 800, 60))


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """64 phantom lesion crops; frames at 0.2 mm/px (same field of view, 4 × faster)."""
    out = []
    for i in range(64):
        rng = np.random.default_rng(500 + i)
        frame = render_frame(np.random.default_rng(i), random_traits(rng),
                             float(np.clip(20 * np.exp(0.45 * rng.standard_normal()), 6, 45)),
                             rows=240, columns=320, pixel_mm=0.2)
        out.append(crop_roi(frame.pixels, frame.lesion_box_px))
    return np.stack(out)


def test_encoder_shapes_and_token_order():
    model = UsResNet().eval()
    x = torch.rand(2, 1, 256, 256) * 255
    with torch.no_grad():
        fmap, tokens, logits = model.feature_map(x), model.encode(x), model(x)
    assert fmap.shape == (2, 64, 16, 16) and tokens.shape == (2, 256, 64)
    assert logits.shape == (2, 4)
    positions = token_positions()
    assert positions.shape == (256, 2) and tuple(positions[17]) == (1, 1)
    for index in (0, 17, 255):
        r, c = positions[index]
        torch.testing.assert_close(tokens[:, index], fmap[:, :, r, c])
    assert encode_crops(model, x[:, 0].numpy()).shape == (2, 256, 64)
    with pytest.raises(FeatureError, match=r"crops must be \(n, 256, 256\)"):
        encode_crops(model, np.zeros((2, 128, 128), np.float32))


def test_rotation_pretext_loss_decreases(crops):
    _, history = train_us_encoder(crops, epochs=4, seed=0)
    assert len(history.losses) == 4 and history.n_crops == 64
    assert history.losses[0] < math.log(4) + 0.05  # the zero head starts at chance
    assert history.losses[-1] < history.losses[0] - 0.15
    assert history.accuracies[-1] > 0.4


def test_training_is_deterministic_and_restores_torch_state(crops):
    before = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, _ = train_us_encoder(crops[:16], epochs=1, seed=3)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's RNG stream is untouched
    assert torch.are_deterministic_algorithms_enabled() == before
    second, _ = train_us_encoder(crops[:16], epochs=1, seed=3)
    other, _ = train_us_encoder(crops[:16], epochs=1, seed=4)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert not torch.equal(first.blocks[0].conv1.weight, other.blocks[0].conv1.weight)


def test_store_round_trip_gives_identical_tokens_and_refuses_changes(crops, tmp_path):
    model, history = train_us_encoder(crops[:16], epochs=1, seed=0)
    store = ModelStore(tmp_path / "models")
    saved = save_us_encoder(store, model, history, {"source": "phantom seed 0"})
    assert saved.kind == "us-encoder" and saved.name == "usresnet-small"
    manifest = saved.manifest
    assert manifest["output_shape"] == [64, 16, 16] and manifest["pretext_task"] == "rotation-4way"
    assert manifest["training"]["n_crops"] == 16 and manifest["training"]["seed"] == 0
    assert manifest["training"]["final_loss"] == history.losses[-1]
    assert manifest["training"]["provenance"] == {"source": "phantom seed 0"}

    loaded, version = load_us_encoder(store)
    assert version.version == saved.version
    np.testing.assert_array_equal(encode_crops(loaded, crops[:4]), encode_crops(model, crops[:4]))

    manifest_file = saved.path / "manifest.json"
    edited = json.loads(manifest_file.read_text())
    edited["code_version"] = "0"
    manifest_file.write_text(json.dumps(edited))
    with pytest.raises(ModelStoreError, match=r"does not match manifest\.sha256"):
        load_us_encoder(store)
    rewrite_manifest(saved.path, edited)  # as an older encoder code would have saved it
    with pytest.raises(ModelStoreError, match=r"code version '0'.*train a new encoder"):
        load_us_encoder(store)
    edited["code_version"], edited["architecture"]["stem"]["width"] = "1", 8
    rewrite_manifest(saved.path, edited)
    with pytest.raises(ModelStoreError, match="another architecture"):
        load_us_encoder(store)

    newer = train_from_crops(store, crops[:8], epochs=1, seed=1)
    weights = newer.path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelStoreError, match="does not match its manifest sha256"):
        load_us_encoder(store, version=newer.version)
