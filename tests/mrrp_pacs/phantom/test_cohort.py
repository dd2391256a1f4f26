import numpy as np
import pytest
from scipy.stats import spearmanr

from mrrp_pacs.phantom.cohort import (
    DEFAULT_SIGNAL,
    CohortParameters,
    harrell_c,
    log_hazard,
    make_cohort,
)


@pytest.fixture(scope="module")
def big():
    return make_cohort(CohortParameters(patients=5000, seed=11))


def test_clinical_marginals_are_realistic(big):
    clinical = big.clinical
    assert 46 <= np.median(clinical["age_years"]) <= 48
    grade = clinical["grade"]
    assert [round(float(np.mean(grade == g)), 2) for g in (1, 2, 3)] == pytest.approx(
        [0.15, 0.58, 0.27], abs=0.03)
    assert np.mean(clinical["positive_nodes"] > 0) == pytest.approx(0.58, abs=0.03)
    assert set(np.unique(clinical["her2_ihc"])) == {"0", "1+", "2+"}  # HER2 negative only
    assert 10 <= np.median(clinical["ki67_percent"]) <= 20
    assert np.all(clinical["er_percent"] >= 1)  # hormone receptor positive


def test_outcomes_follow_the_target(big):
    assert big.event.mean() == pytest.approx(0.16, abs=0.02)
    assert big.time_months.max() <= 174.0
    assert np.mean(big.split == "test") == pytest.approx(1 / 6, abs=0.01)
    # stratified: the event rate is the same in both splits
    test = big.split == "test"
    assert big.event[test].mean() == pytest.approx(big.event[~test].mean(), abs=0.01)
    assert 0.78 <= big.oracle_c_index <= 0.9


def test_most_of_the_signal_is_in_the_slide(big):
    def variance_with(modality: str) -> float:
        signal = {k: (v if k == modality else 0.0) for k, v in DEFAULT_SIGNAL.items()}
        return float(np.var(log_hazard(big.traits, big.clinical, signal)))

    shares = {m: variance_with(m) for m in DEFAULT_SIGNAL}
    assert max(shares, key=shares.get) == "wsi"
    assert shares["wsi"] > sum(v for k, v in shares.items() if k != "wsi")


def test_a_modality_without_signal_does_not_predict(big):
    flat = make_cohort(CohortParameters(patients=3000, seed=12,
                                        signal={**DEFAULT_SIGNAL, "us": 0.0}))
    rho = spearmanr(flat.traits["us_margin"], flat.log_hazard).statistic
    assert abs(rho) < 0.05


def test_same_seed_same_cohort_other_seed_differs():
    a, b = (make_cohort(CohortParameters(patients=50, seed=5)) for _ in range(2))
    assert np.array_equal(a.time_months, b.time_months) and a.ids == b.ids
    c = make_cohort(CohortParameters(patients=50, seed=6))
    assert not np.array_equal(a.time_months, c.time_months)


def test_harrell_c_sign_convention():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([True, True, True, False])
    assert harrell_c(time, event, np.array([4.0, 3.0, 2.0, 1.0])) == 1.0  # risk: higher = worse
    assert harrell_c(time, event, np.array([1.0, 2.0, 3.0, 4.0])) == 0.0


def test_event_and_test_fractions_are_parameters():
    """A benchmark cohort asks for more events and a larger test split; the images' inputs
    (traits, clinical values, missingness) stay those of the default cohort."""
    default = make_cohort(CohortParameters(patients=4000, seed=13))
    powered = make_cohort(CohortParameters(patients=4000, seed=13, event_fraction=0.4,
                                           test_fraction=1 / 3))
    assert powered.event.mean() == pytest.approx(0.4, abs=0.03)
    assert default.event.mean() == pytest.approx(0.16, abs=0.02)
    test = powered.split == "test"
    assert test.mean() == pytest.approx(1 / 3, abs=0.01)
    assert powered.event[test].mean() == pytest.approx(powered.event[~test].mean(), abs=0.01)
    for name in default.traits:
        assert np.array_equal(default.traits[name], powered.traits[name])
    for name in default.clinical:
        assert np.array_equal(default.clinical[name], powered.clinical[name])
    assert np.array_equal(default.has_wsi, powered.has_wsi)
    assert np.array_equal(default.log_hazard, powered.log_hazard)
    assert powered.weibull_scale < default.weibull_scale  # more events: earlier recurrences


@pytest.mark.parametrize("fields", [{"event_fraction": 0.0}, {"event_fraction": 1.0},
                                    {"test_fraction": 1.0}, {"test_fraction": -0.1}])
def test_impossible_fractions_are_refused(fields):
    with pytest.raises(ValueError, match="fraction"):
        CohortParameters(patients=10, seed=1, **fields)
