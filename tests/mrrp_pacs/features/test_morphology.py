"""Nuclear morphology against geometry known in closed form and against scikit-image."""

import numpy as np
import pytest
from skimage.feature import graycomatrix, graycoprops
from skimage.measure import regionprops

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.morphology import (
    FEATURE_NAMES,
    GLCM_LEVELS,
    GLCM_MAX_OD,
    MORPHOLOGY_VERSION,
    TOKEN_STATISTICS,
    nucleus_features,
    patch_token,
    token_names,
)
from mrrp_pacs.features.nuclei import (
    INFLAMMATORY,
    NUCLEUS_TYPES,
    STROMAL,
    TUMOUR,
    ClassicalSegmenter,
    SegmentedNuclei,
    stain_density,
)
from mrrp_pacs.phantom.cohort import TRAITS
from mrrp_pacs.phantom.histology import render_slide

NUCLEUS_RGB = (90, 80, 160)


def _shapes(mpp: float):
    """A disc of radius 5 µm and an ellipse with semi-axes 8 × 4 µm, drawn at ``mpp``."""
    size = round(60 / mpp)
    yy, xx = np.mgrid[0:size, 0:size] * mpp  # µm
    labels = np.zeros((size, size), np.int32)
    labels[(yy - 25.15) ** 2 + (xx - 20.3) ** 2 <= 5.0**2] = 1
    labels[((yy - 25.0) / 4.0) ** 2 + ((xx - 42.0) / 8.0) ** 2 <= 1.0] = 2
    rgb = np.full((size, size, 3), 240, np.uint8)
    rgb[labels > 0] = NUCLEUS_RGB
    return rgb, SegmentedNuclei.from_labels(labels, np.array([TUMOUR, STROMAL]))


def _column(features: np.ndarray, name: str) -> np.ndarray:
    return features[:, FEATURE_NAMES.index(name)]


@pytest.mark.parametrize("mpp", [0.5, 0.25])
def test_disc_and_ellipse_measure_as_geometry_says(mpp):
    rgb, nuclei = _shapes(mpp)
    features, names = nucleus_features(rgb, nuclei, mpp)
    assert names == list(FEATURE_NAMES) and features.dtype == np.float32
    disc, ellipse = features
    ramanujan = np.pi * (3 * 12 - np.sqrt((3 * 8 + 4) * (8 + 3 * 4)))
    expected = {
        "area_um2": (np.pi * 25, np.pi * 32),
        "perimeter_um": (2 * np.pi * 5, ramanujan),
        "major_axis_um": (10.0, 16.0),
        "minor_axis_um": (10.0, 8.0),
        "eccentricity": (0.0, np.sqrt(1 - 0.25)),
        "circularity": (1.0, 4 * np.pi * np.pi * 32 / ramanujan**2),
        "curvature_mean_per_um": (2 * np.pi / (2 * np.pi * 5), 2 * np.pi / ramanujan),
    }
    for name, (want_disc, want_ellipse) in expected.items():
        got = _column(features, name)
        assert got[0] == pytest.approx(want_disc, rel=0.04, abs=0.12), name
        assert got[1] == pytest.approx(want_ellipse, rel=0.04, abs=0.06), name
    # curvature at a 3 µm scale: 1/5 µm⁻¹ all round the disc; the ellipse ranges from
    # b/a² = 0.0625 at the blunt side to a/b² = 0.5 at its tips (softened by the window)
    assert 0.12 < disc[FEATURE_NAMES.index("curvature_min_per_um")] <= 0.2
    assert 0.2 <= disc[FEATURE_NAMES.index("curvature_max_per_um")] < 0.3
    assert -0.05 < ellipse[FEATURE_NAMES.index("curvature_min_per_um")] < 0.1
    assert 0.35 < ellipse[FEATURE_NAMES.index("curvature_max_per_um")] < 0.6
    # flat colour: one gray level, so the co-occurrence matrix is a single cell
    assert _column(features, "glcm_asm") == pytest.approx([1, 1])
    assert _column(features, "glcm_contrast") == pytest.approx([0, 0])
    assert _column(features, "glcm_entropy") == pytest.approx([0, 0])
    assert _column(features, "hematoxylin_std_od") == pytest.approx([0, 0], abs=1e-5)


def test_sizes_agree_with_regionprops_on_phantom_nuclei():
    tile, nuclei = _phantom_tile()
    features, _ = nucleus_features(tile, nuclei, 0.5)
    for region in regionprops(nuclei.labels):
        row = features[region.label - 1]
        assert row[FEATURE_NAMES.index("area_um2")] == pytest.approx(region.area * 0.25)
        assert row[FEATURE_NAMES.index("bbox_area_um2")] == pytest.approx(region.area_bbox * 0.25)
        # ours counts pixels as squares (+1/12 px² variance), regionprops as points
        assert row[FEATURE_NAMES.index("major_axis_um")] == pytest.approx(
            region.axis_major_length * 0.5, abs=0.05)
        assert row[FEATURE_NAMES.index("minor_axis_um")] == pytest.approx(
            region.axis_minor_length * 0.5, abs=0.1)


