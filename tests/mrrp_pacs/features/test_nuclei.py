"""Nucleus segmentation and typing, scored against the phantom, which knows every nucleus.

Evaluation seeds are 0-99; the type model was calibrated on seeds 1000-1059
(benchmarks/bench_nuclei.py --calibrate), so nothing here was seen in fitting.
"""


import numpy as np
import pytest

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.morphology import nucleus_features
from mrrp_pacs.features.nuclei import (
    INFLAMMATORY,
    NUCLEUS_TYPES,
    TUMOUR,
    TYPING_MEASUREMENTS,
    ClassicalSegmenter,
    NucleusTypeModel,
    SegmentedNuclei,
    default_type_model,
    match_detections,
)
from mrrp_pacs.phantom.cohort import TRAITS
from mrrp_pacs.phantom.histology import render_slide

MPP = 0.5
TILE = 224
MARGIN = 32  # 16 µm of context around each tile: more than any nuclear radius
SLIDE_PX = 1536
RADIUS_PX = 4.0 / MPP  # a detection within 4 µm of a drawn centre finds it

SEGMENTER = ClassicalSegmenter()


def _slide(seed: int, **traits: float):
    return render_slide(np.random.default_rng(seed), {**dict.fromkeys(TRAITS, 0.0), **traits},
                        size_px=SLIDE_PX, mpp=MPP)


