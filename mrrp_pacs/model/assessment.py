"""Assessing a model on a cohort: metrics.json, predictions.csv and the plots.

Two ways: a stored model on a test cohort (:func:`assess_stored`), or K-fold cross-validation
repeated R times, training a fresh model per split with a given architecture
(:func:`cross_validate`). Risk: higher = worse; the high-risk group is above the cutoff (the
training median unless said otherwise).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from model_store import ModelVersion
from mrrp_pacs.model import plots
from mrrp_pacs.model.dataset import Cohort
from mrrp_pacs.model.evaluate import (
    HORIZONS_MONTHS,
    BaselineHazard,
    evaluate_predictions,
    risk_groups,
    survival_probability,
)
from mrrp_pacs.model.fusion import FusionConfig
from mrrp_pacs.model.train import TrainSettings, load, predict, train

LOGGER = logging.getLogger(__name__)

DECISION_HORIZON_MONTHS = 60.0


def write_report(out: Path, cohort: Cohort, risk: np.ndarray, metrics: dict[str, Any],
                 baseline: BaselineHazard, cutoff: float) -> None:
    """metrics.json, predictions.csv and the four plots into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    group = risk_groups(risk, cutoff)
    with (out / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["patient_id", "time_months", "event", "risk", "risk_group"])
        for record, value, g in zip(cohort.records, risk, group, strict=True):
            assert record.outcome is not None
            writer.writerow([record.patient_id, f"{record.outcome.time_months:.2f}",
                             int(record.outcome.event), f"{value:.6f}",
                             "high" if g else "low"])
    time, event = cohort.time, cohort.event
    plots.km_by_group(time, event, group, out / "km_by_risk_group.png",
                      labels={0: "low risk", 1: "high risk"})
    if metrics.get("td_auc"):
        plots.td_auc_plot(metrics["td_auc"], out / "td_auc.png")
    survival = survival_probability(risk, baseline, HORIZONS_MONTHS)
    plots.calibration_plot(survival, time, event, out / "calibration.png",
                           times_months=HORIZONS_MONTHS)
    at_horizon = 1.0 - survival_probability(risk, baseline, [DECISION_HORIZON_MONTHS])[:, 0]
    plots.decision_curve(at_horizon, time, event, DECISION_HORIZON_MONTHS,
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
    write_report(out, cohort, risk, metrics, baseline, cutoff)
    return metrics


def cross_validate(cohort: Cohort, config: FusionConfig, settings: TrainSettings, out: Path,
                   *, folds: int = 5, repeats: int = 1, seed: int = 0, n_resamples: int = 200,
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Repeated stratified K-fold: a fresh model per split. metrics.json holds each metric's
    mean and SD over the splits and the per-split values; predictions.csv and the plots use the
    out-of-fold risks of the first repeat."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    from mrrp_pacs.model.evaluate import breslow_baseline

    event = cohort.event
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    per_split: list[dict[str, Any]] = []
    first_repeat = np.full(len(event), np.nan)
    for number, (train_idx, test_idx) in enumerate(splitter.split(np.zeros(len(event)), event)):
        train_part, test_part = cohort.subset(train_idx), cohort.subset(test_idx)
        trained = train(train_part, config, replace(settings, seed=settings.seed + number))
        risk = predict(trained.model, test_part)
        per_split.append(evaluate_predictions(
            test_part.time, test_part.event, risk, train_part.time, train_part.event,
            trained.train_risk, n_resamples=n_resamples, seed=seed + number))
        if number < folds:
            first_repeat[test_idx] = risk
        if progress is not None:
            progress(1)
    summary: dict[str, Any] = {"folds": folds, "repeats": repeats, "seed": seed,
                               "n": len(event), "events": int(event.sum()), "splits": per_split}
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
    cutoff = float(np.median(first_repeat))
    baseline = breslow_baseline(first_repeat, cohort.time, event)
    write_report(out, cohort, first_repeat, summary, baseline, cutoff)
    return summary
