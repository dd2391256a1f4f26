r"""Survival metrics of a risk model on a test set: one module, one sign convention.

Inputs are NumPy arrays of one patient per element: ``time`` (n,) follow-up in months, ``event``
(n,) bool (True = recurrence observed at ``time``, False = censored), ``risk`` (n,) the model's log
hazard, **higher = worse**. Predicted survival probabilities are P(event-free at t), higher =
better; each function says which of the two it takes.

Censoring weights (Uno's C, time-dependent AUC, Brier scores) come from the Kaplan–Meier
estimate :math:`\hat G` of the *training* set's censoring distribution, which ends at the last
training follow-up. An event at :math:`T_i` is weighted by :math:`1/\hat G(T_i-)`, the
probability of remaining uncensored *just before* it (a censoring at the same time comes after
the event), a patient still event-free at t by :math:`1/\hat G(t)`: the definitions of
Gerds & Schumacher (2006) and R ``riskRegression::Score`` (td-AUC, Brier), checked against it
to 1e-12 (tests/reference/ipcw_scores.R). Test follow-up beyond the end of training follow-up
is administratively censored there: it changes no pair or case/control status at a horizon
before that time and keeps the weights defined. A horizon at or past the end of follow-up (of
either set) has no value: the metric is None with the reason (:class:`MetricUndefined` from the
functions, ``null_reasons`` in :func:`evaluate_predictions`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter
from lifelines.statistics import multivariate_logrank_test
from sksurv.metrics import concordance_index_ipcw
from sksurv.nonparametric import SurvivalFunctionEstimator
from sksurv.util import Surv

from mrrp_pacs.errors import MetricUndefined

LOGGER = logging.getLogger(__name__)

HORIZONS_MONTHS: tuple[float, ...] = (36.0, 60.0, 84.0)
BOOTSTRAP_RESAMPLES = 2000
IBS_STEP_MONTHS = 1.0


@dataclass(frozen=True)
class HorizonMetric:
    """A metric at several horizons.

    Attributes
    ----------
    values
        Horizon in months written as in ``metrics.json`` (``"36"``) → value, or None where the
        metric is undefined at that horizon.
    reasons
        Horizon → why its value is None (only the undefined horizons).
    """

    values: dict[str, float | None]
    reasons: dict[str, str]


class HazardRatio(NamedTuple):
    """Hazard ratio of the higher vs the lower risk group, with its Wald 95 % interval."""

    ratio: float
    ci_low: float
    ci_high: float


class BaselineHazard(NamedTuple):
    """Breslow cumulative baseline hazard :math:`H_0(t)` (risk 0), a right-continuous step.

    A named tuple, so ``times, hazard = breslow_baseline(...)`` also works.

    Attributes
    ----------
    times_months
        (J,) distinct event times of the training set, ascending.
    cumulative_hazard
        (J,) :math:`H_0` just after each of those times; :math:`H_0 = 0` before the first.
    """

    times_months: np.ndarray
    cumulative_hazard: np.ndarray

    def at(self, times_months: np.ndarray | Sequence[float]) -> np.ndarray:
        """:math:`H_0(t)` at each of ``times_months`` (shape kept)."""
        t = np.asarray(times_months, dtype=float)
        index = np.searchsorted(self.times_months, t, side="right")
        return np.concatenate(([0.0], self.cumulative_hazard))[index]


def horizon_key(t_months: float) -> str:
    """The key of a horizon in ``metrics.json``: 36.0 → ``"36"``, 42.5 → ``"42.5"``."""
    return f"{t_months:g}"


# --- discrimination ---------------------------------------------------------------------


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's concordance index; ``risk`` higher = worse.

    A pair is comparable when the shorter follow-up ends in an event; a censoring at the same
    time as an event counts as the longer follow-up (R ``survival``'s convention), two events
    at the same time are not comparable. Concordant: the event has the higher risk; tied risks
    count one half. Same value as R ``concordance(Surv(time, event) ~ risk, reverse=TRUE)`` and
    scikit-survival's ``concordance_index_censored(event, time, risk)``.

    Parameters
    ----------
    time, event, risk
        (n,) months, bool, log hazard.

    Raises
    ------
    MetricUndefined
        No comparable pair (e.g. no event).
    """
    time, event = _survival(time, event)
    risk = _scores(risk, len(time), "risk")
    cases = np.flatnonzero(event)
    # (cases, n) pair matrix: only rows with an event can be the shorter member
    t_case, r_case = time[cases, None], risk[cases, None]
    comparable = (time[None, :] > t_case) | ((time[None, :] == t_case) & ~event[None, :])
    n_pairs = np.count_nonzero(comparable)
    if n_pairs == 0:
        raise MetricUndefined("no comparable pair (no event, or every event is last)")
    concordant = np.count_nonzero(comparable & (r_case > risk[None, :]))
    tied = np.count_nonzero(comparable & (r_case == risk[None, :]))
    return float((concordant + 0.5 * tied) / n_pairs)


