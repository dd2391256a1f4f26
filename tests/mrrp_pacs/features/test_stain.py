"""Stain estimation on fields rendered here with this test's own dye vectors and glass."""

import numpy as np
import pytest
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.stain import estimate_stain


def field(hematoxylin, eosin, glass_rgb, size_px=256, seed=0):
    """Pixels mixing both dyes in varied proportions (nuclei, cytoplasm, stroma) on glass."""
    rng = np.random.default_rng(seed)
    h_vec = np.asarray(hematoxylin) / np.linalg.norm(hematoxylin)
    e_vec = np.asarray(eosin) / np.linalg.norm(eosin)
    h = rng.gamma(0.6, 0.5, (size_px, size_px))
    e = rng.uniform(0.0, 0.6, (size_px, size_px))
    tissue = np.arange(size_px)[None, :] >= size_px // 8
    h, e = h * tissue, e * tissue
    od = h[..., None] * h_vec + e[..., None] * e_vec - np.log(np.asarray(glass_rgb) / 255.0)
    rgb = np.clip(255 * np.exp(-od) + rng.normal(0, 1.0, od.shape), 0, 255)
    return np.round(rgb).astype(np.uint8), h_vec, e_vec


def angle_deg(a, b):
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b),
                                              -1, 1))))


@pytest.mark.parametrize(("hematoxylin", "eosin", "glass"), [
    ((0.74, 0.60, 0.30), (0.10, 0.88, 0.46), (238.0, 229.0, 216.0)),
    ((0.86, 0.44, 0.25), (0.30, 0.73, 0.62), (222.0, 228.0, 242.0)),
    ((0.55, 0.75, 0.37), (0.05, 0.95, 0.30), (250.0, 250.0, 250.0)),
])
def test_vectors_glass_and_concentrations_are_recovered(hematoxylin, eosin, glass):
    rgb, h_vec, e_vec = field(hematoxylin, eosin, glass)
    stain = estimate_stain(rgb)
    assert stain is not None and stain.glass_found
    assert np.allclose(stain.glass_rgb, glass, atol=2.5)
    assert angle_deg(stain.hematoxylin, h_vec) < 3 and angle_deg(stain.eosin, e_vec) < 3
    # a pixel of known load reads that load back, whatever the lab's hue and glass
    od = 0.8 * h_vec + 0.3 * e_vec - np.log(np.asarray(glass) / 255.0)
    pixel = np.round(255 * np.exp(-od)).astype(np.uint8)[None, None]
    h, e, _ = stain.concentrations(pixel)[0, 0]
    assert h == pytest.approx(0.8, abs=0.05) and e == pytest.approx(0.3, abs=0.05)
    assert not stain.tissue(np.full((1, 1, 3), glass, np.uint8)).any()


def test_agrees_with_torchstain_macenko_where_its_assumptions_hold():
    """White glass and dyes with strong red and blue optical density: torchstain's estimator
    (fixed Io 240, β 0.15 per channel) is valid there and must find the same vectors."""
    rgb, _, _ = field((0.70, 0.62, 0.36), (0.30, 0.80, 0.52), (240.0, 240.0, 240.0), seed=1)
    reference = NumpyMacenkoNormalizer()
    reference.fit(rgb)
    stain = estimate_stain(rgb)
    assert stain is not None
    assert angle_deg(stain.hematoxylin, reference.HERef[:, 0]) < 3
    assert angle_deg(stain.eosin, reference.HERef[:, 1]) < 3


def test_nothing_to_estimate_on_glass_or_one_dye():
    glass = np.random.default_rng(0).normal(244, 2, (128, 128, 3)).clip(0, 255).astype(np.uint8)
    assert estimate_stain(glass) is None
    rgb, _, _ = field((0.74, 0.60, 0.30), (0.74, 0.60, 0.30), (240.0, 240.0, 240.0))
    assert estimate_stain(rgb) is None  # one direction only: no basis
    with pytest.raises(FeatureError, match="uint8"):
        estimate_stain(np.zeros((4, 4, 3), np.float32))
