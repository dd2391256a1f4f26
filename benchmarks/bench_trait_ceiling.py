"""How much of the phantom's hazard the extracted features can carry: ceilings on one split.

Run (after ``bench_mrrp_phantom.py`` wrote OUT/outcomes.csv for the same extracted phantom)::

    .venv/bin/python benchmarks/bench_trait_ceiling.py --db STATE/mrrp.sqlite3 \\
        --phantom PHANTOM_DIR --outcomes OUT/outcomes.csv [--event-fraction 0.4] \\
        [--test-fraction 0.3333]

Every row is a ridge Cox (α 0.1) fitted on the training split and scored (Harrell's C) on the
test split:

- the true hazard's own design (the correctly specified ceiling, ``cox_true_form``);
- the true traits and clinical terms, traits of a modality a patient lacks set to 0 with a
  missing indicator (the ceiling of any model that reads the images: a slide that is not there
  says nothing);
- the same, with the traits **predicted** from the extracted features (a ridge map per trait
  from its modality's feature components, fitted on training patients): what a model that
  recovers the traits linearly from these features can reach; and per trait, predicting only
  that one (the cost of each trait's recovery);
- the clinical terms alone.

It also prints, per trait, the correlation of the predicted with the true trait on the test
patients who have the modality. The same ceilings over many cohorts (no images), with the exact
ceiling given the observed data: ``bench_observed_ceiling.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.linear_model import RidgeCV
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.util import Surv

from mrrp_pacs.config import load_config
from mrrp_pacs.model.baselines import patient_features
from mrrp_pacs.model.dataset import cohort_from_store, read_outcomes
from mrrp_pacs.model.evaluate import harrell_c
from mrrp_pacs.phantom.cohort import (
    TRAITS,
    clinical_terms,
    hazard_design,
)
from mrrp_pacs.phantom.generator import written_cohort
from mrrp_pacs.store import Store

FAMILY_PREFIX = {"wsi": "wsi_", "us": ("us_deep", "us_radiomics"), "text": "us_text"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--phantom", type=Path, required=True)
    parser.add_argument("--outcomes", type=Path, required=True)
    parser.add_argument("--event-fraction", type=float, default=0.4)
    parser.add_argument("--test-fraction", type=float, default=1 / 3)
    args = parser.parse_args()
    drawn = written_cohort(args.phantom, event_fraction=args.event_fraction,
                           test_fraction=args.test_fraction)
    config = load_config(None, environ={}).with_db(args.db)
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        cohort = cohort_from_store(store, config, read_outcomes(args.outcomes))
    position = {pid: i for i, pid in enumerate(drawn.ids)}
    rows = np.array([position[r.patient_id] for r in cohort.records])
    train = np.flatnonzero(cohort.split == "train")
    test = np.flatnonzero(cohort.split == "test")
    time, event = cohort.time, cohort.event

    def cox(design: np.ndarray) -> float:
        model = CoxPHSurvivalAnalysis(alpha=0.1).fit(design[train],
                                                     Surv.from_arrays(event[train], time[train]))
        return harrell_c(time[test], event[test], model.predict(design[test]))

    traits = {k: v[rows] for k, v in drawn.traits.items()}
    clinical = {k: v[rows] for k, v in drawn.clinical.items()}
    terms = np.stack(list(clinical_terms(clinical).values()), 1)
    has = {"wsi": drawn.has_wsi[rows], "us": drawn.has_us[rows], "text": drawn.has_report[rows]}
    true = np.stack([traits[k] for k in TRAITS], 1)
    mask = np.stack([has[TRAITS[k]] for k in TRAITS], 1)
    indicators = np.stack([~has[m] for m in ("wsi", "us", "text")], 1)

    features = patient_features(cohort, train, components=8)
    x = features(np.arange(len(cohort.records)))
    names = features.names
    predicted = np.zeros_like(true)
    print("trait recovery (test patients with the modality): Pearson r of predicted vs true")
    for j, trait in enumerate(TRAITS):
        modality = TRAITS[trait]
        prefix = FAMILY_PREFIX[modality]
        columns = [c for c, n in enumerate(names) if n.startswith(prefix)]
        having = np.flatnonzero(has[modality])
        fit = np.intersect1d(train, having)
        ridge = RidgeCV(alphas=np.logspace(-2, 3, 12)).fit(x[fit][:, columns], true[fit, j])
        predicted[having, j] = ridge.predict(x[having][:, columns])
        scored = np.intersect1d(test, having)
        r = np.corrcoef(predicted[scored, j], true[scored, j])[0, 1]
        print(f"  {trait:<18} {r:.3f}")
    design, _ = hazard_design(traits, clinical)
    print(f"\n{len(train)} train / {len(test)} test patients, {int(event[test].sum())} test "
          "events; ridge Cox, Harrell C on the test split")
    print(f"  true form (ceiling)                          {cox(design):.4f}")
    print(f"  true traits + clinical terms (no interaction) {cox(np.hstack([true, terms])):.4f}")
    seen = np.hstack([true * mask, terms, indicators])
    print(f"  traits as the images show them (missing = 0)  {cox(seen):.4f}")
    print(f"  predicted traits + clinical terms            "
          f"{cox(np.hstack([predicted, terms, indicators])):.4f}")
    print(f"  clinical terms only                          {cox(terms):.4f}")
    print("  one trait predicted, the others as the images show them:")
    for j, trait in enumerate(TRAITS):
        one = true * mask
        one[:, j] = predicted[:, j]
        print(f"    {trait:<18} {cox(np.hstack([one, terms, indicators])):.4f}")


if __name__ == "__main__":
    main()
