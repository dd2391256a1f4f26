"""Survival metrics against R survival (tests/reference/survival_metrics.R, its values committed
in survival_metrics.json and checked live in the e2e tier), lifelines and scikit-survival, and
the metrics.json summary on clean and degenerate test sets."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import r_reference
from lifelines import CoxPHFitter
from lifelines.utils import concordance_index
from sksurv.metrics import (
    brier_score,
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.nonparametric import kaplan_meier_estimator
from sksurv.util import Surv

from mrrp_pacs.model import evaluate as ev

METRICS_KEYS = {"n", "events", "cutoff", "c_index", "c_index_ci95", "c_index_uno", "td_auc",
                "brier", "brier_null", "ibs", "logrank_p", "hazard_ratio", "hazard_ratio_ci95",
                "null_reasons"}


def cohort(n: int, seed: int, follow_up=(24.0, 174.0), tied: bool = True
           ) -> dict[str, np.ndarray]:
    """Exponential times with log hazard = risk (+ noise the model does not see), uniform
    censoring; times rounded to 0.1 month, so some tie (``tied=False``: not rounded)."""
    rng = np.random.default_rng(seed)
    x = np.column_stack([rng.normal(size=n), rng.integers(0, 2, n).astype(float)])
    true_risk = x @ np.array([0.7, 0.5])
    latent = rng.exponential(120.0 * np.exp(-true_risk))
    censor = rng.uniform(*follow_up, n)
    time = np.minimum(latent, censor)
    if tied:
        time = np.maximum(np.round(time, 1), 0.1)
    return {"time": time, "event": latent <= censor, "x": x,
            "risk": true_risk + rng.normal(0, 0.4, n)}


@pytest.fixture(scope="module")
def tied() -> pd.DataFrame:
    return r_reference.metrics_tied()


@pytest.fixture(scope="module")
def r_values(tied) -> dict:
    """What R survival gave on ``tied`` (committed): scalars and basehaz."""
    return r_reference.case("survival_metrics", "tied").given(r_reference.metrics_inputs(tied))


@pytest.mark.needs_tool("Rscript")
def test_r_still_gives_the_committed_metrics(tmp_path):
    """R survival, run now on the committed case, gives the committed values (a failure here
    with the other tests passing means R moved, not our metrics)."""
    case = r_reference.case("survival_metrics", "tied")
    live = r_reference.run_r("survival_metrics", case.inputs, tmp_path)
    assert r_reference.flat(live) == pytest.approx(r_reference.flat(case.outputs), rel=1e-12,
                                                   abs=0)


def arrays(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (frame["time"].to_numpy(float), frame["status"].to_numpy(bool),
            frame["risk"].to_numpy(float))


def test_harrell_c_matches_r_scikit_survival_and_lifelines(tied, r_values):
    time, event, risk = arrays(tied)
    value = ev.harrell_c(time, event, risk)
    assert value == pytest.approx(r_values["scalars"]["harrell_c"], abs=1e-12)
    assert value == pytest.approx(concordance_index_censored(event, time, risk)[0], abs=1e-12)
    # lifelines expects predicted survival time (higher = better): pass -risk
    assert value == pytest.approx(concordance_index(time, -risk, event), abs=1e-12)
    assert 1 - value == pytest.approx(ev.harrell_c(time, event, -risk), abs=1e-12)
    assert 0.6 < value < 0.9


def test_logrank_matches_r_survdiff(tied, r_values):
    time, event, _ = arrays(tied)
    p = ev.logrank(time, event, tied["group"].to_numpy())
    assert p == pytest.approx(r_values["scalars"]["logrank_p"], rel=1e-9)
    assert p < 0.01


def test_hazard_ratio_matches_r_coxph(tied, r_values):
    time, event, _ = arrays(tied)
    ratio = ev.hazard_ratio(time, event, tied["group"].to_numpy())
    reference = r_values["scalars"]
    # lifelines and R stop Newton at their own tolerances: 8e-7 apart here
    assert ratio.ratio == pytest.approx(reference["hazard_ratio"], rel=1e-5)
    assert ratio.ci_low == pytest.approx(reference["hr_low"], rel=1e-5)
    assert ratio.ci_high == pytest.approx(reference["hr_high"], rel=1e-5)
    assert ratio.ci_low < ratio.ratio < ratio.ci_high and ratio.ratio > 1.5


def test_breslow_baseline_matches_r_basehaz(tied, r_values):
    time, event, risk = arrays(tied)
    baseline = ev.breslow_baseline(risk, time, event)
    reference = r_values["basehaz"]
    np.testing.assert_allclose(baseline.at(reference["time"]),
                               reference["hazard"], rtol=1e-12, atol=0)
    assert baseline.at([0.0])[0] == 0.0 and np.all(np.diff(baseline.cumulative_hazard) > 0)
    times, hazard = baseline  # unpacks like a tuple
    assert len(times) == len(np.unique(time[event])) == len(hazard)


def test_survival_probability_matches_lifelines_at_its_coefficients():
    data = cohort(150, seed=2)
    frame = pd.DataFrame({"x1": data["x"][:, 0], "x2": data["x"][:, 1], "time": data["time"],
                          "event": data["event"]})
    fitter = CoxPHFitter().fit(frame, duration_col="time", event_col="event")
    risk = data["x"] @ fitter.params_[["x1", "x2"]].to_numpy()
    # times lifelines knows (it interpolates linearly between them, the Breslow step does not)
    times = list(np.unique(data["time"])[[3, 40, 80, 120]])
    ours = ev.survival_probability(risk, ev.breslow_baseline(risk, data["time"], data["event"]),
                                   times)
    theirs = fitter.predict_survival_function(frame[["x1", "x2"]], times=times).to_numpy().T
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)
    assert ours.shape == (150, 4) and np.all(np.diff(ours, axis=1) <= 0)


def test_survival_probability_stays_in_range_for_extreme_risks():
    baseline = ev.BaselineHazard(np.array([10.0, 20.0]), np.array([0.1, 0.3]))
    survival = ev.survival_probability(np.array([-800.0, 0.0, 800.0]), baseline, [5.0, 15.0])
    np.testing.assert_allclose(survival, [[1, 1], [1, np.exp(-0.1)], [1, 0]])


@pytest.fixture(scope="module")
def split():
    train, test = cohort(500, seed=11, follow_up=(24.0, 200.0)), cohort(150, seed=12)
    return train, test


@pytest.fixture(scope="module")
def untied_split():
    """As ``split`` without rounding: no test event shares its time with a training
    censoring, where scikit-survival's IPCW weights (1/G(T_i)) are ours (1/G(T_i-))."""
    train = cohort(500, seed=11, follow_up=(24.0, 200.0), tied=False)
    test = cohort(150, seed=12, tied=False)
    assert not np.isin(test["time"][test["event"]], train["time"][~train["event"]]).any()
    return train, test


