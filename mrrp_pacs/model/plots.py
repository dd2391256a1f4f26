"""Figures of a survival model's test-set behaviour, written as PNG files.

Kaplan–Meier curves per risk group (with a numbers-at-risk table), time-dependent AUC per
horizon, calibration at fixed horizons and a decision curve. Times are in months; risk groups
are integer labels, 0 = lowest risk (as :func:`mrrp_pacs.model.evaluate.risk_groups` gives
them). Figures are built with matplotlib's object API on the Agg canvas (no pyplot state, no
display) and written with fixed size and dpi, so the same inputs give the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sksurv.nonparametric import kaplan_meier_estimator

DPI = 120
_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02")
_DEFAULT_THRESHOLDS = np.round(np.arange(0.01, 0.51, 0.01), 2)


def at_risk_counts(
    time: np.ndarray, group: np.ndarray, at_times_months: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Numbers at risk: patients of each group still followed at each time (T ≥ t).

    Parameters
    ----------
    time
        (n,) follow-up in months (event or censoring).
    group
        (n,) group label of each patient.
    at_times_months
        (K,) times at which to count.

    Returns
    -------
    ndarray
        (G, K) int; row g is the g-th label of ``np.unique(group)``.
    """
    time = np.asarray(time, dtype=float)
    group = np.asarray(group)
    at = np.asarray(at_times_months, dtype=float)
    return np.stack([(time[group == label, None] >= at[None, :]).sum(axis=0)
                     for label in np.unique(group)]).astype(int)


def km_by_group(
    time: np.ndarray,
    event: np.ndarray,
    group: np.ndarray,
    path: Path,
    *,
    numbers_at_risk: bool = True,
    mark: int | None = None,
    labels: Mapping[int, str] | None = None,
    title: str = "Recurrence-free survival by risk group",
) -> Path:
    """Kaplan–Meier curve of each risk group, censorings as ticks, numbers at risk below.

    Parameters
    ----------
    time, event, group
        (n,) months, bool (True = recurrence), int group labels (0 = lowest risk).
    path
        PNG file to write (parent folders are created).
    numbers_at_risk
        Draw the numbers-at-risk table (:func:`at_risk_counts`) under the time axis.
    mark
        A group label to highlight (thick line, the others faded), e.g. the group of the
        patient a report is about.
    labels
        Group label → legend text; default "low risk"/"high risk" for two groups, else
        "risk group 1" … in ascending risk.

    Returns
    -------
    Path
        ``path``.
    """
    time, event = np.asarray(time, dtype=float), np.asarray(event, dtype=bool)
    group = np.asarray(group)
    present = [int(g) for g in np.unique(group)]
    names = dict(labels) if labels is not None else _default_labels(present)
    if mark is not None and mark not in present:
        raise ValueError(f"mark={mark} is not one of the groups {present}")
    end = float(time.max())
    step = 12.0 if end <= 96 else 24.0
    ticks = np.arange(0.0, end + 1e-9, step)

    table_height = 0.2 + 0.22 * len(present) if numbers_at_risk else 0.0
    figure = Figure(figsize=(7.0, 4.6 + table_height), dpi=DPI)
    grid = figure.add_gridspec(2 if numbers_at_risk else 1, 1,
                               height_ratios=[4.6, table_height] if numbers_at_risk else [1])
    axes = figure.add_subplot(grid[0])
    for index, label in enumerate(present):
        members = group == label
        steps_t, steps_s = kaplan_meier_estimator(event[members], time[members])
        faded = mark is not None and label != mark
        style: dict[str, Any] = {"color": _COLOURS[index % len(_COLOURS)],
                                 "alpha": 0.45 if faded else 1.0,
                                 "linewidth": 3.0 if label == mark else 1.6}
        axes.step(np.r_[0.0, steps_t], np.r_[1.0, steps_s], where="post",
                  label=f"{names.get(label, str(label))} (n={members.sum()})", **style)
        censored = time[members & ~event]
        at = np.searchsorted(steps_t, censored, side="right") - 1
        axes.plot(censored, np.where(at >= 0, steps_s[np.maximum(at, 0)], 1.0), "|",
                  markersize=6, color=style["color"], alpha=style["alpha"])
    axes.set_xlim(0.0, ticks[-1] if len(ticks) > 1 and ticks[-1] >= end else end)
    axes.set_ylim(0.0, 1.02)
    axes.set_xticks(ticks)
    axes.set_ylabel("Recurrence-free survival")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left")
    if numbers_at_risk:
        axes.tick_params(labelbottom=True)
        axes.set_xlabel("Months")
        table = figure.add_subplot(grid[1], sharex=axes)
        table.axis("off")
        counts = at_risk_counts(time, group, ticks)
        rows = len(present)
        table.text(-0.07, 1.0, "At risk", transform=table.transAxes, ha="right", va="top",
                   fontsize=8, fontweight="bold")
        for row, label in enumerate(present):
            y = 1.0 - (row + 1) / (rows + 1)
            colour = _COLOURS[row % len(_COLOURS)]
            table.text(-0.07, y, names.get(label, str(label)), transform=table.transAxes,
                       ha="right", va="center", fontsize=8, color=colour)
            for tick, count in zip(ticks, counts[row], strict=True):
                table.text(tick, y, str(count), transform=table.get_xaxis_transform(),
                           ha="center", va="center", fontsize=8, color=colour)
    else:
        axes.set_xlabel("Months")
    figure.subplots_adjust(left=0.2, right=0.97, bottom=0.03, top=0.93, hspace=0.3)
    return _save(figure, path)


