"""td-AUC, Brier and integrated Brier scores against R riskRegression::Score and pec::pec
(tests/reference/ipcw_scores.R, its values committed in ipcw_scores.json and checked live in
the e2e tier), on 300 patients from a known Cox-type generator with uniform censoring: once
with continuous times, once rounded up to whole months so that events share their times with
censorings (where the weight of an event, 1/G(T_i-) or 1/G(T_i), matters)."""

from __future__ import annotations

import numpy as np
import pytest
import r_reference
from sksurv.metrics import brier_score, cumulative_dynamic_auc, integrated_brier_score
from sksurv.util import Surv

from mrrp_pacs.model import evaluate as ev

CASES = ("continuous", "tied")


def ours(inputs: dict) -> dict:
    """Our metrics on a case, with the censoring model fitted on the same patients (as Score's
    and pec's Kaplan-Meier censoring model is) and the predicted survival of the Cox model whose
    linear predictor is the risk (Breslow baseline on the same patients, as the R script)."""
    data = inputs["data"]
    time, event, risk = data["time"], data["status"].astype(bool), data["risk"]
    horizons, grid = list(inputs["horizons"]), inputs["grid"]
    baseline = ev.breslow_baseline(risk, time, event)
    on_grid = ev.survival_probability(risk, baseline, grid)
    auc = ev.td_auc(time, event, risk, time, event, horizons)
    brier = ev.brier(time, event, ev.survival_probability(risk, baseline, horizons), time, event,
                     horizons)
    keys = [ev.horizon_key(t) for t in horizons]
    assert auc.reasons == brier.reasons == {}
    return {
        "auc": np.array([auc.values[k] for k in keys], float),
        "brier": np.array([brier.values[k] for k in keys], float),
        "brier_grid": np.array([ev.brier(time, event, on_grid[:, [i]], time, event, [t])
                                .values[ev.horizon_key(t)] for i, t in enumerate(grid)], float),
        "ibs": ev.integrated_brier(time, event, on_grid, time, event, grid),
        "on_grid": on_grid,
    }


@pytest.fixture(scope="module", params=CASES)
def case(request) -> tuple[str, dict, dict]:
    """(name, inputs, R's committed outputs), the inputs checked to be the committed ones."""
    inputs = r_reference.CASES["ipcw_scores"][request.param]()
    return request.param, inputs, r_reference.case("ipcw_scores", request.param).given(inputs)


@pytest.mark.needs_tool("Rscript", "riskRegression", "pec")
def test_r_still_gives_the_committed_ipcw_scores(tmp_path):
    """riskRegression and pec, run now on the committed cases, give the committed values (a
    failure here with the other tests passing means R moved, not our metrics)."""
    for name in CASES:
        committed = r_reference.case("ipcw_scores", name)
        (tmp_path / name).mkdir()
        live = r_reference.run_r("ipcw_scores", committed.inputs, tmp_path / name)
        assert r_reference.flat(live) == pytest.approx(r_reference.flat(committed.outputs),
                                                       rel=1e-12, abs=0), name


def test_the_cases_are_what_they_claim():
    continuous = r_reference.ipcw_cohort(tied=False)["data"]
    tied = r_reference.ipcw_cohort(tied=True)["data"]
    for data in (continuous, tied):
        assert len(data["time"]) == 300 and 150 < data["status"].sum() < 250
    events = continuous["status"] == 1
    assert not np.isin(continuous["time"][events], continuous["time"][~events]).any()
    events = tied["status"] == 1
    assert np.isin(tied["time"][events], tied["time"][~events]).sum() > 50