def test_uno_c_is_scikit_survival(split):
    train, test = split
    y_train = Surv.from_arrays(train["event"], train["time"])
    y_test = Surv.from_arrays(test["event"], test["time"])
    assert test["time"].max() < train["time"].max()  # no administrative censoring needed
    uno = ev.uno_c(test["time"], test["event"], test["risk"], train["time"], train["event"], 84)
    assert uno == pytest.approx(concordance_index_ipcw(y_train, y_test, test["risk"], 84)[0],
                                abs=1e-12)


def test_td_auc_is_scikit_survival_where_no_event_ties_a_censoring(untied_split):
    train, test = untied_split
    y_train = Surv.from_arrays(train["event"], train["time"])
    y_test = Surv.from_arrays(test["event"], test["time"])
    assert test["time"].max() < train["time"].max()  # no administrative censoring needed
    auc = ev.td_auc(test["time"], test["event"], test["risk"], train["time"], train["event"])
    expected = cumulative_dynamic_auc(y_train, y_test, test["risk"], [36, 60, 84])[0]
    assert list(auc.values) == ["36", "60", "84"] and auc.reasons == {}
    np.testing.assert_allclose([auc.values[k] for k in ("36", "60", "84")], expected,
                               atol=1e-12)
    assert all(0.6 < v < 0.95 for v in expected)


