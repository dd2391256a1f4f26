"""All feature families for one default phantom patient (4096-px slide), on these cores.

Run: ``.venv/bin/python benchmarks/bench_features.py [patients]`` (default 4). Writes a
phantom with every modality, ingests it, trains a throwaway US encoder on random crops, then
extracts patient by patient in one process: the first patient pays for loading the models
(reported apart), the others give the per-family medians and the per-patient total.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from listeners.file_drop import ingest_paths
from model_store import ModelStore
from mrrp_pacs.cases import case_inputs
from mrrp_pacs.config import load_config
from mrrp_pacs.features.families import FAMILY_NAMES
from mrrp_pacs.features.pipeline import Extractor, FamilyStatus
from mrrp_pacs.features.us_encoder import save_us_encoder, train_us_encoder
from mrrp_pacs.intake import Intake
from mrrp_pacs.phantom.generator import PhantomSpec, generate
from mrrp_pacs.store import Store


def main() -> None:
    patients = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(PhantomSpec(patients=patients, seed=7, missing_wsi=0.0, missing_us=0.0,
                             missing_report=0.0), root / "phantom")
        config = load_config(None, environ={}).with_db(root / "state" / "db.sqlite3")
        config = config.replace("paths", model_store=root / "models")
        crops = np.random.default_rng(0).uniform(0, 255, (8, 256, 256)).astype(np.float32)
        model, history = train_us_encoder(crops, epochs=1)
        save_us_encoder(ModelStore(root / "models"), model, history, {"benchmark": True})
        with Store(config.paths.db_file, config.paths.objects_dir) as store:
            ingest_paths(Intake(store, config), [root / "phantom"])
            extractor = Extractor(store, config)
            timings: dict[str, list[float]] = {f: [] for f in FAMILY_NAMES}
            totals = []
            for index, inputs in enumerate(case_inputs(store, config).values()):
                start_patient = time.perf_counter()
                for family in FAMILY_NAMES:
                    start = time.perf_counter()
                    (outcome,) = extractor.run(inputs, (family,), force=True)
                    assert outcome.status == FamilyStatus.COMPUTED, outcome
                    if index:
                        timings[family].append(time.perf_counter() - start)
                elapsed = time.perf_counter() - start_patient
                if index:
                    totals.append(elapsed)
                else:
                    print(f"first patient (loads the text, tile and US models): {elapsed:.2f} s")
    print(f"per patient, {patients - 1} warm patients, one process, max_tiles "
          f"{config.features.max_tiles}:")
    for family, values in timings.items():
        print(f"  median {family:<10} {statistics.median(values):6.2f} s")
    print(f"  median total      {statistics.median(totals):6.2f} s  (target: <= 10 s)")


if __name__ == "__main__":
    main()
