import numpy as np
import pytest
from scipy.stats import spearmanr

from mrrp_pacs.phantom.cohort import (
    CLINICAL_TERM_NAMES,
    DEFAULT_SIGNAL,
    TRAITS,
    CohortParameters,
    clinical_terms,
    harrell_c,
    hazard_coefficients,
    hazard_design,
    log_hazard,
    make_cohort,
    observed_traits,
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


def test_harrell_c_without_a_comparable_pair_is_nan():
    """The one event after every censored time: no pair to compare (``mrrp-pacs demo
    --patients 16`` crashed on such a test split)."""
    time = np.array([1.0, 2.0, 3.0])
    assert np.isnan(harrell_c(time, np.array([False, False, True]), np.array([1.0, 2.0, 3.0])))
    assert np.isnan(harrell_c(time, np.zeros(3, bool), np.array([1.0, 2.0, 3.0])))


def test_the_smallest_cohort_the_demo_accepts_is_drawn_for_many_seeds():
    for seed in range(40):
        cohort = make_cohort(CohortParameters(patients=16, seed=seed))
        assert len(cohort.ids) == 16


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


def test_the_log_hazard_is_its_design_times_its_coefficients(big):
    design, names = hazard_design(big.traits, big.clinical)
    assert names == [*TRAITS, *CLINICAL_TERM_NAMES, "nuclear_size*us_margin"]
    assert list(clinical_terms(big.clinical)) == list(CLINICAL_TERM_NAMES)
    signal = {"wsi": 0.8, "us": 0.5, "text": 0.3, "clinical": 0.7}
    assert np.allclose(log_hazard(big.traits, big.clinical, signal),
                       design @ hazard_coefficients(signal), rtol=0, atol=1e-12)
    # one patient written out by hand, as the hazard is documented (docs/phantom.md)
    i = 17
    t = {k: v[i] for k, v in big.traits.items()}
    c = {k: v[i] for k, v in big.clinical.items()}
    by_hand = (0.8 * (0.55 * t["nuclear_size"] + 0.45 * t["pleomorphism"]
                      + 0.35 * t["tumour_density"] - 0.55 * t["lymphocytes"]
                      - 0.20 * t["lymph_clustering"])
               + 0.5 * (0.55 * t["us_margin"] + 0.25 * t["us_orientation"]
                        + 0.30 * t["us_shadowing"] + 0.25 * t["us_heterogeneity"])
               + 0.3 * 0.45 * t["vascularity"]
               + 0.7 * (0.45 * (np.log1p(c["positive_nodes"]) - 0.75) / 0.75
                        + 0.30 * (np.log(c["tumour_size_mm"]) - np.log(20)) / 0.45
                        + 0.20 * (c["grade"] - 2.1) / 0.64
                        + 0.25 * (np.log(c["ki67_percent"]) - np.log(15)) / 0.55
                        - 0.15 * (c["age_years"] - 47) / 10)
               + np.sqrt(0.8 * 0.5) * 0.30 * t["nuclear_size"] * t["us_margin"])
    assert log_hazard(big.traits, big.clinical, signal)[i] == pytest.approx(by_hand, abs=1e-12)


def test_observed_traits_with_nothing_missing_are_the_traits(big):
    everyone = {m: np.ones(big.n, dtype=bool) for m in ("wsi", "us", "text")}
    seen = observed_traits(big.traits, everyone, {k: np.full(big.n, 9.0) for k in TRAITS})
    for name in TRAITS:
        assert np.array_equal(seen[name], big.traits[name])
    assert np.array_equal(log_hazard(seen, big.clinical, DEFAULT_SIGNAL), big.log_hazard)


def test_observed_traits_fill_only_the_missing_modality(big):
    present = big.present
    assert present["text"] is big.has_report  # vascularity lives in the report's words
    fill = {k: np.full(big.n, 9.0) for k in TRAITS}
    seen = observed_traits(big.traits, present, fill)
    for name, modality in TRAITS.items():
        has = present[modality]
        assert (~has).any() and has.any()
        assert np.array_equal(seen[name][has], big.traits[name][has])
        assert np.all(seen[name][~has] == 9.0)
    zero = observed_traits(big.traits, present)  # default: the population mean, 0
    assert np.all(zero["us_margin"][~big.has_us] == 0.0)


def test_observed_log_hazard_is_the_expected_log_hazard_over_the_missing_traits():
    """Ultrasound and report traits depend on nothing observed, so E[log hazard | observed]
    averages them out: the interaction of a present slide with a missing ultrasound included."""
    cohort = make_cohort(CohortParameters(patients=300, seed=21, missing_us=0.5,
                                          missing_report=0.5, missing_wsi=0.0))
    present = cohort.present
    expected = log_hazard(observed_traits(cohort.traits, present), cohort.clinical,
                          DEFAULT_SIGNAL)
    rng = np.random.default_rng(0)
    draws = 4000
    total = np.zeros(cohort.n)
    for _ in range(draws):
        redrawn = {name: np.where(present[modality], cohort.traits[name],
                                  rng.standard_normal(cohort.n))
                   for name, modality in TRAITS.items()}
        total += log_hazard(redrawn, cohort.clinical, DEFAULT_SIGNAL)
    missing = ~(present["us"] & present["text"])
    assert missing.sum() > 100
    assert np.allclose(total / draws, expected, atol=0.05, rtol=0)
    # the missing traits' contribution is not negligible: the true hazard differs from it
    assert np.abs(cohort.log_hazard - expected)[missing].mean() > 0.2
