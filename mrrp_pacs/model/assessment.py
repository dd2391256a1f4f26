"""Assessing a model on a cohort: metrics.json, predictions.csv and the plots.

Two ways: a stored model on a test cohort (:func:`assess_stored`), or K-fold cross-validation
repeated R times, training a fresh model per split with a given architecture
(:func:`cross_validate`). Risk: higher = worse; the high-risk group is above the cutoff (the
training median unless said otherwise). Every patient's risk group and predicted survival come
from the cutoff and the Breslow baseline of the model that scored it, fitted on that model's
training patients only: the stored model's for :func:`assess_stored`, the fold's for
:func:`cross_validate`.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from model_store import ModelVersion
from mrrp_pacs.errors import CohortError
from mrrp_pacs.model import plots
from mrrp_pacs.model.dataset import Cohort
from mrrp_pacs.model.evaluate import (
    HORIZONS_MONTHS,
    BaselineHazard,
    breslow_baseline,
    evaluate_predictions,
    horizon_key,
    risk_groups,
    survival_probability,
)
from mrrp_pacs.model.fusion import FusionConfig
from mrrp_pacs.model.train import TrainSettings, load, predict, train

LOGGER = logging.getLogger(__name__)

DECISION_HORIZON_MONTHS = 60.0


@dataclass(frozen=True)
class Predictions:
    """What the report shows of each patient of a cohort, in its order.

    Attributes
    ----------
    risk
        (n,) log hazard, higher = worse.
    group
        (n,) 0 = low, 1 = high risk: above the cutoff of the model that scored the patient.
    survival
        (n, len(HORIZONS_MONTHS)) predicted P(event-free) at the horizons, from that model's
        baseline hazard.
    survival_decision
        (n,) predicted P(event-free) at :data:`DECISION_HORIZON_MONTHS`.
    fold
        (n,) number of the cross-validation fold that held the patient out, or None.
    """

    risk: np.ndarray
    group: np.ndarray
    survival: np.ndarray
    survival_decision: np.ndarray
    fold: np.ndarray | None = None

    @classmethod
    def scored(cls, risk: np.ndarray, cutoff: float, baseline: BaselineHazard,
               fold: int | None = None) -> Predictions:
        """The patients one model scored, with its training cutoff and baseline."""
        risk = np.asarray(risk, dtype=float)
        return cls(risk, risk_groups(risk, cutoff),
                   survival_probability(risk, baseline, HORIZONS_MONTHS),
                   survival_probability(risk, baseline, [DECISION_HORIZON_MONTHS])[:, 0],
                   None if fold is None else np.full(len(risk), fold))

    @classmethod
    def joined(cls, parts: list[tuple[np.ndarray, Predictions]], n: int) -> Predictions:
        """Patients scored by several models (the folds), put back in cohort order.

        ``parts``: (indices into the cohort, their predictions); together they must cover
        each of the ``n`` patients exactly once.
        """
        order = np.concatenate([np.asarray(index, dtype=int) for index, _ in parts])
        if len(order) != n or len(np.unique(order)) != n:
            raise ValueError(f"the parts must cover each of {n} patients once")
        inverse = np.empty(n, dtype=int)
        inverse[order] = np.arange(n)

        def cat(values: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(values)[inverse]

        folds = [p.fold for _, p in parts]
        return cls(cat([p.risk for _, p in parts]), cat([p.group for _, p in parts]),
                   cat([p.survival for _, p in parts]),
                   cat([p.survival_decision for _, p in parts]),
                   None if any(f is None for f in folds)
                   else cat([f for f in folds if f is not None]))


def write_report(out: Path, cohort: Cohort, metrics: dict[str, Any],
                 predictions: Predictions) -> None:
    """metrics.json, predictions.csv and the four plots into ``out``.

    predictions.csv: ``patient_id,time_months,event,risk,risk_group``, the predicted
    survival at each horizon (``survival_36m`` …) and, in cross-validation, ``fold``.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    survival_columns = [f"survival_{horizon_key(t)}m" for t in HORIZONS_MONTHS]
    with (out / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["patient_id", "time_months", "event", "risk", "risk_group",
                         *survival_columns, *(["fold"] if predictions.fold is not None else [])])
        for index, record in enumerate(cohort.records):
            assert record.outcome is not None
            writer.writerow([
                record.patient_id, f"{record.outcome.time_months:.2f}",
                int(record.outcome.event), f"{predictions.risk[index]:.6f}",
                "high" if predictions.group[index] else "low",
                *(f"{v:.6f}" for v in predictions.survival[index]),
                *([int(predictions.fold[index])] if predictions.fold is not None else [])])
    time, event = cohort.time, cohort.event
    plots.km_by_group(time, event, predictions.group, out / "km_by_risk_group.png",
                      labels={0: "low risk", 1: "high risk"})
    if metrics.get("td_auc"):
        plots.td_auc_plot(metrics["td_auc"], out / "td_auc.png")
    plots.calibration_plot(predictions.survival, time, event, out / "calibration.png",
                           times_months=HORIZONS_MONTHS)
    plots.decision_curve(1.0 - predictions.survival_decision, time, event,
                         DECISION_HORIZON_MONTHS,
                         out / f"decision_curve_{int(DECISION_HORIZON_MONTHS)}m.png")