def test_td_auc_and_brier_at_the_horizons_are_riskregression_score(case):
    _, inputs, r = case
    mine = ours(inputs)
    np.testing.assert_allclose(mine["auc"], r["horizons"]["auc"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(mine["brier"], r["horizons"]["brier"], rtol=0, atol=1e-12)
    assert np.all(mine["auc"] > 0.8) and np.all(mine["brier"] < 0.2)


def test_brier_on_the_grid_is_score_and_pec(case):
    _, inputs, r = case
    mine = ours(inputs)["brier_grid"]
    np.testing.assert_allclose(mine, r["grid"]["brier_score"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(mine, r["grid"]["brier_pec"], rtol=0, atol=1e-12)


def test_integrated_brier_is_the_trapezoid_of_r_brier_and_differs_from_pec_by_the_rule(case):
    """Ours integrates the Brier curve on the grid with the trapezoid rule; pec::ibs and
    Score's "ibs" with the left-point rule (Score from 0 with a Brier score of 0 there). On a
    uniform grid of step h over a span L the difference is exactly (B_last - B_first) h / 2L."""
    _, inputs, r = case
    grid, brier = inputs["grid"], r["grid"]["brier_score"]
    step, span = grid[1] - grid[0], grid[-1] - grid[0]
    assert np.allclose(np.diff(grid), step)
    ibs = ours(inputs)["ibs"]
    assert ibs == pytest.approx(r["scalars"]["ibs_trapezoid"], rel=0, abs=1e-12)
    assert ibs - r["scalars"]["ibs_pec"] == pytest.approx(
        (brier[-1] - brier[0]) * step / (2 * span), rel=0, abs=1e-12)
    assert r["scalars"]["ibs_score"] == pytest.approx(
        r["scalars"]["ibs_pec"] * span / grid[-1], rel=0, abs=1e-12)
    assert abs(ibs - r["scalars"]["ibs_pec"]) > 1e-4  # the rules do differ here


def test_scikit_survival_agrees_without_ties_and_weighs_tied_events_after_censoring(case):
    """scikit-survival weighs an event by 1/G(T_i), after the censorings at T_i: the same as
    R and ours when no event shares its time with a censoring, different when one does."""
    name, inputs, r = case
    data = inputs["data"]
    time, event, risk = data["time"], data["status"].astype(bool), data["risk"]
    y = Surv.from_arrays(event, time)
    horizons, grid = inputs["horizons"], inputs["grid"]
    baseline = ev.breslow_baseline(risk, time, event)
    theirs = {
        "auc": cumulative_dynamic_auc(y, y, risk, horizons)[0],
        "brier": brier_score(y, y, ev.survival_probability(risk, baseline, horizons),
                             horizons)[1],
        "ibs": integrated_brier_score(y, y, ev.survival_probability(risk, baseline, grid), grid),
    }
    reference = {"auc": r["horizons"]["auc"], "brier": r["horizons"]["brier"],
                 "ibs": r["scalars"]["ibs_trapezoid"]}
    for key, value in theirs.items():
        gap = np.max(np.abs(np.asarray(value) - reference[key]))
        if name == "continuous":
            assert gap < 1e-12, key
        else:
            assert gap > 1e-5, key


def test_censoring_kaplan_meier_by_hand():
    """Events before censorings at one time; G(t) right-continuous, G(t-) its left limit."""
    censoring = ev.CensoringKM(np.array([1.0, 1.0, 2.0, 3.0, 3.0, 4.0]),
                               np.array([True, False, True, False, True, False]))
    # t=1: 6 at risk, 1 event first, so 5 at risk of censoring, 1 censored: 4/5
    # t=3: 3 at risk, 1 event, 2 at risk of censoring, 1 censored: 4/5 * 1/2; t=4: 0
    np.testing.assert_allclose(censoring.at([0.5, 1.0, 2.5, 3.0, 4.0, 9.0]),
                               [1.0, 0.8, 0.8, 0.4, 0.0, 0.0])
    np.testing.assert_allclose(censoring.before([1.0, 3.0, 4.0, 4.5]), [1.0, 0.8, 0.4, 0.0])
    with pytest.raises(ev.MetricUndefined, match="censoring survival is 0"):
        censoring.inverse_before(np.array([4.5]))