def uno_c(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    train_time: np.ndarray,
    train_event: np.ndarray,
    tau_months: float = HORIZONS_MONTHS[-1],
) -> float:
    r"""Uno's IPCW concordance truncated at ``tau_months``; ``risk`` higher = worse.

    scikit-survival's ``concordance_index_ipcw``: only events before ``tau_months`` are the
    shorter member of a pair, and each is weighted by :math:`\hat G(T_i)^{-2}`, the inverse
    squared probability of remaining uncensored (training-set Kaplan–Meier). Truncation
    keeps the weights bounded; the default is the last horizon (84 months), so the value
    measures discrimination over the window the model is used for.

    Raises
    ------
    MetricUndefined
        ``tau_months`` past the training follow-up, or no event before it.
    """
    time, event = _survival(time, event)
    risk = _scores(risk, len(time), "risk")
    train_time, train_event = _survival(train_time, train_event, "train_")
    if tau_months > train_time.max():
        raise MetricUndefined(f"tau {tau_months:g} months is past the training follow-up "
                              f"({train_time.max():g} months): censoring weights undefined")
    time, event = _censor_at(time, event, train_time.max())
    if not (event & (time < tau_months)).any():
        raise MetricUndefined(f"no event before tau = {tau_months:g} months")
    return float(_sksurv(lambda: concordance_index_ipcw(
        Surv.from_arrays(train_event, train_time), Surv.from_arrays(event, time), risk,
        tau=tau_months)[0]))