def assess_stored(version: ModelVersion, cohort: Cohort, out: Path, *, seed: int = 0,
                  n_resamples: int = 2000) -> dict[str, Any]:
    """Score ``cohort`` with a stored model and write the report; returns the metrics."""
    model = load(version, cohort)
    risk = predict(model, cohort)
    manifest = version.manifest
    training = manifest["training_outcomes"]
    train_time = np.asarray(training["time_months"], float)
    train_event = np.asarray(training["event"], bool)
    train_risk = np.asarray(training["risk"], float)
    cutoff = float(manifest["risk_cutoff"])
    metrics = evaluate_predictions(cohort.time, cohort.event, risk, train_time, train_event,
                                   train_risk, cutoff=cutoff, n_resamples=n_resamples,
                                   seed=seed)
    metrics["model"] = version.label
    baseline = BaselineHazard(np.asarray(manifest["baseline_hazard"]["time_months"]),
                              np.asarray(manifest["baseline_hazard"]["cumulative_hazard"]))
    write_report(out, cohort, metrics, Predictions.scored(risk, cutoff, baseline))
    return metrics


def cross_validate(cohort: Cohort, config: FusionConfig, settings: TrainSettings, out: Path,
                   *, folds: int = 5, repeats: int = 1, seed: int = 0, n_resamples: int = 200,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Repeated stratified K-fold: a fresh model per split.

    Patients whose outcome has ``split = test`` are left out (the held-out test set takes no
    part in choosing a model); ``left_out_test`` counts them. metrics.json holds each metric's
    mean and SD over the splits and the per-split values, each with its fold's ``cutoff`` (the
    median of the fold's training risks) and ``baseline_cumulative_hazard`` (its Breslow H0 at
    the horizons). predictions.csv and the plots show the first repeat: each patient's
    out-of-fold risk, its risk group above *its fold's* cutoff and its predicted survival from
    *its fold's* Breslow baseline (fitted on the fold's training risks and outcomes),
    concatenated over the folds.

    Raises
    ------
    CohortError
        Fewer events, or fewer censored patients, than folds.
    """
    from sklearn.model_selection import RepeatedStratifiedKFold

    kept = np.flatnonzero(cohort.split != "test")
    left_out = len(cohort.records) - len(kept)
    cohort = cohort.subset(kept)
    event = cohort.event
    if min(event.sum(), (~event).sum()) < folds:
        raise CohortError(
            f"{folds}-fold cross-validation needs at least {folds} events and {folds} censored "
            f"patients outside the test split; there are {int(event.sum())} and "
            f"{int((~event).sum())}" + (f" ({left_out} split=test rows left out)"
                                        if left_out else ""))
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    per_split: list[dict[str, Any]] = []
    first_repeat: list[tuple[np.ndarray, Predictions]] = []
    for number, (train_idx, test_idx) in enumerate(splitter.split(np.zeros(len(event)), event)):
        train_part, test_part = cohort.subset(train_idx), cohort.subset(test_idx)
        trained = train(train_part, config, replace(settings, seed=settings.seed + number))
        risk = predict(trained.model, test_part)
        metrics = evaluate_predictions(
            test_part.time, test_part.event, risk, train_part.time, train_part.event,
            trained.train_risk, n_resamples=n_resamples, seed=seed + number)
        baseline = breslow_baseline(trained.train_risk, train_part.time, train_part.event)
        metrics["baseline_cumulative_hazard"] = {
            horizon_key(t): float(h) for t, h in zip(HORIZONS_MONTHS,
                                                     baseline.at(HORIZONS_MONTHS), strict=True)}
        per_split.append(metrics)
        if number < folds:
            first_repeat.append((test_idx, Predictions.scored(risk, metrics["cutoff"], baseline,
                                                              fold=number)))
        if progress is not None:
            progress(1)
    summary: dict[str, Any] = {"folds": folds, "repeats": repeats, "seed": seed,
                               "n": len(event), "events": int(event.sum()),
                               "left_out_test": left_out, "splits": per_split}
    for key in ("c_index", "c_index_uno", "ibs", "logrank_p", "hazard_ratio"):
        values = np.array([s[key] for s in per_split if s.get(key) is not None], float)
        summary[key] = float(values.mean()) if len(values) else None
        summary[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else None
    for key in ("td_auc", "brier", "brier_null"):
        summary[key] = {}
        for horizon in per_split[0][key]:
            values = np.array([s[key][horizon] for s in per_split
                               if s[key].get(horizon) is not None], float)
            summary[key][horizon] = float(values.mean()) if len(values) else None
    write_report(out, cohort, summary, Predictions.joined(first_repeat, len(event)))
    return summary
