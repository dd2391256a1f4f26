"""Cox partial likelihood loss against R survival (tests/reference/cox_loglik.R, its values
committed in cox_loglik.json and checked live in the e2e tier), lifelines, a hand computation,
autograd's gradcheck and permutations of the input."""

from __future__ import annotations

import numpy as np
import pytest
import r_reference
import torch
from r_reference import cox_inputs

from mrrp_pacs.model.losses import cox_partial_log_likelihood

R_CASES = r_reference.committed("cox_loglik")


def loglik(risk, time, event, ties, weight=None) -> float:
    return -float(cox_partial_log_likelihood(
        torch.as_tensor(risk, dtype=torch.float64), torch.as_tensor(time),
        torch.as_tensor(event), ties=ties, reduction="sum",
        weight=None if weight is None else torch.as_tensor(weight, dtype=torch.float64)))


@pytest.fixture(scope="module")
def tied() -> dict[str, np.ndarray]:
    return r_reference.cox_tied()


@pytest.mark.needs_tool("Rscript")
@pytest.mark.parametrize("case", R_CASES.values(), ids=R_CASES.keys())
def test_r_still_gives_the_committed_logliks(case, tmp_path):
    """R survival, run now on each committed case, gives the committed values (a failure here
    with the other tests passing means R moved, not our loss)."""
    live = r_reference.run_r("cox_loglik", case.inputs, tmp_path)
    assert r_reference.flat(live) == pytest.approx(r_reference.flat(case.outputs), rel=1e-12,
                                                   abs=0)


def test_field_note_ties_match_r_and_the_hand_formula():
    case = r_reference.field_note()
    time, event, x, beta = case["time"], case["event"], case["x"], case["beta"]
    eta = x[:, 0] * beta[0]
    hand = (eta[0] - np.log(np.exp(eta).sum())) + (eta[2] - np.log(np.exp(eta[2:]).sum()))
    reference = R_CASES["field_note"].given(cox_inputs(time, event, x, beta))
    for ties in ("efron", "breslow"):
        assert reference[ties] == pytest.approx(hand, abs=1e-12)
        for order in ([0, 1, 2, 3], [1, 0, 2, 3], [3, 2, 1, 0], [2, 1, 3, 0]):
            assert loglik(eta[order], time[order], event[order], ties) == pytest.approx(
                hand, abs=1e-12), order


@pytest.mark.parametrize("weighted", [False, True])
def test_tied_times_match_r_efron_and_breslow(tied, weighted):
    weight = tied["weight"] if weighted else None
    reference = R_CASES["tied_weighted" if weighted else "tied"].given(
        cox_inputs(tied["time"], tied["event"], tied["x"], tied["beta"], weight))
    eta = tied["x"] @ tied["beta"]
    efron = loglik(eta, tied["time"], tied["event"], "efron", weight)
    breslow = loglik(eta, tied["time"], tied["event"], "breslow", weight)
    assert efron == pytest.approx(reference["efron"], rel=1e-12, abs=1e-10)
    assert breslow == pytest.approx(reference["breslow"], rel=1e-12, abs=1e-10)
    assert abs(efron - breslow) > 0.5  # the fixture's ties matter


def test_risks_of_plus_minus_50_match_r_without_overflow(tied):
    x = r_reference.extreme_risks()
    reference = R_CASES["extreme_risks"].given(
        cox_inputs(tied["time"], tied["event"], x, [1.0]))
    for ties in ("efron", "breslow"):
        assert loglik(x[:, 0], tied["time"], tied["event"], ties) == pytest.approx(
            reference[ties], rel=1e-12)
        # float32: finite, gradients finite, close to float64
        risk = torch.tensor(x[:, 0], dtype=torch.float32, requires_grad=True)
        loss = cox_partial_log_likelihood(risk, torch.tensor(tied["time"]),
                                          torch.tensor(tied["event"]), ties=ties,
                                          reduction="sum")
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(risk.grad).all()
        assert -float(loss.detach()) == pytest.approx(reference[ties], rel=1e-5)


def test_gbsg2_matches_r_and_lifelines():
    frame, covariates, fitter = r_reference.gbsg2()
    time, event = frame["time"].to_numpy(), frame["event"].to_numpy()
    x = frame[covariates].to_numpy()
    # R's values are at the coefficients lifelines found when they were made (committed with
    # them, so that a lifelines release moving its optimum by 1e-9 moves no reference)
    case = R_CASES["gbsg2"]
    reference = case.given(cox_inputs(time, event, x, case.inputs["beta"]))
    committed_eta = x @ case.inputs["beta"]
    assert loglik(committed_eta, time, event.astype(bool), "efron") == pytest.approx(
        reference["efron"], rel=1e-12)
    assert loglik(committed_eta, time, event.astype(bool), "breslow") == pytest.approx(
        reference["breslow"], rel=1e-12)
    beta = fitter.params_[covariates].to_numpy()
    efron = loglik(x @ beta, time, event.astype(bool), "efron")
    breslow = loglik(x @ beta, time, event.astype(bool), "breslow")
    assert efron == pytest.approx(fitter.log_likelihood_, rel=1e-9)  # lifelines is Efron
    assert efron != pytest.approx(breslow, rel=1e-6)  # GBSG2 has tied event times


