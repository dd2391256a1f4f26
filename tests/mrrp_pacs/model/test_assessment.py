"""Cross-validation reports (each fold's own cutoff and baseline hazard, the test split left
out) and `evaluate --model` given the model store `train --out` wrote."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from cohorts import tile_cohort

from mrrp_pacs.cli import main
from mrrp_pacs.model.assessment import Predictions, cross_validate
from mrrp_pacs.model.dataset import Cohort
from mrrp_pacs.model.evaluate import (
    HORIZONS_MONTHS,
    BaselineHazard,
    breslow_baseline,
    risk_groups,
    survival_probability,
)
from mrrp_pacs.model.train import TrainSettings, config_for, train

SETTINGS = TrainSettings(max_epochs=6, patience=5, tune=False)
FOLDS = 3


def toy_cohort(n: int = 150, seed: int = 0) -> Cohort:
    """Tiles whose first feature carries the hazard, two clinical variables; every fifth
    patient in the test split."""
    return tile_cohort(n, seed, tiles=4, dim=3, hazard=1.2, follow_up=(40, 150), test_every=5)


@pytest.fixture(scope="module")
def cross_validated(tmp_path_factory):
    cohort = toy_cohort()
    out = tmp_path_factory.mktemp("cv")
    config = config_for(cohort, d_model=16, clinical_dim=16)
    summary = cross_validate(cohort, config, SETTINGS, out, folds=FOLDS, n_resamples=20)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    return cohort, config, summary, rows, out


def test_cross_validation_leaves_the_test_split_out(cross_validated):
    cohort, _, summary, rows, out = cross_validated
    test_ids = {r.patient_id for r in cohort.records if r.outcome.split == "test"}
    assert len(test_ids) == 30 and summary["left_out_test"] == 30
    assert summary["n"] == len(rows) == 120
    assert not test_ids & {row["patient_id"] for row in rows}
    assert json.loads((out / "metrics.json").read_text())["left_out_test"] == 30
    assert sum(split["n"] for split in summary["splits"]) == 120


def test_each_patient_is_grouped_and_given_survival_by_its_own_fold(cross_validated):
    """Risk group above the fold's training median; predicted survival from the fold's
    Breslow baseline (both recorded per split). Neither is what one pooled cutoff and one
    pooled baseline on the out-of-fold risks (the former report) give."""
    _, _, summary, rows, _ = cross_validated
    fold = np.array([int(row["fold"]) for row in rows])
    risk = np.array([float(row["risk"]) for row in rows])
    high = np.array([row["risk_group"] == "high" for row in rows])
    cutoff = np.array([summary["splits"][f]["cutoff"] for f in fold])
    assert sorted(set(fold)) == list(range(FOLDS))
    clear = np.abs(risk - cutoff) > 1e-5  # the CSV rounds the risk to 6 decimals
    assert clear.sum() > 110
    np.testing.assert_array_equal(high[clear], risk[clear] > cutoff[clear])
    for t in HORIZONS_MONTHS:
        key = f"{t:g}"
        h0 = np.array([summary["splits"][f]["baseline_cumulative_hazard"][key] for f in fold])
        shown = np.array([float(row[f"survival_{key}m"]) for row in rows])
        np.testing.assert_allclose(shown, np.exp(-h0 * np.exp(risk)), atol=2e-5)

    time = np.array([float(row["time_months"]) for row in rows])
    event = np.array([row["event"] == "1" for row in rows])
    pooled_group = risk > np.median(risk)
    pooled_survival = survival_probability(risk, breslow_baseline(risk, time, event), [60.0])
    assert (pooled_group != high).sum() >= 1
    assert np.max(np.abs(pooled_survival[:, 0] - np.array(
        [float(row["survival_60m"]) for row in rows]))) > 1e-3


def test_the_recorded_fold_baseline_is_breslow_on_the_folds_training_patients(
        cross_validated):
    """Fold 0 trained again (seeded, deterministic on CPU): its training risks give the
    recorded cutoff and baseline hazard."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    cohort, config, summary, _, _ = cross_validated
    kept = cohort.subset(np.flatnonzero(cohort.split != "test"))
    train_idx, _ = next(RepeatedStratifiedKFold(n_splits=FOLDS, n_repeats=1, random_state=0)
                        .split(np.zeros(len(kept.records)), kept.event))
    part = kept.subset(train_idx)
    trained = train(part, config, replace(SETTINGS, seed=SETTINGS.seed))
    baseline = breslow_baseline(trained.train_risk, part.time, part.event)
    split = summary["splits"][0]
    assert split["cutoff"] == pytest.approx(np.median(trained.train_risk), abs=1e-12)
    np.testing.assert_allclose([split["baseline_cumulative_hazard"][f"{t:g}"]
                                for t in HORIZONS_MONTHS], baseline.at(HORIZONS_MONTHS),
                               rtol=1e-12)


