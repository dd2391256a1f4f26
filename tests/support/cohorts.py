"""Small model cohorts built in memory (no phantom, no extraction): one slide family whose
first feature carries the hazard, and two clinical variables (age, grade)."""

import numpy as np

from mrrp_pacs.model.dataset import Cohort, Outcome, PatientRecord


def tile_cohort(n: int = 300, seed: int = 0, *, tiles: int = 6, dim: int = 5,
                hazard: float = 1.5, follow_up: tuple[float, float] = (20, 150),
                test_every: int = 4) -> Cohort:
    """``n`` patients with ``tiles`` × ``dim`` slide tokens; tile feature 0 is a per-patient
    latent value (plus noise) and the event time is exponential with log hazard
    ``hazard`` × latent; every ``test_every``-th patient is in the test split."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal(n)
    records = []
    for i in range(n):
        values = rng.standard_normal((tiles, dim)).astype(np.float32)
        values[:, 0] = latent[i] + 0.5 * values[:, 0]
        time = rng.exponential(60 * np.exp(-hazard * latent[i]))
        follow = rng.uniform(*follow_up)
        records.append(PatientRecord(
            f"T{i:03d}", {"wsi_deep": values},
            {"wsi": rng.uniform(0, 500, (tiles, 2)).astype(np.float32)},
            np.array([rng.normal(50, 10), rng.integers(0, 3)], np.float32), np.zeros(2, bool),
            Outcome(float(min(time, follow)), bool(time <= follow),
                    "test" if i % test_every == 0 else "train")))
    return Cohort(records, [("age", "continuous", 0), ("grade", "categorical", 3)],
                  {"wsi": ["toy", "1"]}, "toy")