def test_input_order_changes_neither_loss_nor_gradient(tied):
    rng = np.random.default_rng(0)
    time = torch.tensor(tied["time"])
    event = torch.tensor(tied["event"])
    weight = torch.tensor(tied["weight"])
    base = torch.tensor(tied["x"] @ tied["beta"])
    for ties in ("efron", "breslow"):
        risk = base.clone().requires_grad_(True)
        loss = cox_partial_log_likelihood(risk, time, event, ties=ties, weight=weight)
        (gradient,) = torch.autograd.grad(loss, risk)
        for _ in range(5):
            order = torch.as_tensor(rng.permutation(len(base)))
            shuffled = base[order].clone().requires_grad_(True)
            other = cox_partial_log_likelihood(shuffled, time[order], event[order], ties=ties,
                                               weight=weight[order])
            (other_gradient,) = torch.autograd.grad(other, shuffled)
            assert float(other.detach()) == pytest.approx(float(loss.detach()), abs=1e-12)
            torch.testing.assert_close(other_gradient, gradient[order], atol=1e-12, rtol=0)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_gradcheck_float64(tied, ties):
    time = torch.tensor(tied["time"][:25])
    event = torch.tensor(tied["event"][:25])
    weight = torch.tensor(tied["weight"][:25])
    risk = torch.tensor(tied["x"][:25] @ tied["beta"], requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda r: cox_partial_log_likelihood(r, time, event, ties=ties, weight=weight),
        (risk,), eps=1e-6, atol=1e-7)


def test_no_event_gives_zero_loss_and_zero_gradient():
    risk = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    loss = cox_partial_log_likelihood(risk, torch.tensor([1.0, 2.0, 3.0]),
                                      torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(risk.grad, torch.zeros(3))


def test_mean_is_sum_over_weighted_events_and_unit_weights_change_nothing(tied):
    risk = torch.tensor(tied["x"] @ tied["beta"])
    time, event = torch.tensor(tied["time"]), torch.tensor(tied["event"])
    weight = torch.tensor(tied["weight"])
    total = cox_partial_log_likelihood(risk, time, event, reduction="sum", weight=weight)
    mean = cox_partial_log_likelihood(risk, time, event, reduction="mean", weight=weight)
    assert float(mean) == pytest.approx(float(total) / float(weight[event].sum()), rel=1e-12)
    plain = cox_partial_log_likelihood(risk, time, event)
    ones = cox_partial_log_likelihood(risk, time, event, weight=torch.ones(len(risk),
                                                                           dtype=risk.dtype))
    assert float(plain) == pytest.approx(float(ones), rel=1e-14)
    assert float(plain) == pytest.approx(-loglik(risk.numpy(), tied["time"], tied["event"],
                                                 "efron") / int(event.sum()), rel=1e-12)


def test_efron_equals_breslow_without_tied_events():
    rng = np.random.default_rng(1)
    time = rng.permutation(40) + 10.0
    event = rng.random(40) < 0.5
    time[:4], event[:4] = 5.0, [True, False, False, False]  # censorings tied to one event only
    risk = rng.normal(size=40)
    assert loglik(risk, time, event, "efron") == pytest.approx(
        loglik(risk, time, event, "breslow"), abs=1e-12)


def test_bad_inputs_are_refused_with_the_input_named():
    risk, time = torch.zeros(3), torch.tensor([1.0, 2.0, 3.0])
    event = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="ties"):
        cox_partial_log_likelihood(risk, time, event, ties="exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="risk"):
        cox_partial_log_likelihood(risk[:, None], time, event)
    with pytest.raises(ValueError, match="time must have shape"):
        cox_partial_log_likelihood(risk, time[:2], event)
    with pytest.raises(ValueError, match="event must be bool or 0/1"):
        cox_partial_log_likelihood(risk, time, torch.tensor([2, 0, 1]))
    with pytest.raises(ValueError, match="weight must be finite and > 0"):
        cox_partial_log_likelihood(risk, time, event, weight=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="risk has NaN"):
        cox_partial_log_likelihood(torch.tensor([0.0, float("nan"), 1.0]), time, event)
