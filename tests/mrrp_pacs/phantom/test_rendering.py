"""The traits are in the pixels and words, not only in truth.csv."""

import numpy as np
from scipy.stats import spearmanr

from mrrp_pacs.phantom.histology import INFLAMMATORY, NUCLEUS_TYPES, TUMOUR, render_slide
from mrrp_pacs.phantom.messages import report_text
from mrrp_pacs.phantom.ultrasound import render_frame

WSI_ZERO = {"nuclear_size": 0.0, "pleomorphism": 0.0, "tumour_density": 0.0,
            "lymphocytes": 0.0, "lymph_clustering": 0.0}
US_ZERO = {"us_margin": 0.0, "us_orientation": 0.0, "us_shadowing": 0.0,
           "us_heterogeneity": 0.0, "vascularity": 0.0}


def _slide(seed: int, **traits: float):
    return render_slide(np.random.default_rng(seed), {**WSI_ZERO, **traits}, size_px=1024)


def test_nuclei_have_realistic_sizes():
    nuclei = _slide(1).nuclei
    assert set(np.unique(nuclei.kind)) == set(range(len(NUCLEUS_TYPES)))
    tumour = nuclei.kind == TUMOUR
    assert 8 <= np.median(nuclei.major_um[tumour]) <= 14
    lymph = nuclei.kind == INFLAMMATORY
    assert 6 <= np.median(nuclei.major_um[lymph]) <= 7.5


def test_slide_traits_change_what_is_drawn():
    small, large = _slide(2, nuclear_size=-2.0), _slide(2, nuclear_size=2.0)
    mean_area = [np.mean(s.nuclei.major_um * s.nuclei.minor_um * (s.nuclei.kind == TUMOUR))
                 for s in (small, large)]
    assert mean_area[1] > 1.5 * mean_area[0]
    few, many = _slide(3, lymphocytes=-1.5), _slide(3, lymphocytes=1.5)
    counts = [np.sum(s.nuclei.kind == INFLAMMATORY) for s in (few, many)]
    assert counts[1] > 3 * counts[0]
    # the rendered pixels follow: a dense slide has more dark (hematoxylin-rich) pixels
    sparse, dense = _slide(4, tumour_density=-2.0), _slide(4, tumour_density=2.0)
    dark = [np.mean(s.rgb[..., 0] < 150) for s in (sparse, dense)]
    assert dark[1] > 1.2 * dark[0]


def test_ultrasound_shadowing_darkens_below_the_lesion():
    means = []
    for shadow in (-2.0, 2.0):
        frame = render_frame(np.random.default_rng(5), {**US_ZERO, "us_shadowing": shadow}, 15.0)
        x0, _, x1, y1 = frame.lesion_box_px
        means.append(frame.pixels[y1 + 10 : y1 + 60, x0:x1].mean())
    assert means[1] < 0.7 * means[0]


def test_ultrasound_orientation_sets_the_box_shape():
    ratios = []
    for orientation in (-2.0, 2.0):
        frame = render_frame(np.random.default_rng(6),
                             {**US_ZERO, "us_orientation": orientation}, 15.0)
        x0, y0, x1, y1 = frame.lesion_box_px
        ratios.append((y1 - y0) / (x1 - x0))
    assert ratios[0] < 0.6 < 1.0 < ratios[1]


def test_report_words_follow_the_margin_trait():
    rng = np.random.default_rng(7)
    order = ["circumscribed", "indistinct", "angular", "microlobulated", "spiculated"]
    traits = rng.standard_normal(400)
    ranks = []
    for value in traits:
        text = " ".join(report_text(rng, {**US_ZERO, "us_margin": float(value)}, 18.0, "R"))
        ranks.append(next(i for i, word in enumerate(order) if f"{word} margins" in text))
    assert spearmanr(traits, ranks).statistic > 0.8