def td_auc(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    train_time: np.ndarray,
    train_event: np.ndarray,
    times_months: Sequence[float] = HORIZONS_MONTHS,
) -> HorizonMetric:
    r"""Cumulative/dynamic time-dependent AUC at each horizon; ``risk`` higher = worse.

    Uno (2007) / Hung & Chiang (2010): cases are the patients with an event by t, each
    weighted by :math:`1/\hat G(T_i-)`; controls the patients still event-free after t (one
    common weight :math:`1/\hat G(t)`, which cancels). AUC = the weighted share of
    case-control pairs where the case has the higher risk, tied risks counting one half.
    Same value as R ``riskRegression::Score(..., metrics = "auc", cens.model = "km")``
    (checked to 1e-12, ties included) and, on data where no event shares its time with a
    censoring, as scikit-survival's ``cumulative_dynamic_auc`` (which weights by
    :math:`\hat G(T_i)`, after the censorings at that time). Each horizon is computed on its
    own, so one horizon past follow-up leaves the others.
    """
    time, event = _survival(time, event)
    risk = _scores(risk, len(time), "risk")
    train_time, train_event = _survival(train_time, train_event, "train_")
    censoring = CensoringKM(train_time, train_event)

    def one(t: float, time: np.ndarray, event: np.ndarray) -> float:
        cases = event & (time <= t)
        if not cases.any():
            raise MetricUndefined(f"no event by {t:g} months")
        controls = time > t
        if not controls.any():
            raise MetricUndefined(f"nobody followed past {t:g} months")
        weights = censoring.inverse_before(time[cases])
        control_risk = np.sort(risk[controls])
        below = np.searchsorted(control_risk, risk[cases], side="left")
        tied = np.searchsorted(control_risk, risk[cases], side="right") - below
        return float(np.sum(weights * (below + 0.5 * tied))
                     / (np.sum(weights) * len(control_risk)))

    return _per_horizon(one, time, event, train_time, times_months)


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray, np.ndarray], float],
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    *,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric(time, event, risk)``, resampling patients.

    Resamples where the metric is undefined (:class:`MetricUndefined`, e.g. no event drawn) are
    left out and counted in the log. Same ``seed`` → same interval.

    Returns
    -------
    (low, high)
        The (1 - level)/2 and (1 + level)/2 quantiles of the resampled values.

    Raises
    ------
    MetricUndefined
        The metric is undefined on every resample.
    """
    time, event = _survival(time, event)
    risk = _scores(risk, len(time), "risk")
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(time), size=(n_resamples, len(time)))
    values = []
    for index in indices:
        try:
            values.append(metric(time[index], event[index], risk[index]))
        except MetricUndefined:
            continue
    if not values:
        raise MetricUndefined(f"undefined on all {n_resamples} bootstrap resamples")
    if len(values) < n_resamples:
        LOGGER.info("bootstrap: metric undefined on %d of %d resamples, left out",
                    n_resamples - len(values), n_resamples)
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


# --- groups -------------------------------------------------------------------------------


def risk_cutoffs(reference_risk: np.ndarray, quantiles: Sequence[float] = (0.5,)) -> np.ndarray:
    """Risk cut-offs at ``quantiles`` of a reference (training) risk distribution.

    Returns
    -------
    ndarray
        (len(quantiles),) ascending; the default is the training median (two groups).
    """
    reference = _scores(reference_risk, None, "reference_risk")
    return np.sort(np.quantile(reference, np.asarray(quantiles, dtype=float)))


def risk_groups(risk: np.ndarray, cutoffs: float | Sequence[float] | np.ndarray) -> np.ndarray:
    """Risk group of each patient: 0 = lowest; k = above the k-th cut-off.

    A risk equal to a cut-off falls in the lower group. With one cut-off: 0 low, 1 high.

    Returns
    -------
    ndarray
        (n,) int.
    """
    risk = _scores(risk, None, "risk")
    edges = np.sort(np.atleast_1d(np.asarray(cutoffs, dtype=float)))
    return np.searchsorted(edges, risk, side="left").astype(int)


def percentile_in(reference_risk: np.ndarray, risk: float | np.ndarray) -> float | np.ndarray:
    """Percentage (0–100) of the reference risks that are ≤ ``risk``; higher = worse.

    Returns a float for a scalar ``risk``, else an array of its shape.
    """
    reference = np.sort(_scores(reference_risk, None, "reference_risk"))
    value = 100.0 * np.searchsorted(reference, np.asarray(risk, dtype=float),
                                    side="right") / len(reference)
    return float(value) if np.ndim(value) == 0 else value


def logrank(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> float:
    """Log-rank test p value across the groups (χ² with k − 1 degrees of freedom).

    lifelines' ``multivariate_logrank_test``, the same statistic as R ``survdiff``.

    Raises
    ------
    MetricUndefined
        Fewer than two groups present, or no event.
    """
    time, event = _survival(time, event)
    group = _groups(group, len(time))
    if len(np.unique(group)) < 2:
        raise MetricUndefined("only one risk group present")
    if not event.any():
        raise MetricUndefined("no event")
    return float(multivariate_logrank_test(time, group, event).p_value)


def hazard_ratio(time: np.ndarray, event: np.ndarray, group: np.ndarray) -> HazardRatio:
    r"""Hazard ratio of the highest vs the lowest group label, univariable Cox (Efron ties).

    lifelines ``CoxPHFitter`` on the indicator (patients of other groups left out); the
    interval is Wald's, :math:`\exp(\hat\beta \pm 1.96\,\mathrm{SE})`, as R ``coxph``.
    > 1 means the high-risk group recurs sooner.

    Raises
    ------
    MetricUndefined
        A group is empty or has no event (the estimate would be 0 or infinite).
    """
    time, event = _survival(time, event)
    group = _groups(group, len(time))
    labels = np.unique(group)
    if len(labels) < 2:
        raise MetricUndefined("only one risk group present")
    keep = (group == labels[0]) | (group == labels[-1])
    high = group[keep] == labels[-1]
    for name, members in (("high", high), ("low", ~high)):
        if not event[keep][members].any():
            raise MetricUndefined(f"no event in the {name}-risk group: hazard ratio not finite")
    frame = pd.DataFrame({"time": time[keep], "event": event[keep], "high": high.astype(float)})
    fitter = CoxPHFitter().fit(frame, duration_col="time", event_col="event")
    ratio = float(np.exp(fitter.params_["high"]))
    low, upper = np.exp(fitter.confidence_intervals_.loc["high"].to_numpy(dtype=float))
    return HazardRatio(ratio, float(low), float(upper))


# --- survival probabilities, calibration --------------------------------------------------


def breslow_baseline(
    risk_train: np.ndarray, time: np.ndarray, event: np.ndarray
) -> BaselineHazard:
    r"""Breslow estimate of the cumulative baseline hazard, for risk (log hazard) 0.

    :math:`H_0(t) = \sum_{t_j \le t} d_j / \sum_{k: T_k \ge t_j} e^{\eta_k}`, with the
    training risks :math:`\eta`. Same as R ``basehaz(coxph(..., ties="breslow"),
    centered=FALSE)`` at the same coefficients, and lifelines' baseline.
    """
    time, event = _survival(time, event)
    risk = _scores(risk_train, len(time), "risk_train")
    if not event.any():
        raise MetricUndefined("no event in the training set: baseline hazard undefined")
    order = np.argsort(time, kind="stable")
    time, event, risk = time[order], event[order], risk[order]
    # shifted so the risk-set sums cannot overflow; exp(-shift) puts the scale back
    shift = risk.max()
    at_risk_from = np.cumsum(np.exp(risk - shift)[::-1])[::-1]
    unique, first = np.unique(time, return_index=True)
    deaths = np.add.reduceat(event.astype(float), first)
    has_event = deaths > 0
    increments = deaths[has_event] * np.exp(-shift) / at_risk_from[first][has_event]
    return BaselineHazard(unique[has_event], np.cumsum(increments))


def survival_probability(
    risk: np.ndarray, baseline: BaselineHazard, times_months: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Predicted P(event-free at t) = exp(−H0(t)·exp(risk)); ``risk`` higher = worse.

    Returns
    -------
    ndarray
        (n, len(times_months)), higher = better.
    """
    risk = _scores(risk, None, "risk")
    hazard = baseline.at(np.asarray(times_months, dtype=float))
    # H0 = 0 before the first event: log → −inf → S = 1; a huge risk: exp → inf → S = 0
    with np.errstate(divide="ignore", over="ignore"):
        return np.exp(-np.exp(np.log(hazard)[None, :] + risk[:, None]))