def td_auc_plot(
    auc: Mapping[str, float | None], path: Path, *, title: str = "Time-dependent AUC"
) -> Path:
    """Cumulative/dynamic AUC at each horizon, with the 0.5 of a random score.

    Parameters
    ----------
    auc
        Horizon in months (``"36"``) → AUC or None, as ``metrics.json["td_auc"]``; a None is
        shown as "n/a" on the axis.
    """
    horizons = sorted(auc, key=float)
    x = np.array([float(h) for h in horizons])
    values = [auc[h] for h in horizons]
    y = np.array([np.nan if v is None else float(v) for v in values])
    bottom = min(0.4, float(np.nanmin(np.r_[y, 1.0])) - 0.05)
    figure = Figure(figsize=(5.0, 3.8), dpi=DPI)
    axes = figure.add_subplot()
    axes.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="random (0.5)")
    axes.plot(x, y, "o-", color=_COLOURS[1], label="model")
    for xi, yi in zip(x, y, strict=True):
        if np.isnan(yi):
            axes.text(xi, bottom + 0.03, "n/a", ha="center", fontsize=8)
        else:
            axes.annotate(f"{yi:.3f}", (xi, yi), textcoords="offset points", xytext=(0, 7),
                          ha="center", fontsize=8)
    pad = max(6.0, 0.1 * float(np.ptp(x)))
    axes.set_xlim(x.min() - pad, x.max() + pad)
    axes.set_xticks(x)
    axes.set_xlabel("Horizon (months)")
    axes.set_ylabel("AUC(t)")
    axes.set_ylim(bottom, 1.0)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    figure.tight_layout()
    return _save(figure, path)


