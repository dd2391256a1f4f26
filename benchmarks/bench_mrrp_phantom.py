"""The MRRP model on an extracted phantom: the paper's ablations beside the phantom's oracle.

Run: ``.venv/bin/python benchmarks/bench_mrrp_phantom.py DB TRUTH_CSV OUT [seeds] [max_epochs]``
where DB holds the extracted phantom (``mrrp-pacs extract``) and TRUTH_CSV is its truth.csv
(train/test split and outcomes). Writes OUT/ablation.md and OUT/ablation.json and prints them,
with the oracle C-index (true log hazard) on the same test patients and the wall time.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import numpy as np

from mrrp_pacs.config import load_config
from mrrp_pacs.model.ablation import run_ablation, write_ablation
from mrrp_pacs.model.dataset import cohort_from_store, read_outcomes
from mrrp_pacs.model.evaluate import harrell_c
from mrrp_pacs.model.train import TrainSettings
from mrrp_pacs.store import Store


def main() -> None:
    db, truth_csv, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    seeds = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    max_epochs = int(sys.argv[5]) if len(sys.argv) > 5 else 150
    config = load_config(None, environ={}).with_db(db)
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        cohort = cohort_from_store(store, config, read_outcomes(truth_csv))
    with truth_csv.open() as handle:
        truth = [row for row in csv.DictReader(handle) if row["split"] == "test"]
    oracle = harrell_c(np.array([float(r["time_months"]) for r in truth]),
                       np.array([r["event"] == "1" for r in truth]),
                       np.array([float(r["true_log_hazard"]) for r in truth]))
    start = time.perf_counter()
    result = run_ablation(cohort, TrainSettings(max_epochs=max_epochs), seeds=seeds)
    result["oracle_c_index"] = round(oracle, 4)
    write_ablation(result, out)
    print((out / "ablation.md").read_text())
    print(f"oracle C-index on the same test patients: {oracle:.4f}; "
          f"{time.perf_counter() - start:.0f} s for {len(result['arms'])} arms x {seeds} seed(s)")


if __name__ == "__main__":
    main()