def brier(
    time: np.ndarray,
    event: np.ndarray,
    predicted_survival: np.ndarray,
    train_time: np.ndarray,
    train_event: np.ndarray,
    times_months: Sequence[float] = HORIZONS_MONTHS,
) -> HorizonMetric:
    r"""IPCW Brier score at each horizon (Graf 1999, Gerds & Schumacher 2006).

    :math:`\frac1n \sum_i \Big[\frac{\mathbb 1(T_i \le t, \delta_i)\,\hat S_i(t)^2}
    {\hat G(T_i-)} + \frac{\mathbb 1(T_i > t)\,(1 - \hat S_i(t))^2}{\hat G(t)}\Big]`;
    patients censored by t count 0. Same value as R ``riskRegression::Score(...,
    metrics = "brier", cens.model = "km")`` and ``pec::pec(..., cens.model = "marginal")``
    (checked to 1e-12, ties included) and, where no event shares its time with a censoring,
    as scikit-survival's ``brier_score`` (which weights an event by :math:`1/\hat G(T_i)`).

    Parameters
    ----------
    predicted_survival
        (n, len(times_months)) predicted P(event-free at t), higher = better.

    Lower is better; 0.25 is a coin flip at 50 % risk.

    Raises
    ------
    MetricUndefined
        No event in the test set (per horizon: its value is None with the reason).
    """
    time, event = _survival(time, event)
    train_time, train_event = _survival(train_time, train_event, "train_")
    predicted = np.asarray(predicted_survival, dtype=float)
    if predicted.shape != (len(time), len(times_months)):
        raise ValueError(f"predicted_survival must have shape ({len(time)}, "
                         f"{len(times_months)}), got {predicted.shape}")
    column = {horizon_key(t): predicted[:, i] for i, t in enumerate(times_months)}
    censoring = CensoringKM(train_time, train_event)

    def one(t: float, time: np.ndarray, event: np.ndarray) -> float:
        return _brier_at(t, time, event, column[horizon_key(t)], censoring)

    return _per_horizon(one, time, event, train_time, times_months)


