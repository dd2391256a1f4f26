"""Training, the model store round trip, the tabular path and the GBSG2 benchmark (small)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from cohorts import tile_cohort
from stored_models import rewrite_manifest

from model_store import ModelStore
from mrrp_pacs.cli import main
from mrrp_pacs.errors import ModelStoreError
from mrrp_pacs.model import gbsg2
from mrrp_pacs.model.dataset import Cohort, PatientRecord, cohort_from_table
from mrrp_pacs.model.train import (
    TrainSettings,
    config_for,
    fit_once,
    load,
    predict,
    save,
    stratified_batches,
    train,
)

SETTINGS = TrainSettings(max_epochs=40, patience=10, tune=False)


def toy_cohort(n=300, seed=0) -> Cohort:
    """Tiles whose first feature carries the hazard, plus two clinical variables."""
    return tile_cohort(n, seed)


def test_training_is_seeded_and_learns_the_signal():
    cohort = toy_cohort()
    train_part = cohort.subset(np.flatnonzero(cohort.split == "train"))
    test_part = cohort.subset(np.flatnonzero(cohort.split == "test"))
    config = config_for(train_part, d_model=16, clinical_dim=32)
    first = train(train_part, config, SETTINGS)
    second = train(train_part, config, SETTINGS)
    assert np.array_equal(first.train_risk, second.train_risk)
    assert 1 <= first.history.best_epoch <= first.history.stopped_epoch
    # the early-stopped weights are the best validation epoch's
    best = first.history.validation_loss[first.history.best_epoch - 1]
    assert best == min(first.history.validation_loss)
    from mrrp_pacs.model.evaluate import harrell_c

    c = harrell_c(test_part.time, test_part.event, predict(first.model, test_part))
    print(f"\ntoy test C-index {c:.3f}")
    assert c > 0.7


def test_inner_cross_validation_chooses_rate_and_epochs_then_refits():
    cohort = toy_cohort()
    train_part = cohort.subset(np.flatnonzero(cohort.split == "train"))
    test_part = cohort.subset(np.flatnonzero(cohort.split == "test"))
    config = config_for(train_part, d_model=16, clinical_dim=32)
    settings = TrainSettings(max_epochs=25, patience=8, learning_rates=(1e-4, 3e-3))
    first = train(train_part, config, settings)
    assert np.array_equal(first.train_risk, train(train_part, config, settings).train_risk)
    history = first.history
    assert set(history.tuning) == {"0.0001", "0.003"}
    chosen = history.tuning[f"{history.learning_rate:g}"]
    # the chosen rate has the lowest mean inner-validation loss, at the chosen epoch count
    assert chosen["loss"] == min(t["loss"] for t in history.tuning.values())
    assert history.stopped_epoch == chosen["epochs"] == len(history.train_loss)
    assert history.validation_loss[-1] == pytest.approx(chosen["loss"])
    assert min(history.validation_loss) == pytest.approx(chosen["loss"])
    from mrrp_pacs.model.evaluate import harrell_c

    c = harrell_c(test_part.time, test_part.event, predict(first.model, test_part))
    print(f"\ntuned: rate {history.learning_rate:g}, {history.stopped_epoch} epochs, "
          f"test C-index {c:.3f}; inner {history.tuning}")
    assert c > 0.7


def test_too_few_events_to_tune_is_said_not_hidden(caplog):
    cohort = toy_cohort(8, seed=2)
    assert 2 <= cohort.event.sum() < 6  # fewer events than 2 × 3 inner folds
    config = config_for(cohort, d_model=8, clinical_dim=8)
    with caplog.at_level("WARNING", logger="mrrp_pacs.model.train"):
        trained = train(cohort, config, TrainSettings(max_epochs=2))
    assert trained.history.tuning == {}
    assert "cannot fill 3 inner folds" in caplog.text


def test_mini_batches_spread_the_events():
    rng = np.random.default_rng(3)
    event = np.zeros(200, bool)
    event[rng.choice(200, 12, replace=False)] = True
    batches = stratified_batches(event, 32, rng)
    assert len(batches) == 6
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(200))  # each once
    assert all(event[b].sum() == 2 for b in batches)  # 12 events over 6 batches
    assert all(33 <= len(b) <= 34 for b in batches)
    (whole,) = stratified_batches(event, 0, rng)
    assert np.array_equal(whole, np.arange(200))
    # fewer events than batches: batches without an event are left out (no risk set)
    rare = np.zeros(200, bool)
    rare[:2] = True
    assert sum(len(b) for b in stratified_batches(rare, 32, rng)) < 200


def test_missing_vectors_start_at_the_pooled_mean_and_are_trained():
    cohort = toy_cohort(120)
    records = list(cohort.records)
    for i in range(0, 120, 5):  # every fifth patient has no slide
        r = records[i]
        records[i] = PatientRecord(r.patient_id, {}, {}, r.clinical_values, r.clinical_missing,
                                   r.outcome)
    cohort = Cohort(records, cohort.clinical_spec, cohort.extractors, "toy")
    config = config_for(cohort, d_model=16, clinical_dim=32)
    assert config.modality_dropout > 0  # on by default, so the vector learns from everyone
    start = train(cohort, config, TrainSettings(max_epochs=1, tune=False, learning_rate=1e-9))
    vector = start.model.branches["wsi"].missing.detach()
    assert float(vector.norm()) > 1.0  # the pooled vectors' scale (LayerNorm'd), not zero
    model, _ = fit_once(cohort, None, config, TrainSettings(), rate=1e-3, epochs=15)
    moved = model.branches["wsi"].missing.detach() - vector
    assert float(moved.norm()) > 0.05 * float(vector.norm())


def test_store_round_trip_and_extractor_check(tmp_path):
    cohort = toy_cohort(60)
    config = config_for(cohort, d_model=16, clinical_dim=32)
    trained = train(cohort, config, TrainSettings(max_epochs=5))
    store = ModelStore(tmp_path)
    stored = save(store, "toy", trained, cohort, TrainSettings(max_epochs=5), {"note": "test"})
    manifest = stored.manifest
    for key in ("architecture", "extractors", "training", "risk_cutoff", "baseline_hazard",
                "training_risk_percentiles", "training_outcomes", "metrics", "files"):
        assert key in manifest
    assert manifest["training"]["n"] == 60 and manifest["extractors"] == {"wsi": ["toy", "1"]}
    assert manifest["files"]["weights.safetensors"]["sha256"]
    reloaded = load(store.load("mrrp", "toy"), cohort)
    assert np.allclose(predict(reloaded, cohort), trained.train_risk)
    other = Cohort(cohort.records, cohort.clinical_spec, {"wsi": ["toy", "2"]}, "other")
    with pytest.raises(ModelStoreError, match=r"trained on wsi features from extractor"):
        load(store.load("mrrp", "toy"), other)
    # a manifest edited after the save is refused by the store
    manifest_path = stored.path / "manifest.json"
    edited = json.loads(manifest_path.read_text())
    edited["risk_cutoff"] = 0.0
    manifest_path.write_text(json.dumps(edited))
    with pytest.raises(ModelStoreError, match=r"does not match manifest\.sha256"):
        store.load("mrrp", "toy")
    # a manifest whose architecture no longer matches its weights is refused, not crashed on
    edited["architecture"]["d_model"] = 24
    rewrite_manifest(stored.path, edited)
    with pytest.raises(ModelStoreError, match="weights do not fit"):
        load(store.load("mrrp", "toy"))


def test_clinical_table_through_the_same_model(tmp_path):
    table, schema = gbsg2.export_table(tmp_path)
    cohort = cohort_from_table(table, schema)
    assert len(cohort.records) == 686 and int(cohort.event.sum()) == 299
    config = config_for(cohort)
    assert config.compensated == ("wsi", "us")  # slide and ultrasound by their learned vectors
    result = CliRunner().invoke(main, ["train", "--table", str(table), "--schema", str(schema),
                                       "--out", str(tmp_path / "models"), "--max-epochs", "15",
                                       "--no-tune", "--json"])
    assert result.exit_code == 0, result.output
    stored = json.loads(result.stdout)
    report = tmp_path / "report"
    evaluated = CliRunner().invoke(main, ["evaluate", "--table", str(table), "--schema",
                                          str(schema), "--model", stored["path"], "--out",
                                          str(report)])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["n"] == 686 and 0.6 < metrics["c_index"] < 0.8
    for name in ("predictions.csv", "km_by_risk_group.png", "td_auc.png", "calibration.png",
                 "decision_curve_60m.png"):
        assert (report / name).stat().st_size > 0
    assert set(metrics["td_auc"]) == {"36", "60", "84"}


def test_gbsg2_benchmark_small(tmp_path):
    result = CliRunner().invoke(main, ["benchmark", "gbsg2", "--folds", "3", "--repeats", "1",
                                       "--max-epochs", "20", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    models = body["models"]
    assert set(models) == {"coxph", "rsf", "mrrp"}
    versus = body["paired"]["mrrp - rsf"]
    assert versus["per_split"] == pytest.approx(
        np.subtract(models["mrrp"]["c_index"], models["rsf"]["c_index"]), abs=2e-4)
    assert versus["splits"] == 3 and 0 <= versus["mrrp_at_least_as_high"] <= 3
    print(f"\nGBSG2 1x3 CV: { {k: v['c_index_mean'] for k, v in models.items()} }")
    assert 0.62 < models["coxph"]["c_index_mean"] < 0.72
    assert models["mrrp"]["c_index_mean"] >= models["coxph"]["c_index_mean"] - 0.03
