"""All feature families for one default phantom patient (4096-px slide), on these cores.

Run: ``.venv/bin/python benchmarks/bench_features.py [patients]`` (default 4). Writes a
phantom with every modality, ingests it, trains a throwaway US encoder on random crops, then
extracts patient by patient in one process: the first patient pays for loading the models
(reported apart), the others give the per-family medians and the per-patient total.

The nuclei family is also timed the old way, side by side: each sampled tile segmented on its
own, no margin, one graph over the tiles' nuclei (nuclei on shared tile edges counted twice),
as before the region path (``mrrp_pacs/features/region.py``). Both times include reading the
tiles (each family run reads them); the new one also reads its blocks.
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
from mrrp_pacs.features import morphology, topology
from mrrp_pacs.features.families import FAMILY_NAMES
from mrrp_pacs.features.nuclei import NucleusSegmenter
from mrrp_pacs.features.pipeline import Extractor, FamilyStatus, _Patient
from mrrp_pacs.features.us_encoder import save_us_encoder, train_us_encoder
from mrrp_pacs.intake import Intake
from mrrp_pacs.phantom.generator import PhantomSpec, generate
from mrrp_pacs.store import Store


def old_per_tile_nuclei(tiles_rgb: np.ndarray, centres_um: np.ndarray, mpp: float,
                        segmenter: NucleusSegmenter) -> int:
    """The nuclei family before the region path; returns the number of graph nodes."""
    tile_um = tiles_rgb.shape[1] * mpp
    xy_um, kinds, patch = [], [], []
    for index, rgb in enumerate(tiles_rgb):
        found = segmenter.segment(rgb, mpp)
        per_nucleus, _ = morphology.nucleus_features(rgb, found, mpp)
        morphology.patch_token(per_nucleus, found.kinds, whole=~found.touches_border)
        origin = centres_um[index] - tile_um / 2
        xy_um.append(origin + np.asarray(found.centroids_px, dtype=np.float64) * mpp)
        kinds.append(np.asarray(found.kinds, dtype=np.int64))
        patch.append(np.full(len(found.kinds), index))
    all_kinds = np.concatenate(kinds)
    node, _ = topology.node_features(np.concatenate(xy_um), all_kinds)
    topology.patch_tokens(node, all_kinds, np.concatenate(patch), len(tiles_rgb))
    return len(all_kinds)


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
            timings: dict[str, list[tuple[float, float]]] = {f: [] for f in FAMILY_NAMES}
            totals: list[tuple[float, float]] = []
            old_nuclei: list[tuple[float, float]] = []
            nodes_old: list[int] = []
            nodes_new: list[int] = []
            for index, inputs in enumerate(case_inputs(store, config).values()):
                patient_clock = _Clock()
                for family in FAMILY_NAMES:
                    clock = _Clock()
                    (outcome,) = extractor.run(inputs, (family,), force=True)
                    assert outcome.status == FamilyStatus.COMPUTED, outcome
                    if index:
                        timings[family].append(clock.read())
                elapsed = patient_clock.read()
                clock = _Clock()
                tiles = _Patient(inputs, store, config).tiles  # as each family run reads them
                nodes = old_per_tile_nuclei(tiles.rgb, tiles.centres_um, tiles.mpp,
                                            extractor.encoders.segmenter)
                if index:
                    old_nuclei.append(clock.read())
                    totals.append(elapsed)
                    nodes_old.append(nodes)
                    found = extractor.cache.current(inputs.patient_key, "nuclei")
                    assert found is not None
                    nodes_new.append(int(found.meta["graph_nuclei"]))
                else:
                    print(f"first patient (loads the text, tile and US models): "
                          f"{elapsed[0]:.2f} s")
    print(f"per patient, {patients - 1} warm patients, one process, max_tiles "
          f"{config.features.max_tiles}; medians of wall time and of the process's CPU time "
          "(all its threads; on a loaded machine CPU time is the steadier figure):")
    print("                        wall      cpu")
    for family, values in timings.items():
        print(f"  {family:<16} {_median(values)}")
    print(f"  total            {_median(totals)}  (target: <= 10 s)")
    print(f"nuclei family, old (per tile, {config.features.max_tiles} tiles) vs new (region "
          f"blocks of {config.features.nuclei_block_tiles}x{config.features.nuclei_block_tiles}"
          f" tiles, <= {config.features.nuclei_region_mm2} mm²):")
    print(f"  old              {_median(old_nuclei)}  {statistics.median(nodes_old):6.0f} "
          "graph nuclei")
    print(f"  new              {_median(timings['nuclei'])}  "
          f"{statistics.median(nodes_new):6.0f} graph nuclei")


class _Clock:
    """Wall and process CPU time since creation."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _median(values: list[tuple[float, float]]) -> str:
    return (f"{statistics.median(v[0] for v in values):6.2f} s "
            f"{statistics.median(v[1] for v in values):6.2f} s")


if __name__ == "__main__":
    main()