class CensoringKM:
    r"""Kaplan–Meier estimate :math:`\hat G(t) = P(C > t)` of the censoring distribution.

    Events come before censorings at the same time: a patient with an event at u is not at
    risk of being censored at u (R ``prodlim(..., reverse = TRUE)``, scikit-survival's
    ``CensoringDistributionEstimator``).

    Parameters
    ----------
    time, event
        (n,) the outcomes it is fitted on (the training set's).
    """

    def __init__(self, time: np.ndarray, event: np.ndarray) -> None:
        time, event = _survival(time, event)
        order = np.argsort(time, kind="stable")
        time, event = time[order], event[order]
        unique, first = np.unique(time, return_index=True)
        at_risk = len(time) - first
        events = np.add.reduceat(event.astype(float), first)
        censored = np.add.reduceat((~event).astype(float), first)
        uncensored_at_risk = at_risk - events
        factor = np.ones(len(unique))
        np.divide(uncensored_at_risk - censored, uncensored_at_risk, out=factor,
                  where=uncensored_at_risk > 0)
        self.times_months = unique
        self.survival = np.cumprod(factor)

    def at(self, times_months: np.ndarray | Sequence[float]) -> np.ndarray:
        r""":math:`\hat G(t)`, right-continuous (the censorings at t included)."""
        index = np.searchsorted(self.times_months, np.asarray(times_months, float), "right")
        return np.concatenate(([1.0], self.survival))[index]

    def before(self, times_months: np.ndarray | Sequence[float]) -> np.ndarray:
        r""":math:`\hat G(t-)`, the left limit (the censorings at t not yet counted)."""
        index = np.searchsorted(self.times_months, np.asarray(times_months, float), "left")
        return np.concatenate(([1.0], self.survival))[index]

    def inverse_before(self, times_months: np.ndarray) -> np.ndarray:
        r""":math:`1/\hat G(t-)`.

        Raises
        ------
        MetricUndefined
            :math:`\hat G(t-) = 0` at one of the times (everyone left was censored before).
        """
        g = self.before(times_months)
        if (g <= 0).any():
            raise MetricUndefined("censoring survival is 0 before an event time: IPCW "
                                  "weight undefined")
        return 1.0 / g


def _brier_at(t: float, time: np.ndarray, event: np.ndarray, survival: np.ndarray,
              censoring: CensoringKM) -> float:
    """The IPCW Brier score at one horizon ``t`` (see :func:`brier`)."""
    if not event.any():
        raise MetricUndefined("no event in the test set")
    cases = event & (time <= t)
    controls = time > t
    g_t = float(censoring.at([t])[0])
    if g_t <= 0:
        raise MetricUndefined(f"censoring survival is 0 at {t:g} months: IPCW weight undefined")
    total = (np.sum(survival[cases] ** 2 * censoring.inverse_before(time[cases]))
             + np.sum((1.0 - survival[controls]) ** 2) / g_t)
    return float(total / len(time))


def brier_null(
    time: np.ndarray,
    event: np.ndarray,
    train_time: np.ndarray,
    train_event: np.ndarray,
    times_months: Sequence[float] = HORIZONS_MONTHS,
) -> HorizonMetric:
    """Brier score of the null model: everyone gets the training Kaplan–Meier survival at t.

    A model is useful at t when its :func:`brier` is below this.
    """
    train_time, train_event = _survival(train_time, train_event, "train_")
    horizons = np.asarray(times_months, dtype=float)
    km = SurvivalFunctionEstimator().fit(Surv.from_arrays(train_event, train_time))
    # past the last training time the KM is undefined; _per_horizon rejects those horizons
    inside = horizons <= train_time.max()
    survival = np.zeros(len(horizons))
    survival[inside] = km.predict_proba(horizons[inside])
    predicted = np.broadcast_to(survival, (len(np.asarray(time)), len(horizons)))
    return brier(time, event, predicted, train_time, train_event, times_months)