def test_metrics_past_follow_up_are_none_with_a_reason(split):
    train, test = split
    short = test["time"] < 70
    auc = ev.td_auc(test["time"][short], test["event"][short], test["risk"][short],
                    train["time"], train["event"], [36, 84])
    assert auc.values["36"] is not None and auc.values["84"] is None
    assert "outside the test follow-up" in auc.reasons["84"]
    beyond = ev.td_auc(test["time"], test["event"], test["risk"], train["time"],
                       train["event"], [train["time"].max() + 1])
    assert "end of training follow-up" in next(iter(beyond.reasons.values()))
    with pytest.raises(ev.MetricUndefined, match="past the training follow-up"):
        ev.uno_c(test["time"], test["event"], test["risk"], train["time"], train["event"],
                 train["time"].max() + 1)


def test_brier_null_brier_and_ibs_are_scikit_survival_where_no_event_ties_a_censoring(
        untied_split):
    train, test = untied_split
    y_train = Surv.from_arrays(train["event"], train["time"])
    y_test = Surv.from_arrays(test["event"], test["time"])
    times = [36.0, 60.0, 84.0]
    baseline = ev.breslow_baseline(train["risk"], train["time"], train["event"])
    survival = ev.survival_probability(test["risk"], baseline, times)
    ours = ev.brier(test["time"], test["event"], survival, train["time"], train["event"], times)
    expected = brier_score(y_train, y_test, survival, times)[1]
    np.testing.assert_allclose([ours.values[k] for k in ("36", "60", "84")], expected,
                               atol=1e-12)
    km_time, km_survival = kaplan_meier_estimator(train["event"], train["time"])
    km_at = km_survival[np.searchsorted(km_time, times, side="right") - 1]
    null = ev.brier_null(test["time"], test["event"], train["time"], train["event"], times)
    np.testing.assert_allclose(
        [null.values[k] for k in ("36", "60", "84")],
        brier_score(y_train, y_test, np.tile(km_at, (len(test["time"]), 1)), times)[1],
        atol=1e-12)
    assert all(ours.values[k] < null.values[k] for k in ("36", "60", "84"))  # model helps
    grid = np.arange(1.0, 85.0)
    on_grid = ev.survival_probability(test["risk"], baseline, grid)
    assert ev.integrated_brier(test["time"], test["event"], on_grid, train["time"],
                               train["event"], grid) == pytest.approx(
        integrated_brier_score(y_train, y_test, on_grid, grid), abs=1e-12)


def test_bootstrap_ci_covers_the_estimate_and_is_reproducible(split):
    _, test = split
    args = (test["time"], test["event"], test["risk"])
    estimate = ev.harrell_c(*args)
    low, high = ev.bootstrap_ci(ev.harrell_c, *args, seed=3)
    assert low < estimate < high and 0.03 < high - low < 0.3
    assert ev.bootstrap_ci(ev.harrell_c, *args, seed=3) == (low, high)
    assert ev.bootstrap_ci(ev.harrell_c, *args, seed=4) != (low, high)
    narrow = ev.bootstrap_ci(ev.harrell_c, *args, seed=3, level=0.5)
    assert low < narrow[0] < narrow[1] < high


def test_risk_groups_cutoffs_and_percentiles_by_hand():
    reference = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert ev.risk_cutoffs(reference).tolist() == [2.0]
    assert ev.risk_cutoffs(reference, (0.75, 0.25)).tolist() == [1.0, 3.0]
    assert ev.risk_groups(np.array([1.9, 2.0, 2.1]), 2.0).tolist() == [0, 0, 1]
    assert ev.risk_groups(np.array([0.5, 1.0, 2.0, 3.5]), [3.0, 1.0]).tolist() == [0, 0, 1, 2]
    assert ev.percentile_in(reference, 2.0) == 60.0
    assert ev.percentile_in(reference, -1.0) == 0.0
    assert ev.percentile_in(reference, np.array([4.0, 2.5])).tolist() == [100.0, 60.0]


def test_evaluate_predictions_has_the_metrics_json_keys_and_sane_values(split):
    train, test = split
    metrics = ev.evaluate_predictions(test["time"], test["event"], test["risk"], train["time"],
                                      train["event"], train["risk"], seed=1)
    assert set(metrics) == METRICS_KEYS
    json.dumps(metrics, allow_nan=False)
    assert metrics["n"] == 150 and metrics["events"] == int(test["event"].sum())
    assert metrics["cutoff"] == pytest.approx(np.median(train["risk"]))
    assert metrics["c_index"] == pytest.approx(ev.harrell_c(test["time"], test["event"],
                                                            test["risk"]))
    low, high = metrics["c_index_ci95"]
    assert low < metrics["c_index"] < high
    assert set(metrics["td_auc"]) == set(metrics["brier"]) == {"36", "60", "84"}
    assert metrics["ibs"] < 0.25 and metrics["logrank_p"] < 0.01
    assert metrics["hazard_ratio_ci95"][0] > 1
    assert metrics["null_reasons"] == {}