def calibration_points(
    predicted_survival_at_t: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    t_months: float,
    bins: int = 5,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean predicted vs observed (Kaplan–Meier) survival at t per bin of predicted survival.

    Patients are sorted by predicted survival and split into ``bins`` groups of (nearly)
    equal size (quintiles by default).

    Returns
    -------
    (predicted, observed)
        (bins,) each; ``observed`` is NaN in a bin whose follow-up ends before t with its
        Kaplan–Meier above 0 (undefined there).
    """
    predicted = np.asarray(predicted_survival_at_t, dtype=float)
    time, event = np.asarray(time, dtype=float), np.asarray(event, dtype=bool)
    if bins < 1 or bins > len(predicted):
        raise ValueError(f"bins must be in [1, {len(predicted)}], got {bins}")
    order = np.argsort(predicted, kind="stable")
    mean_predicted, observed = [], []
    for members in np.array_split(order, bins):
        mean_predicted.append(predicted[members].mean())
        observed.append(_km_at(time[members], event[members], t_months))
    return np.array(mean_predicted), np.array(observed)


def calibration_plot(
    predicted_survival: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    path: Path,
    *,
    times_months: Sequence[float] = (36.0, 60.0, 84.0),
    bins: int = 5,
) -> Path:
    """Calibration at each horizon: observed KM vs mean predicted survival per bin.

    Parameters
    ----------
    predicted_survival
        (n, len(times_months)) predicted P(event-free at t), higher = better.
    bins
        Number of equal-size bins of predicted survival (5 quintiles, 10 deciles); fewer
        when there are fewer patients than bins.
    """
    predicted = np.asarray(predicted_survival, dtype=float)
    bins = max(1, min(bins, len(predicted)))
    if predicted.shape != (len(np.asarray(time)), len(times_months)):
        raise ValueError(f"predicted_survival must have shape ({len(np.asarray(time))}, "
                         f"{len(times_months)}), got {predicted.shape}")
    figure = Figure(figsize=(3.6 * len(times_months), 3.8), dpi=DPI)
    for index, t in enumerate(times_months):
        axes = figure.add_subplot(1, len(times_months), index + 1)
        x, y = calibration_points(predicted[:, index], time, event, t, bins)
        low = float(np.nanmin(np.r_[x, y, 1.0]))
        low = max(0.0, np.floor(low * 10) / 10 - 0.05)
        axes.plot([low, 1], [low, 1], "--", color="grey", linewidth=1)
        axes.plot(x, y, "o-", color=_COLOURS[index % len(_COLOURS)])
        axes.set_xlim(low, 1.0)
        axes.set_ylim(low, 1.0)
        axes.set_aspect("equal")
        axes.set_title(f"{t:g} months")
        axes.set_xlabel("Predicted survival")
        if index == 0:
            axes.set_ylabel("Observed (Kaplan–Meier)")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def net_benefit(
    predicted_risk_at_t: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    t_months: float,
    thresholds: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Net benefit of treating patients whose predicted risk by t is ≥ each threshold.

    Survival version of Vickers et al. (2008): among the n_+ patients treated at threshold
    p, true and false positives per patient are :math:`(1 - S_+(t))\, n_+/n` and
    :math:`S_+(t)\, n_+/n`, with :math:`S_+` their Kaplan–Meier; net benefit =
    TP/n − FP/n · p/(1 − p). Treating nobody has net benefit 0.

    Parameters
    ----------
    predicted_risk_at_t
        (n,) predicted probability of recurrence by t (1 − survival), higher = worse.
    thresholds
        (K,) in (0, 1).

    Returns
    -------
    (model, treat_all)
        (K,) each; NaN where the Kaplan–Meier is undefined at t.
    """
    risk = np.asarray(predicted_risk_at_t, dtype=float)
    time, event = np.asarray(time, dtype=float), np.asarray(event, dtype=bool)
    p = np.asarray(thresholds, dtype=float)
    if ((p <= 0) | (p >= 1)).any():
        raise ValueError("thresholds must lie in (0, 1)")
    n = len(risk)
    odds = p / (1 - p)
    all_survival = _km_at(time, event, t_months)
    treat_all = (1 - all_survival) - all_survival * odds
    model = np.empty(len(p))
    for index, threshold in enumerate(p):
        treated = risk >= threshold
        if not treated.any():
            model[index] = 0.0
            continue
        survival = _km_at(time[treated], event[treated], t_months)
        share = treated.sum() / n
        model[index] = (1 - survival) * share - survival * share * odds[index]
    return model, treat_all


def decision_curve(
    predicted_risk_at_t: np.ndarray,
    time: np.ndarray,
    event: np.ndarray,
    t_months: float,
    path: Path,
    *,
    thresholds: np.ndarray = _DEFAULT_THRESHOLDS,
) -> Path:
    """Decision curve at t: net benefit of the model, treat-all and treat-none vs threshold.

    Parameters
    ----------
    predicted_risk_at_t
        (n,) predicted probability of recurrence by ``t_months``, higher = worse.
    thresholds
        (K,) risk thresholds in (0, 1); default 0.01 … 0.50.
    """
    model, treat_all = net_benefit(predicted_risk_at_t, time, event, t_months, thresholds)
    figure = Figure(figsize=(5.6, 4.0), dpi=DPI)
    axes = figure.add_subplot()
    axes.plot(thresholds, model, color=_COLOURS[1], linewidth=2, label="model")
    axes.plot(thresholds, treat_all, color=_COLOURS[0], label="treat all")
    axes.axhline(0.0, color="black", linewidth=1, label="treat none")
    top = np.nanmax(np.r_[model, treat_all, 0.01])
    axes.set_ylim(-0.05 * top - 0.005, 1.1 * top)
    axes.set_xlim(float(thresholds[0]), float(thresholds[-1]))
    axes.set_xlabel(f"Threshold probability of recurrence by {t_months:g} months")
    axes.set_ylabel("Net benefit")
    axes.set_title(f"Decision curve, {t_months:g} months")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()
    return _save(figure, path)


def _km_at(time: np.ndarray, event: np.ndarray, t_months: float) -> float:
    """Kaplan–Meier survival at t; NaN past the last follow-up while the curve is above 0."""
    if len(time) == 0:
        return float("nan")
    steps_t, steps_s = kaplan_meier_estimator(event, time)
    if t_months > time.max() and steps_s[-1] > 0:
        return float("nan")
    index = np.searchsorted(steps_t, t_months, side="right") - 1
    return 1.0 if index < 0 else float(steps_s[index])


def _default_labels(groups: list[int]) -> dict[int, str]:
    if len(groups) == 2:
        return {groups[0]: "low risk", groups[1]: "high risk"}
    return {g: f"risk group {i + 1}" for i, g in enumerate(groups)}


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path