def integrated_brier(
    time: np.ndarray,
    event: np.ndarray,
    predicted_survival: np.ndarray,
    train_time: np.ndarray,
    train_event: np.ndarray,
    grid_months: np.ndarray,
) -> float:
    """Integrated Brier score over ``grid_months``: the trapezoid rule over the :func:`brier`
    values at the grid times, divided by the span (as scikit-survival's
    ``integrated_brier_score``).

    R integrates the same Brier values with the left-point rule instead (``pec::ibs`` from
    the first grid time; ``riskRegression::Score(..., summary = "ibs")`` from 0 with a
    Brier score of 0 there): on a uniform grid of step h the two differ by exactly
    (B(last) − B(first))·h / (2 · span) (tests/reference/ipcw_scores.R checks both).

    Parameters
    ----------
    predicted_survival
        (n, len(grid_months)) predicted P(event-free at t).
    grid_months
        (G,) ascending, G ≥ 2, inside the follow-up of both sets.
    """
    time, event = _survival(time, event)
    train_time, train_event = _survival(train_time, train_event, "train_")
    grid = np.asarray(grid_months, dtype=float)
    if len(grid) < 2:
        raise MetricUndefined("fewer than two grid times inside follow-up")
    end = min(train_time.max(), time.max())
    if grid[0] < time.min() or grid[-1] >= end:
        raise MetricUndefined(f"grid [{grid[0]:g}, {grid[-1]:g}] months is not inside "
                              f"follow-up [{time.min():g}, {end:g}[")
    predicted = np.asarray(predicted_survival, dtype=float)
    if predicted.shape != (len(time), len(grid)):
        raise ValueError(f"predicted_survival must have shape ({len(time)}, {len(grid)}), "
                         f"got {predicted.shape}")
    time, event = _censor_at(time, event, train_time.max())
    censoring = CensoringKM(train_time, train_event)
    scores = np.array([_brier_at(float(t), time, event, predicted[:, i], censoring)
                       for i, t in enumerate(grid)])
    return float(np.trapezoid(scores, grid) / (grid[-1] - grid[0]))


# --- everything metrics.json holds ----------------------------------------------------------