def _score(traits: dict[str, float], seeds: tuple[int, ...], tiles: int = 6,
           per_slide: bool = True):
    """Detection counts and type confusion over tiles centred on tumour nuclei.

    Each tile is segmented with MARGIN px of context and owns the nuclei centred in it (the
    module's border policy). A drawn nucleus centred in the tile is found when a detection owned
    by the tile lies within 4 µm; a detection matching a nucleus centred in the margin is
    neither right nor wrong (ownership at the edge is decided by the centroid).
    """
    tp = fp = fn = 0
    confusion = np.zeros((4, 4), int)
    for seed in seeds:
        slide = _slide(seed, **traits)
        truth = slide.nuclei
        rng = np.random.default_rng(seed + 7)
        corners = []
        for i in rng.choice(np.flatnonzero(truth.kind == TUMOUR), tiles, replace=False):
            corners.append((
                int(np.clip(truth.x_px[i] - TILE // 2, MARGIN, SLIDE_PX - TILE - MARGIN)),
                int(np.clip(truth.y_px[i] - TILE // 2, MARGIN, SLIDE_PX - TILE - MARGIN))))
        crops = [slide.rgb[y0 - MARGIN : y0 + TILE + MARGIN, x0 - MARGIN : x0 + TILE + MARGIN]
                 for x0, y0 in corners]
        # one stain estimate per slide from its tiles, as the pipeline does
        segmenter = SEGMENTER.for_slide(np.stack(crops)) if per_slide else SEGMENTER
        for (x0, y0), crop in zip(corners, crops, strict=True):
            found = segmenter.segment(crop, MPP)
            own = found.centred_in(MARGIN, MARGIN, MARGIN + TILE, MARGIN + TILE)
            true_xy = np.stack([truth.x_px - x0 + MARGIN, truth.y_px - y0 + MARGIN], axis=1)
            near = np.all((true_xy >= 0) & (true_xy < TILE + 2 * MARGIN), axis=1)
            inside = np.all((true_xy >= MARGIN) & (true_xy < MARGIN + TILE), axis=1)[near]
            match = match_detections(found.centroids_px[own], true_xy[near], RADIUS_PX)
            hit = inside[match.pairs[:, 1]]
            tp += int(hit.sum())
            fp += int(own.sum()) - len(match.pairs)
            fn += int(inside.sum()) - int(hit.sum())
            true_kind = truth.kind[near][match.pairs[hit, 1]]
            np.add.at(confusion, (true_kind, found.kinds[own][match.pairs[hit, 0]]), 1)
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return precision, recall, 2 * precision * recall / (precision + recall), confusion


def _report(name: str, scores) -> None:
    precision, recall, f1, confusion = scores
    accuracy = np.trace(confusion) / confusion.sum()
    print(f"\n{name}: detection P {precision:.3f} R {recall:.3f} F1 {f1:.3f}, "
          f"type accuracy {accuracy:.3f}; confusion (rows true, columns called "
          f"{'/'.join(NUCLEUS_TYPES)}):")
    for kind, row in zip(NUCLEUS_TYPES, confusion, strict=True):
        print(f"  {kind:>12} {row.tolist()}")


# floors are the figures measured on these seeds (see the report) less a margin; the last
# column is the floor on tumour recall among found tumour nuclei. Pleomorphism +2 draws small,
# dark tumour nuclei that look like lymphocytes: with per-slide estimated vectors (not the
# phantom's own Ruifrok–Johnston ones) 0.943 accuracy, 0.939 tumour recall (was 0.961 / 0.96)
@pytest.mark.parametrize(("name", "traits", "min_f1", "min_accuracy", "min_tumour"), [
    ("default", {}, 0.95, 0.97, 0.95),
    ("nuclear_size +2", {"nuclear_size": 2.0}, 0.91, 0.96, 0.95),
    ("nuclear_size -2", {"nuclear_size": -2.0}, 0.95, 0.96, 0.95),
    ("lymphocytes +1.5", {"lymphocytes": 1.5}, 0.94, 0.95, 0.95),
    ("lymphocytes -1.5", {"lymphocytes": -1.5}, 0.95, 0.96, 0.95),
    ("tumour_density +2", {"tumour_density": 2.0}, 0.93, 0.95, 0.95),
    ("tumour_density -2", {"tumour_density": -2.0}, 0.94, 0.95, 0.95),
    ("pleomorphism +2", {"pleomorphism": 2.0}, 0.93, 0.92, 0.92),
])
def test_detection_and_typing_on_the_phantom(name, traits, min_f1, min_accuracy, min_tumour):
    scores = _score(traits, seeds=(11, 12))
    _report(name, scores)
    _, _, f1, confusion = scores
    assert f1 >= min_f1
    assert np.trace(confusion) / confusion.sum() >= min_accuracy
    # the two types the model's signal lives in are rarely confused
    assert confusion[TUMOUR, TUMOUR] / confusion[TUMOUR].sum() >= min_tumour
    assert confusion[INFLAMMATORY, INFLAMMATORY] / confusion[INFLAMMATORY].sum() >= 0.8


def _tumour_area_um2(seed: int, **traits: float) -> tuple[float, float]:
    """Mean area of whole nuclei called tumour on 8 tumour tiles, and the drawn mean area."""
    slide = _slide(seed, **traits)
    truth = slide.nuclei
    rng = np.random.default_rng(seed)
    areas = []
    for i in rng.choice(np.flatnonzero(truth.kind == TUMOUR), 8, replace=False):
        x0 = int(np.clip(truth.x_px[i] - TILE // 2, 0, SLIDE_PX - TILE))
        y0 = int(np.clip(truth.y_px[i] - TILE // 2, 0, SLIDE_PX - TILE))
        tile = slide.rgb[y0 : y0 + TILE, x0 : x0 + TILE]
        found = SEGMENTER.segment(tile, MPP)
        features, names = nucleus_features(tile, found, MPP)
        keep = (found.kinds == TUMOUR) & ~found.touches_border
        areas.append(features[keep, names.index("area_um2")])
    tumour = truth.kind == TUMOUR
    drawn = np.mean(np.pi / 4 * truth.major_um[tumour] * truth.minor_um[tumour])
    return float(np.mean(np.concatenate(areas))), float(drawn)


def test_tumour_nuclear_area_follows_nuclear_size():
    measured, drawn = zip(*(_tumour_area_um2(21, nuclear_size=z) for z in (-2.0, 0.0, 2.0)),
                          strict=True)
    print("\nmean tumour nuclear area (µm²) at nuclear_size -2/0/+2: measured "
          f"{np.round(measured, 1).tolist()}, drawn {np.round(drawn, 1).tolist()}")
    assert measured[0] < measured[1] < measured[2]
    assert measured[2] > 2.0 * measured[0]
    # absolute size, not only order: within 15 % of the drawn ellipses (overlaps hide some)
    assert np.allclose(measured, drawn, rtol=0.15)


def _inflammatory_fraction(seed: int, **traits: float) -> float:
    """Share of nuclei called inflammatory over tiles covering the tissue."""
    slide = _slide(seed, **traits)
    kinds = []
    for y0 in range(0, SLIDE_PX - TILE + 1, 2 * TILE):
        for x0 in range(0, SLIDE_PX - TILE + 1, TILE):
            tile = slide.rgb[y0 : y0 + TILE, x0 : x0 + TILE]
            if tile.mean() < 225:  # mostly tissue, not glass
                kinds.append(SEGMENTER.segment(tile, MPP).kinds)
    return float(np.mean(np.concatenate(kinds) == INFLAMMATORY))


def test_inflammatory_fraction_follows_lymphocytes():
    few, many = (_inflammatory_fraction(31, lymphocytes=z) for z in (-1.5, 1.5))
    print(f"\ninflammatory fraction at lymphocytes -1.5/+1.5: {few:.3f} / {many:.3f}")
    assert many > 3 * few


def test_blank_glass_has_no_nuclei():
    glass = np.random.default_rng(0).normal(246, 2, (TILE, TILE, 3)).clip(0, 255).astype(np.uint8)
    for tile in (glass, _slide(1).rgb[:TILE, :TILE]):  # the phantom's corner is glass too
        found = SEGMENTER.segment(tile, MPP)
        assert len(found) == 0
        assert found.labels.shape == (TILE, TILE) and not found.labels.any()
        assert found.centroids_px.shape == (0, 2)
        features, names = nucleus_features(tile, found, MPP)
        assert features.shape == (0, len(names))


@pytest.mark.parametrize(("array", "mpp"), [
    (np.zeros((64, 64, 3), np.float32), MPP),
    (np.zeros((64, 64), np.uint8), MPP),
    (np.zeros((64, 64, 4), np.uint8), MPP),
    (np.zeros((0, 64, 3), np.uint8), MPP),
    (np.zeros((64, 64, 3), np.uint8), 0.0),
    (np.zeros((64, 64, 3), np.uint8), float("nan")),
])
def test_invalid_tiles_are_refused(array, mpp):
    with pytest.raises(FeatureError, match="tile"):
        SEGMENTER.segment(array, mpp)


def test_a_list_is_not_a_tile():
    with pytest.raises(FeatureError, match="numpy array"):
        SEGMENTER.segment([[[0, 0, 0]]], MPP)


def test_border_policy_flags_cut_nuclei_and_context_makes_them_whole():
    slide = _slide(41)
    truth = slide.nuclei
    i = np.flatnonzero(truth.kind == TUMOUR)[0]
    x, y = int(truth.x_px[i]), int(truth.y_px[i])
    # a tile whose left edge cuts nucleus i through its centre
    cut = SEGMENTER.segment(slide.rgb[y - 100 : y + 100, x : x + 200], MPP)
    on_edge = cut.labels[100, 0]
    assert on_edge > 0 and cut.touches_border[on_edge - 1]
    whole_tiles = ~cut.touches_border
    assert whole_tiles.sum() > 0.6 * len(cut)
    # with 40 px of context the same nucleus is whole and owned by the tile its centre is in
    context = SEGMENTER.segment(slide.rgb[y - 140 : y + 140, x - 40 : x + 240], MPP)
    owner = context.labels[140, 40]
    assert owner > 0 and not context.touches_border[owner - 1]
    assert np.sum(cut.labels == on_edge) < 0.7 * np.sum(context.labels == owner)
    cx = context.centroids_px[owner - 1, 0]
    inside = context.centred_in(40, 40, 240, 240)
    assert inside[owner - 1] == (cx >= 40)


def test_match_detections_is_one_to_one():
    true = np.array([[10.0, 10.0], [30.0, 10.0], [100.0, 100.0]])
    pred = np.array([[11.0, 10.0], [12.0, 10.0], [29.0, 11.0], [60.0, 60.0]])
    match = match_detections(pred, true, radius_px=5.0)
    assert sorted(map(tuple, match.pairs.tolist())) == [(0, 0), (2, 1)]
    assert match.precision == pytest.approx(2 / 4)
    assert match.recall == pytest.approx(2 / 3)
    assert match.f1 == pytest.approx(2 * (0.5 * 2 / 3) / (0.5 + 2 / 3))
    # the assignment maximises matches first: a greedy nearest choice would pair (1, 0) here
    crossed = match_detections(np.array([[5.0, 0.0], [0.0, 0.0]]),
                               np.array([[4.0, 0.0], [9.0, 0.0]]), radius_px=4.5)
    assert sorted(map(tuple, crossed.pairs.tolist())) == [(0, 1), (1, 0)]
    empty = match_detections(np.zeros((0, 2)), np.zeros((0, 2)), 5.0)
    assert (empty.precision, empty.recall, empty.pairs.shape) == (1.0, 1.0, (0, 2))
    missed = match_detections(np.zeros((0, 2)), true, 5.0)
    assert (missed.precision, missed.recall, missed.f1) == (0.0, 0.0, 0.0)


def test_same_nuclei_in_micrometres_at_another_resolution():
    """Rendered at 0.25 µm/px (nuclei twice as many pixels across) areas stay in µm²."""
    areas = {}
    for mpp in (0.5, 0.25):
        size = round(768 / mpp)
        slide = render_slide(np.random.default_rng(51), dict.fromkeys(TRAITS, 0.0), size, mpp)
        side = round(112 / mpp)
        tumour = np.flatnonzero(slide.nuclei.kind == TUMOUR)
        values = []
        for i in tumour[:: max(1, len(tumour) // 4)][:4]:
            x0 = int(np.clip(slide.nuclei.x_px[i] - side // 2, 0, size - side))
            y0 = int(np.clip(slide.nuclei.y_px[i] - side // 2, 0, size - side))
            tile = slide.rgb[y0 : y0 + side, x0 : x0 + side]
            found = SEGMENTER.segment(tile, mpp)
            features, _ = nucleus_features(tile, found, mpp)
            values.append(features[(found.kinds == TUMOUR) & ~found.touches_border, 0])
        areas[mpp] = float(np.mean(np.concatenate(values)))
    print(f"\nmean tumour nuclear area at 0.5 / 0.25 µm/px: {areas[0.5]:.1f} / "
          f"{areas[0.25]:.1f} µm²")
    assert areas[0.25] == pytest.approx(areas[0.5], rel=0.15)


def test_type_model_fit_and_round_trip():
    rng = np.random.default_rng(3)
    f = len(TYPING_MEASUREMENTS)
    centres = rng.normal(0, 2.5, (4, f))
    kinds = rng.integers(0, 4, 2000)
    x = centres[kinds] + rng.normal(0, 1, (2000, f))
    model = NucleusTypeModel.fit(x, kinds)
    assert np.mean(model.predict(x) == kinds) > 0.97
    again = NucleusTypeModel.from_toml(model.to_toml("test\nfit"), "memory")
    assert np.array_equal(again.predict(x), model.predict(x))
    assert np.allclose(again.logits(x), model.logits(x), atol=1e-5)


def test_shipped_type_model_is_readable():
    model = default_type_model()
    assert model.measurements == TYPING_MEASUREMENTS
    assert model.coef.shape == (4, len(TYPING_MEASUREMENTS) * (len(TYPING_MEASUREMENTS) + 3) // 2)
    with pytest.raises(FeatureError, match="refit"):
        NucleusTypeModel.from_toml(model.to_toml("").replace("log_area_um2", "area"), "x.toml")


def test_select_keeps_and_renumbers_the_chosen_nuclei():
    labels = np.zeros((8, 12), np.int32)
    labels[1:3, 1:3], labels[4:6, 4:7], labels[0:8, 10:12] = 1, 2, 3
    found = SegmentedNuclei.from_labels(labels, np.array([TUMOUR, INFLAMMATORY, TUMOUR]))
    kept = found.select(np.array([False, True, True]))
    assert list(kept.kinds) == [INFLAMMATORY, TUMOUR]
    assert set(np.unique(kept.labels)) == {0, 1, 2}
    assert np.array_equal(kept.labels == 1, labels == 2)
    assert np.array_equal(kept.labels == 2, labels == 3)
    assert np.allclose(kept.centroids_px, found.centroids_px[1:])
    assert list(kept.touches_border) == [False, True]


def test_segmented_nuclei_are_checked():
    labels = np.zeros((8, 8), np.int32)
    labels[2:4, 2:4] = 1
    SegmentedNuclei.from_labels(labels, np.array([TUMOUR]))
    with pytest.raises(FeatureError, match="run to 1"):
        SegmentedNuclei(labels, np.zeros(2, np.int8), np.zeros((2, 2)), np.zeros(2, bool))
    with pytest.raises(FeatureError, match="centroids"):
        SegmentedNuclei(labels, np.zeros(1, np.int8), np.zeros((2, 2)), np.zeros(1, bool))
    with pytest.raises(FeatureError, match="int32"):
        SegmentedNuclei.from_labels(labels.astype(np.int64), np.array([TUMOUR]))


def test_version_follows_the_type_model():
    shipped = ClassicalSegmenter()
    assert shipped.name == "classical-hematoxylin-watershed"
    assert shipped.version == ClassicalSegmenter().version
    model = default_type_model()
    other = NucleusTypeModel(model.measurements, model.centre, model.scale, model.coef * 1.01,
                             model.intercept)
    assert ClassicalSegmenter(other).version != shipped.version


# -- other laboratories' stains --------------------------------------------------------------
# The fields below are rendered here, with this test's own dye vectors and glass (neither the
# phantom's sites nor anything of the extractor): a purple and a blue hematoxylin on warm and
# cool glass.

OWN_STAINS = {
    "purple-on-warm-glass": ((0.74, 0.60, 0.30), (0.10, 0.88, 0.46), (238.0, 229.0, 216.0)),
    "blue-on-cool-glass": ((0.86, 0.44, 0.25), (0.30, 0.73, 0.62), (222.0, 228.0, 242.0)),
}


def own_stain_field(hematoxylin, eosin, glass_rgb, seed=0, spacing_um=14.0, eosin_od=0.35,
                    size_px=288):
    """Beer–Lambert field at MPP: eosin tissue (glass strip on the left), elliptical nuclei
    on a jittered grid, eosin displaced inside them, 8-bit. Returns rgb, centres (x, y) px and
    drawn areas µm²."""
    rng = np.random.default_rng(seed)
    h_vec = np.asarray(hematoxylin) / np.linalg.norm(hematoxylin)
    e_vec = np.asarray(eosin) / np.linalg.norm(eosin)
    yy, xx = np.mgrid[:size_px, :size_px].astype(float)
    tissue = xx >= 24
    h = np.where(tissue, 0.05, 0.0)
    e = np.where(tissue, eosin_od + 0.05 * rng.standard_normal((size_px, size_px)), 0.0)
    centres, areas = [], []
    step = spacing_um / MPP
    for cy in np.arange(24 + step / 2, size_px - 16, step):
        for cx in np.arange(24 + step / 2, size_px - 16, step):
            x, y = cx + rng.uniform(-2, 2), cy + rng.uniform(-2, 2)
            a_um, b_um = rng.uniform(4.0, 5.5), rng.uniform(3.2, 4.5)
            angle = rng.uniform(0, np.pi)
            u = ((xx - x) * np.cos(angle) + (yy - y) * np.sin(angle)) / (a_um / MPP)
            v = (-(xx - x) * np.sin(angle) + (yy - y) * np.cos(angle)) / (b_um / MPP)
            alpha = np.clip((1 - np.hypot(u, v)) * b_um / MPP + 0.5, 0, 1)
            load = rng.uniform(0.6, 1.1)
            h = h + alpha * (load - h)
            e = e * (1 - 0.7 * alpha)
            centres.append((x, y))
            areas.append(np.pi * a_um * b_um)
    glass_od = -np.log(np.asarray(glass_rgb) / 255.0)
    od = h[..., None] * h_vec + e[..., None] * e_vec + glass_od
    rgb = np.clip(255 * np.exp(-od) + rng.normal(0, 1.0, od.shape), 0, 255)
    return np.round(rgb).astype(np.uint8), np.array(centres), np.array(areas)


@pytest.mark.parametrize("stain", sorted(OWN_STAINS))
def test_segmenter_finds_nuclei_under_another_stain_and_tinted_glass(stain):
    rgb, centres, areas = own_stain_field(*OWN_STAINS[stain])
    found = SEGMENTER.segment(rgb, MPP)
    whole = ~found.touches_border
    match = match_detections(found.centroids_px, centres, RADIUS_PX)
    pixels = np.bincount(found.labels.ravel(), minlength=len(found) + 1)[1:] * MPP**2
    pairs = match.pairs[whole[match.pairs[:, 0]]]
    ratio = pixels[pairs[:, 0]].mean() / areas[pairs[:, 1]].mean()
    print(f"{stain}: F1 {match.f1:.3f}, area found/drawn {ratio:.3f}")
    assert match.f1 >= 0.95
    assert 0.85 <= ratio <= 1.15


def test_same_nuclei_and_areas_whatever_the_stain():
    """One field, two laboratories: the nuclei found and their areas agree within 5 %."""
    results = []
    for hematoxylin, eosin, glass in OWN_STAINS.values():
        rgb, _, _ = own_stain_field(hematoxylin, eosin, glass, seed=3)
        found = SEGMENTER.segment(rgb, MPP)
        pixels = np.bincount(found.labels.ravel(), minlength=len(found) + 1)[1:]
        results.append((len(found), pixels[~found.touches_border].mean()))
    (n_a, area_a), (n_b, area_b) = results
    assert abs(n_a - n_b) <= 0.03 * n_a
    assert area_b == pytest.approx(area_a, rel=0.05)


def test_dense_eosin_field_is_not_called_nucleus():
    """A strongly eosin-stained field with sparse nuclei: only the nuclei are foreground (the
    old fixed threshold on Ruifrok–Johnston hematoxylin called most such pixels nucleus)."""
    hematoxylin, eosin, glass = OWN_STAINS["blue-on-cool-glass"]
    rgb, centres, areas = own_stain_field(hematoxylin, eosin, glass, spacing_um=24.0,
                                          eosin_od=0.9)
    found = SEGMENTER.segment(rgb, MPP)
    drawn_share = areas.sum() / (rgb.shape[0] * rgb.shape[1] * MPP**2)
    called_share = float((found.labels > 0).mean())
    print(f"drawn nuclear share {drawn_share:.3f}, called {called_share:.3f}")
    assert called_share <= 1.3 * drawn_share
    assert match_detections(found.centroids_px, centres, RADIUS_PX).f1 >= 0.9


def test_slide_estimate_is_used_for_every_tile():
    rgb, _, _ = own_stain_field(*OWN_STAINS["purple-on-warm-glass"], seed=5)
    bound = SEGMENTER.for_slide(rgb)
    assert bound.stain is not None and bound.version == SEGMENTER.version
    # a tile cut from the tissue alone (no glass) still gets the slide's glass
    tile = rgb[64:224, 64:224]
    assert bound.segment(tile, MPP).labels.max() >= 1
    assert SEGMENTER.for_slide(np.full((64, 64, 3), 240, np.uint8)).stain is None