def test_evaluate_predictions_on_degenerate_test_sets_gives_nulls_not_crashes(split):
    train, test = split
    short = test["time"] < 50  # no horizon of 60 or 84 months is reachable
    metrics = ev.evaluate_predictions(test["time"][short], test["event"][short],
                                      test["risk"][short], train["time"], train["event"],
                                      train["risk"], n_resamples=200)
    assert metrics["td_auc"]["84"] is None and metrics["brier"]["60"] is None
    assert metrics["td_auc"]["36"] is not None and metrics["c_index"] is not None
    assert "outside the test follow-up" in metrics["null_reasons"]["td_auc.84"]
    assert "ibs" not in metrics["null_reasons"]  # its grid stops at the test follow-up

    censored = ~test["event"]
    none = ev.evaluate_predictions(test["time"][censored], test["event"][censored],
                                   test["risk"][censored], train["time"], train["event"],
                                   train["risk"], n_resamples=50)
    json.dumps(none, allow_nan=False)
    assert none["events"] == 0
    for key in ("c_index", "c_index_ci95", "c_index_uno", "logrank_p", "hazard_ratio"):
        assert none[key] is None and key in none["null_reasons"], key
    assert all(v is None for v in none["td_auc"].values())
    # no Brier score on a test set without events: null, said why
    assert none["brier"]["36"] is None
    assert "no event in the test set" in none["null_reasons"]["brier.36"]

    tiny = ev.evaluate_predictions(np.array([5.0, 40.0]), np.array([True, False]),
                                   np.array([1.0, -1.0]), train["time"], train["event"],
                                   train["risk"], n_resamples=50)
    assert tiny["n"] == 2 and tiny["c_index"] == 1.0 and tiny["td_auc"]["84"] is None

    no_training_event = ev.evaluate_predictions(
        test["time"], test["event"], test["risk"], train["time"],
        np.zeros(len(train["time"]), dtype=bool), train["risk"], n_resamples=50)
    assert no_training_event["brier"] == {"36": None, "60": None, "84": None}
    assert "no event in the training set" in no_training_event["null_reasons"]["ibs"]
    assert no_training_event["c_index"] == ev.harrell_c(test["time"], test["event"], test["risk"])


def test_test_follow_up_beyond_training_is_censored_at_its_end():
    train = cohort(300, seed=21, follow_up=(24.0, 100.0), tied=False)
    test = cohort(120, seed=22, follow_up=(24.0, 170.0), tied=False)
    assert test["time"].max() > train["time"].max()
    metrics = ev.evaluate_predictions(test["time"], test["event"], test["risk"], train["time"],
                                      train["event"], train["risk"], n_resamples=100)
    assert metrics["null_reasons"] == {}
    # administrative censoring at the end of training follow-up gives sksurv's own answer
    end = train["time"].max()
    capped = Surv.from_arrays(test["event"] & (test["time"] <= end), np.minimum(test["time"], end))
    expected = cumulative_dynamic_auc(Surv.from_arrays(train["event"], train["time"]), capped,
                                      test["risk"], [36, 60, 84])[0]
    np.testing.assert_allclose([metrics["td_auc"][k] for k in ("36", "60", "84")], expected,
                               atol=1e-12)


def test_inputs_are_validated_with_their_names():
    with pytest.raises(ValueError, match="time and event must be 1-D of one length"):
        ev.harrell_c(np.array([1.0, 2.0]), np.array([True]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="risk must be 1-D of length 2"):
        ev.harrell_c(np.array([1.0, 2.0]), np.array([True, False]), np.array([0.0]))
    with pytest.raises(ValueError, match="event must be bool or 0/1"):
        ev.logrank(np.array([1.0, 2.0]), np.array([2, 0]), np.array([0, 1]))
    with pytest.raises(ev.MetricUndefined, match="no comparable pair"):
        ev.harrell_c(np.array([1.0, 2.0]), np.array([False, False]), np.array([0.0, 1.0]))