def _phantom_tile():
    slide = render_slide(np.random.default_rng(71), dict.fromkeys(TRAITS, 0.0), 1024, 0.5)
    tumour = np.flatnonzero(slide.nuclei.kind == TUMOUR)
    x, y = int(slide.nuclei.x_px[tumour[3]]), int(slide.nuclei.y_px[tumour[3]])
    x0, y0 = np.clip([x - 112, y - 112], 0, 1024 - 224)
    tile = slide.rgb[y0 : y0 + 224, x0 : x0 + 224]
    return tile, ClassicalSegmenter().segment(tile, 0.5)


def test_texture_and_intensity_match_scikit_image_and_numpy():
    tile, nuclei = _phantom_tile()
    assert len(nuclei) > 20
    features, _ = nucleus_features(tile, nuclei, 0.5)
    hema = stain_density(tile)[..., 0].astype(np.float64)
    level = np.clip((hema / GLCM_MAX_OD * GLCM_LEVELS).astype(int), 0, GLCM_LEVELS - 1)
    angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    for label in range(1, len(nuclei) + 1):
        inside = nuclei.labels == label
        # reference: level 0 marks "outside this nucleus", then dropped from the matrix
        image = np.where(inside, level + 1, 0).astype(np.uint8)
        glcm = graycomatrix(image, [2], angles, levels=GLCM_LEVELS + 1, symmetric=True)
        glcm = glcm[1:, 1:].astype(np.float64)
        glcm /= glcm.sum(axis=(0, 1), keepdims=True)
        p = glcm[:, :, 0, :]
        want = {
            "glcm_asm": graycoprops(glcm, "ASM").mean(),
            "glcm_contrast": graycoprops(glcm, "contrast").mean(),
            "glcm_homogeneity": graycoprops(glcm, "homogeneity").mean(),
            "glcm_entropy": np.mean(-np.sum(p * np.log(np.where(p > 0, p, 1)), axis=(0, 1))),
            "hematoxylin_mean_od": hema[inside].mean(),
            "hematoxylin_std_od": hema[inside].std(),
        }
        for name, value in want.items():
            assert features[label - 1, FEATURE_NAMES.index(name)] == pytest.approx(
                value, rel=1e-4, abs=1e-5), (label, name)


def test_phantom_features_are_finite_and_consistent():
    tile, nuclei = _phantom_tile()
    features, _ = nucleus_features(tile, nuclei, 0.5)
    assert np.isfinite(features).all()
    perimeter = _column(features, "perimeter_um")
    assert _column(features, "curvature_mean_per_um") == pytest.approx(
        2 * np.pi / perimeter, rel=0.02)
    assert (_column(features, "circularity") > 0.3).all()
    assert (_column(features, "bbox_area_um2") >= _column(features, "area_um2")).all()


def test_empty_and_mismatched_inputs():
    empty = SegmentedNuclei.from_labels(np.zeros((32, 32), np.int32), np.zeros(0))
    features, names = nucleus_features(np.zeros((32, 32, 3), np.uint8), empty, 0.5)
    assert features.shape == (0, len(FEATURE_NAMES)) and names == list(FEATURE_NAMES)
    with pytest.raises(FeatureError, match="do not match the tile"):
        nucleus_features(np.zeros((16, 16, 3), np.uint8), empty, 0.5)
    with pytest.raises(FeatureError, match="uint8"):
        nucleus_features(np.zeros((32, 32, 3), np.float64), empty, 0.5)


def test_patch_token_summarises_per_type_without_nan():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(7, len(FEATURE_NAMES))).astype(np.float32)
    kinds = np.array([TUMOUR] * 4 + [INFLAMMATORY] * 3)
    whole = np.array([True, True, True, False, True, False, False])
    token, names = patch_token(features, kinds, whole)
    assert token.dtype == np.float32 and np.isfinite(token).all()
    per_type = 2 + len(FEATURE_NAMES) * len(TOKEN_STATISTICS)
    assert token.shape == (len(NUCLEUS_TYPES) * per_type,) == (len(names),)
    assert names == token_names() and len(set(names)) == len(names)
    value = dict(zip(names, token.tolist(), strict=True))
    # counts and fractions use every nucleus, statistics only whole ones
    assert value["tumour_count"] == 4 and value["inflammatory_count"] == 3
    assert value["tumour_fraction"] == pytest.approx(4 / 7)
    assert value["tumour_area_um2_mean"] == pytest.approx(features[:3, 0].mean(), rel=1e-6)
    assert value["tumour_area_um2_q50"] == pytest.approx(np.median(features[:3, 0]), rel=1e-6)
    # one whole inflammatory nucleus: its values, spread 0
    assert value["inflammatory_area_um2_mean"] == pytest.approx(features[4, 0])
    assert value["inflammatory_area_um2_std"] == 0.0
    # absent types are zeros
    assert all(value[n] == 0.0 for n in names if n.startswith(("stromal_", "normal_")))
    empty_token, _ = patch_token(np.zeros((0, len(FEATURE_NAMES))), np.zeros(0, int))
    assert not empty_token.any()
    with pytest.raises(FeatureError, match="kinds"):
        patch_token(features, kinds[:3])
    with pytest.raises(FeatureError, match="whole"):
        patch_token(features, kinds, whole[:3])


def test_version_and_names_are_stable():
    assert MORPHOLOGY_VERSION == "2"  # 2: hematoxylin in the normalised stain space
    assert FEATURE_NAMES[:3] == ("area_um2", "perimeter_um", "bbox_area_um2")
    assert len(FEATURE_NAMES) == 16
    assert token_names()[:3] == ["tumour_count", "tumour_fraction", "tumour_area_um2_mean"]
