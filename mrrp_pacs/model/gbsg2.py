"""The real-data anchor: GBSG2 (German Breast Cancer Study Group 2, 686 patients, 299
recurrences), which ships with scikit-survival.

The MRRP model runs clinical-only (slide and ultrasound compensated by their learned
embeddings) against Cox PH and a random survival forest, on identical repeated stratified
K-fold splits; the figure reported is Harrell's C on each held-out fold (risk: higher = worse),
and, paired by split, MRRP's C minus each other model's (mean, SD and how many splits MRRP is
at least as high; the splits of repeated K-fold overlap, so the SD is not a standard error).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import RepeatedStratifiedKFold

from mrrp_pacs.model.dataset import Cohort, Outcome, PatientRecord

DAYS_PER_MONTH = 365.25 / 12
CONTINUOUS = ("age", "estrec", "pnodes", "progrec", "tsize")
CATEGORICAL = {"horTh": ("no", "yes"), "menostat": ("Pre", "Post"), "tgrade": ("I", "II", "III")}


def gbsg2_cohort() -> Cohort:
    """GBSG2 as a clinical-only cohort; time in months (days / 30.44)."""
    from sksurv.datasets import load_gbsg2

    features, outcome = load_gbsg2()
    spec = [(name, "continuous", 0) for name in CONTINUOUS] + [
        (name, "categorical", len(levels)) for name, levels in CATEGORICAL.items()]
    records = []
    for i in range(len(features)):
        row = features.iloc[i]
        values = [float(row[name]) for name in CONTINUOUS] + [
            float(levels.index(str(row[name]))) for name, levels in CATEGORICAL.items()]
        records.append(PatientRecord(
            f"GBSG2-{i + 1:03d}", {}, {}, np.array(values, np.float32),
            np.zeros(len(spec), bool),
            Outcome(float(outcome["time"][i]) / DAYS_PER_MONTH, bool(outcome["cens"][i]))))
    return Cohort(records, spec, {}, source="scikit-survival load_gbsg2")


def export_table(folder: Path) -> tuple[Path, Path]:
    """Write ``gbsg2.csv`` and ``gbsg2_schema.toml`` (for ``mrrp-pacs train --table``)."""
    cohort = gbsg2_cohort()
    folder.mkdir(parents=True, exist_ok=True)
    table, schema = folder / "gbsg2.csv", folder / "gbsg2_schema.toml"
    names = [name for name, _, _ in cohort.clinical_spec]
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["patient_id", "time_months", "event", *names])
        for record in cohort.records:
            assert record.outcome is not None
            cells = [f"{v:g}" for v in record.clinical_values[: len(CONTINUOUS)]] + [
                levels[int(v)] for v, levels in zip(record.clinical_values[len(CONTINUOUS):],
                                                     CATEGORICAL.values(), strict=True)]
            writer.writerow([record.patient_id, f"{record.outcome.time_months:.3f}",
                             int(record.outcome.event), *cells])
    lines = ["# GBSG2 clinical columns for mrrp-pacs train --table", ""]
    for name in CONTINUOUS:
        lines += [f"[columns.{name}]", 'kind = "continuous"', ""]
    for name, levels in CATEGORICAL.items():
        quoted = ", ".join(f'"{level}"' for level in levels)
        lines += [f"[columns.{name}]", 'kind = "categorical"', f"levels = [{quoted}]", ""]
    schema.write_text("\n".join(lines))
    return table, schema


def splits(event: np.ndarray, folds: int, repeats: int, seed: int
           ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Repeated stratified K-fold (by event) train/test index pairs, the same for every model."""
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    return [(train, test) for train, test in splitter.split(np.zeros(len(event)), event)]


def _design(cohort: Cohort, train: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """One-hot categoricals, continuous standardised on the training fold."""
    values = np.stack([r.clinical_values for r in cohort.records])
    n_cont = len(CONTINUOUS)
    mean = values[train, :n_cont].mean(axis=0)
    std = values[train, :n_cont].std(axis=0) + 1e-9

    def matrix(index: np.ndarray) -> np.ndarray:
        parts = [(values[index, :n_cont] - mean) / std]
        for j, levels in enumerate(CATEGORICAL.values()):
            codes = values[index, n_cont + j].astype(int)
            parts.append(np.eye(len(levels))[codes][:, 1:])  # drop the reference level
        return np.hstack(parts)

    return matrix


@dataclass
class FoldResult:
    model: str
    split: int
    c_index: float


def run_benchmark(folds: int = 5, repeats: int = 10, seed: int = 0,
                  fit_mrrp: Callable[[Cohort, Cohort], np.ndarray] | None = None,
                  progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """C-index per model and split; ``fit_mrrp(train, test) -> test risk`` trains MRRP."""
    from sksurv.ensemble import RandomSurvivalForest
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    from mrrp_pacs.model.evaluate import harrell_c

    cohort = gbsg2_cohort()
    time, event = cohort.time, cohort.event
    results: list[FoldResult] = []
    for number, (train, test) in enumerate(splits(event, folds, repeats, seed)):
        design = _design(cohort, train)
        target = Surv.from_arrays(event[train], time[train])
        cox = CoxPHSurvivalAnalysis(ties="efron").fit(design(train), target)
        results.append(FoldResult("coxph", number,
                                  harrell_c(time[test], event[test], cox.predict(design(test)))))
        forest = RandomSurvivalForest(n_estimators=200, min_samples_leaf=15, max_features="sqrt",
                                      random_state=seed + number, n_jobs=2)
        forest.fit(design(train), target)
        results.append(FoldResult("rsf", number, harrell_c(time[test], event[test],
                                                           forest.predict(design(test)))))
        if fit_mrrp is not None:
            risk = fit_mrrp(cohort.subset(train), cohort.subset(test))
            results.append(FoldResult("mrrp", number, harrell_c(time[test], event[test], risk)))
        if progress is not None:
            progress(1)
    models: dict[str, Any] = {}
    for name in dict.fromkeys(r.model for r in results):
        values = np.array([r.c_index for r in results if r.model == name])
        models[name] = {"c_index_mean": round(float(values.mean()), 4),
                        "c_index_sd": round(float(values.std(ddof=1)), 4),
                        "c_index": [round(float(v), 4) for v in values]}
    paired: dict[str, Any] = {}
    if "mrrp" in models:
        mrrp = np.array([r.c_index for r in results if r.model == "mrrp"])
        for name in models:
            if name == "mrrp":
                continue
            other = np.array([r.c_index for r in results if r.model == name])
            difference = mrrp - other
            paired[f"mrrp - {name}"] = {
                "mean": round(float(difference.mean()), 4),
                "sd": round(float(difference.std(ddof=1)), 4) if len(difference) > 1 else None,
                "mrrp_at_least_as_high": int((difference >= 0).sum()),
                "splits": len(difference),
                "per_split": [round(float(d), 4) for d in difference]}
    return {"models": models, "paired": paired,
            "splits": {"folds": folds, "repeats": repeats, "seed": seed,
                       "stratified_by": "event", "n": len(time), "events": int(event.sum())},
            "metric": "Harrell C on each held-out fold (risk: higher = worse)"}