def test_joined_predictions_return_to_cohort_order():
    baseline = BaselineHazard(np.array([10.0, 50.0]), np.array([0.1, 0.4]))
    first = Predictions.scored(np.array([0.0, 2.0]), 1.0, baseline, fold=0)
    second = Predictions.scored(np.array([1.0]), 0.5, baseline._replace(
        cumulative_hazard=np.array([0.2, 0.8])), fold=1)
    joined = Predictions.joined([(np.array([2, 0]), first), (np.array([1]), second)], 3)
    assert joined.risk.tolist() == [2.0, 1.0, 0.0]
    assert joined.group.tolist() == [1, 1, 0]  # patient 1: 1.0 > its fold's 0.5
    assert joined.fold.tolist() == [0, 1, 0]
    assert joined.survival_decision[1] == pytest.approx(np.exp(-0.8 * np.e))
    assert risk_groups(np.array([1.0]), 1.0).tolist() == [0]  # the pooled 1.0 would say low
    with pytest.raises(ValueError, match="cover each of 3 patients once"):
        Predictions.joined([(np.array([0, 0]), first), (np.array([1]), second)], 3)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A clinical-only cohort table with a split column (30 of 150 in the test split)."""
    folder = tmp_path_factory.mktemp("table")
    rng = np.random.default_rng(1)
    path, schema = folder / "cohort.csv", folder / "schema.toml"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "time_months", "event", "split", "age", "grade"])
        for i in range(150):
            grade = int(rng.integers(0, 3))
            time = rng.exponential(80 * np.exp(-0.8 * grade))
            follow = rng.uniform(30, 150)
            writer.writerow([f"P{i:03d}", f"{min(time, follow):.2f}", int(time <= follow),
                             "test" if i % 5 == 0 else "train", f"{rng.normal(55, 9):.1f}",
                             str(grade)])
    schema.write_text('[columns.age]\nkind = "continuous"\n\n'
                      '[columns.grade]\nkind = "categorical"\nlevels = ["0", "1", "2"]\n')
    return ["--table", str(path), "--schema", str(schema)]


def test_evaluate_accepts_the_train_out_folder_and_cv_leaves_test_rows_out(table, tmp_path):
    store = tmp_path / "models"
    runner = CliRunner()
    trained = runner.invoke(main, ["train", *table, "--out", str(store), "--max-epochs", "4",
                                   "--json"])
    assert trained.exit_code == 0, trained.output
    label = json.loads(trained.stdout)["model"]

    scored = runner.invoke(main, ["evaluate", *table, "--model", str(store), "--out",
                                  str(tmp_path / "report")])
    assert scored.exit_code == 0, scored.output
    assert f"using {label} (promoted)" in scored.stderr
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["model"] == label

    crossed = runner.invoke(main, ["evaluate", *table, "--model", str(store), "--cv", "3",
                                   "--out", str(tmp_path / "cv")])
    assert crossed.exit_code == 0, crossed.output
    assert "cross-validating on 120 patients; 30 of split=test left out" in crossed.stderr
    assert "30 split=test rows left out" in crossed.stdout
    metrics = json.loads((tmp_path / "cv" / "metrics.json").read_text())
    assert metrics["n"] == 120 and metrics["left_out_test"] == 30
    rows = list(csv.DictReader((tmp_path / "cv" / "predictions.csv").open()))
    assert len(rows) == 120 and all(int(row["patient_id"][1:]) % 5 for row in rows)


def test_evaluate_refuses_an_ambiguous_or_empty_store_clearly(table, tmp_path):
    runner = CliRunner()
    store = tmp_path / "models"
    for name in ("first", "second"):
        done = runner.invoke(main, ["train", *table, "--out", str(store), "--name", name,
                                    "--max-epochs", "2", "--no-promote", "--json"])
        assert done.exit_code == 0, done.output
    ambiguous = runner.invoke(main, ["evaluate", *table, "--model", str(store), "--out",
                                     str(tmp_path / "r")])
    assert ambiguous.exit_code == 1
    assert "several 'mrrp' models (mrrp/first, mrrp/second)" in ambiguous.output
    assert "Traceback" not in ambiguous.output
    one = runner.invoke(main, ["evaluate", *table, "--model", str(store / "mrrp" / "first"),
                               "--out", str(tmp_path / "r")])
    assert one.exit_code == 0, one.output
    assert "(the newest: none is promoted)" in one.stderr
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(main, ["evaluate", *table, "--model", str(tmp_path / "empty"),
                                 "--out", str(tmp_path / "r")])
    assert empty.exit_code == 1 and "no 'mrrp' model in" in empty.output