def evaluate_predictions(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    train_time: np.ndarray,
    train_event: np.ndarray,
    train_risk: np.ndarray,
    *,
    times_months: Sequence[float] = HORIZONS_MONTHS,
    cutoff: float | None = None,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """All test-set metrics of ``metrics.json``; risk higher = worse throughout.

    Survival probabilities come from the Breslow baseline of the training risks. Uno's C is
    truncated at the last horizon; the IBS runs on a 1-month grid from the first test
    follow-up time up to the last horizon (or the end of follow-up, if earlier). Risk groups:
    high = risk above ``cutoff`` (default: the training median).

    Returns
    -------
    dict
        JSON-ready: ``n``, ``events``, ``cutoff``, ``c_index``, ``c_index_ci95`` ([lo, hi],
        percentile bootstrap over patients), ``c_index_uno``, ``td_auc``, ``brier`` and
        ``brier_null`` ({"36": …}), ``ibs``, ``logrank_p``, ``hazard_ratio``,
        ``hazard_ratio_ci95``, and ``null_reasons`` (metric, or ``metric.horizon`` → why it
        is None). Undefined metrics are None, never an exception.
    """
    time, event = _survival(time, event)
    risk = _scores(risk, len(time), "risk")
    train_time, train_event = _survival(train_time, train_event, "train_")
    train_risk = _scores(train_risk, len(train_time), "train_risk")
    horizons = [float(t) for t in times_months]
    if cutoff is None:
        cutoff = float(risk_cutoffs(train_risk)[0])
    reasons: dict[str, str] = {}

    def attempt(name: str, compute: Callable[[], Any]) -> Any:
        try:
            return compute()
        except MetricUndefined as exc:
            reasons[name] = str(exc)
            return None

    def by_horizon(name: str, compute: Callable[[], HorizonMetric]) -> dict[str, float | None]:
        metric = attempt(name, compute)
        if metric is None:
            return dict.fromkeys(map(horizon_key, horizons))
        reasons.update({f"{name}.{key}": why for key, why in metric.reasons.items()})
        return dict(metric.values)

    def model_brier() -> HorizonMetric:
        baseline = breslow_baseline(train_risk, train_time, train_event)
        return brier(time, event, survival_probability(risk, baseline, horizons), train_time,
                     train_event, horizons)
    groups = risk_groups(risk, cutoff)
    ratio = attempt("hazard_ratio", lambda: hazard_ratio(time, event, groups))
    ci = attempt("c_index_ci95", lambda: bootstrap_ci(harrell_c, time, event, risk,
                                                      n_resamples=n_resamples, seed=seed))
    result: dict[str, Any] = {
        "n": len(time),
        "events": int(event.sum()),
        "cutoff": cutoff,
        "c_index": attempt("c_index", lambda: harrell_c(time, event, risk)),
        "c_index_ci95": None if ci is None else list(ci),
        "c_index_uno": attempt("c_index_uno", lambda: uno_c(
            time, event, risk, train_time, train_event, horizons[-1])),
        "td_auc": by_horizon("td_auc", lambda: td_auc(time, event, risk, train_time,
                                                      train_event, horizons)),
        "brier": by_horizon("brier", model_brier),
        "brier_null": by_horizon("brier_null", lambda: brier_null(
            time, event, train_time, train_event, horizons)),
        "ibs": attempt("ibs", lambda: _ibs(time, event, risk, train_time, train_event,
                                           train_risk, horizons[-1])),
        "logrank_p": attempt("logrank_p", lambda: logrank(time, event, groups)),
        "hazard_ratio": None if ratio is None else ratio.ratio,
        "hazard_ratio_ci95": None if ratio is None else [ratio.ci_low, ratio.ci_high],
        "null_reasons": reasons,
    }
    return result


def _ibs(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    train_time: np.ndarray,
    train_event: np.ndarray,
    train_risk: np.ndarray,
    last_months: float,
) -> float:
    baseline = breslow_baseline(train_risk, train_time, train_event)
    grid = np.arange(np.ceil(time.min() / IBS_STEP_MONTHS), np.floor(
        last_months / IBS_STEP_MONTHS) + 1) * IBS_STEP_MONTHS
    grid = grid[grid < min(train_time.max(), time.max())]
    return integrated_brier(time, event, survival_probability(risk, baseline, grid),
                            train_time, train_event, grid)


# --- helpers ------------------------------------------------------------------------------


def _per_horizon(
    one: Callable[[float, np.ndarray, np.ndarray], float],
    time: np.ndarray,
    event: np.ndarray,
    train_time: np.ndarray,
    times_months: Sequence[float],
) -> HorizonMetric:
    """Evaluate ``one`` at each horizon inside follow-up; record why the others are None."""
    end_train = float(train_time.max())
    capped_time, capped_event = _censor_at(time, event, end_train)
    values: dict[str, float | None] = {}
    reasons: dict[str, str] = {}
    for t in times_months:
        key = horizon_key(float(t))
        try:
            if t >= end_train:
                raise MetricUndefined(f"{t:g} months is not before the end of training "
                                      f"follow-up ({end_train:g} months)")
            if t >= time.max() or t < time.min():
                raise MetricUndefined(f"{t:g} months is outside the test follow-up "
                                      f"[{time.min():g}, {time.max():g}[ months")
            values[key] = one(float(t), capped_time, capped_event)
        except MetricUndefined as exc:
            values[key] = None
            reasons[key] = str(exc)
    return HorizonMetric(values, reasons)


def _censor_at(time: np.ndarray, event: np.ndarray, end: float) -> tuple[np.ndarray, np.ndarray]:
    """Administrative censoring at ``end`` months."""
    return np.minimum(time, end), event & (time <= end)


def _sksurv(compute: Callable[[], float]) -> float:
    """Run a scikit-survival metric on validated inputs; its remaining refusals are about the
    data (e.g. a censoring probability of 0), so they become :class:`MetricUndefined`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # 0/0 → NaN would pass silently
            return compute()
    except (ValueError, RuntimeWarning) as exc:
        raise MetricUndefined(f"scikit-survival: {exc}") from exc


def _survival(time: np.ndarray, event: np.ndarray, prefix: str = "") -> tuple[np.ndarray,
                                                                               np.ndarray]:
    t = np.asarray(time, dtype=float)
    e = np.asarray(event)
    if t.ndim != 1 or e.shape != t.shape:
        raise ValueError(f"{prefix}time and {prefix}event must be 1-D of one length, got "
                         f"{t.shape} and {e.shape}")
    if len(t) == 0:
        raise ValueError(f"{prefix}time is empty")
    if not np.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{prefix}time must be finite and ≥ 0 months")
    if e.dtype != bool:
        if not np.isin(e, (0, 1)).all():
            raise ValueError(f"{prefix}event must be bool or 0/1")
        e = e.astype(bool)
    return t, e


def _scores(values: np.ndarray, n: int | None, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or (n is not None and len(v) != n):
        raise ValueError(f"{name} must be 1-D" + ("" if n is None else f" of length {n}")
                         + f", got shape {v.shape}")
    if len(v) == 0 or not np.isfinite(v).all():
        raise ValueError(f"{name} must be non-empty and finite")
    return v


def _groups(group: np.ndarray, n: int) -> np.ndarray:
    g = np.asarray(group)
    if g.shape != (n,):
        raise ValueError(f"group must have shape ({n},), got {g.shape}")
    return g
