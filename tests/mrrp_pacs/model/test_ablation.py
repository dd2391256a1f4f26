"""The ablation: distinct arms, mixed compensation test sets, paired bootstrap intervals."""

import json

import numpy as np
import pytest

from mrrp_pacs.model.ablation import (
    ARMS,
    MIXED_FRACTION,
    mixed_patients,
    paired_difference,
    run_ablation,
    trainings,
    without,
    write_ablation,
)
from mrrp_pacs.model.dataset import Cohort, Outcome, PatientRecord
from mrrp_pacs.model.train import TrainSettings

FAST = TrainSettings(max_epochs=12, patience=6, tune=False, learning_rate=3e-3)


def imaging_cohort(n=160, seed=0) -> Cohort:
    """Every family, tiny; the hazard lives in the slide and ultrasound tokens, the two
    clinical variables are noise."""
    rng = np.random.default_rng(seed)
    wsi_latent, us_latent = rng.standard_normal(n), rng.standard_normal(n)
    records = []
    for i in range(n):
        def tokens(count, dim, latent):
            values = rng.standard_normal((count, dim)).astype(np.float32)
            values[:, 0] += latent
            return values
        families = {"wsi_deep": tokens(4, 5, wsi_latent[i]), "wsi_morphology": tokens(4, 3, 0),
                    "wsi_topology": tokens(4, 3, 0), "us_deep": tokens(6, 4, us_latent[i]),
                    "us_radiomics": tokens(3, 4, 0), "us_text": tokens(5, 6, 0)}
        positions = {"wsi": rng.uniform(0, 500, (4, 2)).astype(np.float32),
                     "us": rng.uniform(0, 16, (6, 2)).astype(np.float32)}
        time = rng.exponential(60 * np.exp(-1.2 * (wsi_latent[i] + us_latent[i])))
        follow = rng.uniform(20, 150)
        records.append(PatientRecord(
            f"A{i:03d}", families, positions,
            np.array([rng.normal(50, 10), rng.integers(0, 3)], np.float32), np.zeros(2, bool),
            Outcome(float(min(time, follow)), bool(time <= follow),
                    "test" if i % 2 else "train")))
    spec = [("age", "continuous", 0), ("grade", "categorical", 3)]
    return Cohort(records, spec, {}, "imaging toy")


def test_arms_are_distinct_and_complete():
    names = [arm.name for arm in ARMS]
    assert len(set(names)) == len(names)
    seen = {}
    for arm in ARMS:
        if arm.uses is not None:
            continue  # scores another arm's models on other test data
        key = (frozenset(arm.drop_families), arm.no_clinical, repr(arm.overrides))
        assert key not in seen, f"{arm.name} trains what {seen.get(key)} trains"
        seen[key] = arm.name
    groups = {arm.group for arm in ARMS}
    assert {"modality removal", "intramodality features", "fusion strategy", "query choice",
            "missing WSI (mixed test set)", "missing US (mixed test set)"} <= groups
    assert "imaging only (WSI + US)" in names
    assert trainings() == len(ARMS) - 5  # learned vector ×2, drop ×2, US zeros reuse models


def test_paired_difference():
    rng = np.random.default_rng(1)
    time = rng.exponential(10, 300)
    event = rng.random(300) < 0.6
    good = -time + rng.normal(0, 5, 300)
    noise = rng.normal(0, 1, 300)
    same = paired_difference(time, event, [good], [good], n_resamples=200)
    assert same == (0.0, 0.0, 0.0)
    diff, low, high = paired_difference(time, event, [good], [noise], n_resamples=300)
    assert 0 < low < diff < high
    assert diff == pytest.approx(
        _c(time, event, good) - _c(time, event, noise))
    # two seeds: the mean of the per-seed differences
    two = paired_difference(time, event, [good, noise], [noise, noise], n_resamples=50)
    assert two[0] == pytest.approx(diff / 2)


def _c(time, event, risk):
    from mrrp_pacs.model.evaluate import harrell_c
    return harrell_c(time, event, risk)


def test_mixed_test_set_withholds_a_fixed_share():
    cohort = imaging_cohort(80)
    test = cohort.subset(np.flatnonzero(cohort.split == "test"))
    withheld = mixed_patients(test, "wsi", seed=0)
    assert len(withheld) == round(40 * MIXED_FRACTION)
    assert np.array_equal(withheld, mixed_patients(test, "wsi", seed=0))
    mixed = without(test, ("wsi_deep", "wsi_morphology", "wsi_topology"), patients=withheld)
    lacking = [i for i, r in enumerate(mixed.records) if "wsi_deep" not in r.families]
    assert lacking == withheld.tolist()
    assert all("wsi" not in mixed.records[i].positions for i in lacking)
    assert all("us_deep" in r.families for r in mixed.records)
    cleared = without(test, no_clinical=True)
    assert all(r.clinical_missing.all() for r in cleared.records)
    assert all(kind == "categorical" for _, kind, _ in cleared.clinical_spec)


def test_ablation_on_a_cohort_whose_hazard_is_in_the_images(tmp_path):
    cohort = imaging_cohort()
    arms = tuple(a for a in ARMS if a.name in {
        "full", "clinical only", "imaging only (WSI + US)", "WSI: learned vector", "WSI: zeros",
        "WSI: drop the patients", "without report text"})

    def baselines(cohort, train_idx, test_idx, seed):
        return {"first token mean": np.array([r.families["wsi_deep"][:, 0].mean()
                                              + r.families["us_deep"][:, 0].mean()
                                              for r in cohort.subset(test_idx).records])}

    truth = np.array([0.0] * 80)
    result = run_ablation(cohort, FAST, seeds=2, arms=arms, baselines=baselines,
                          references={"constant": truth}, n_resamples=200)
    rows = {row["arm"]: row for row in result["arms"]}
    assert list(rows)[:len(arms)] == [a.name for a in arms]
    assert list(rows)[len(arms):] == ["first token mean", "constant"]
    full, clinical = rows["full"], rows["clinical only"]
    print({r: (v["c_index_mean"], v["difference_ci95"]) for r, v in rows.items()})
    assert len(full["c_index"]) == 2 and full["c_index_mean"] > 0.6
    assert full["c_index_ci95"][0] < full["c_index_mean"] < full["c_index_ci95"][1]
    assert clinical["reference"] == "full" and clinical["difference_ci95"][1] < 0
    assert rows["WSI: zeros"]["reference"] == "WSI: learned vector"
    dropped = rows["WSI: drop the patients"]
    assert dropped["n_test"] == 80 - round(80 * MIXED_FRACTION)
    assert dropped["difference_ci95"] is None and dropped["c_index_ci95"] is not None
    assert rows["constant"]["c_index_mean"] == 0.5
    write_ablation(result, tmp_path)
    table = (tmp_path / "ablation.md").read_text()
    assert "| modality removal | clinical only |" in table and "first token mean" in table
    assert json.loads((tmp_path / "ablation.json").read_text())["seeds"] == 2
