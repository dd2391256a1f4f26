"""The features recover what the phantom planted (issue: Spearman over patients vs latent_*).

A 60-patient phantom (2048-px slides, every modality present) is ingested and extracted with
two workers; a second extraction must compute nothing. Figures are printed (run with -s).
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from phantoms import extracted_phantom
from scipy.stats import spearmanr

from mrrp_pacs.cli import main
from mrrp_pacs.config import load_config
from mrrp_pacs.features.cache import FeatureCache
from mrrp_pacs.phantom.generator import PhantomSpec
from mrrp_pacs.store import Store

SPEC = PhantomSpec(patients=60, seed=5, slide_px=2048, missing_wsi=0.0, missing_us=0.0,
                   missing_report=0.0)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("signal")
    db, env, first = extracted_phantom(root, SPEC, max_tiles=24)
    second = CliRunner().invoke(main, ["extract", "--json", *db], env=env)
    config = load_config(None, environ={}).with_db(Path(db[1]))
    with (root / "phantom" / "truth.csv").open() as handle:
        truth = {row["patient_id"]: row for row in csv.DictReader(handle)}
    return config, first, json.loads(second.stdout), truth


def _per_patient(config, family):
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        cache = FeatureCache(store)
        keys = [r[0] for r in store.conn.execute(
            "SELECT DISTINCT patient_key FROM features WHERE family = ?", (family,))]
        return {key.split("^")[0]: cache.current(key, family) for key in keys}


def test_all_extracted_and_the_rerun_computes_nothing(extracted):
    _, first, second, _ = extracted
    print(f"\nfirst extract: {first['computed']} computed; rerun: {second['computed']} computed,"
          f" {second['cached']} cached")
    assert first["failed"] == [] and first["computed"] == 60 * 6
    assert second["computed"] == 0 and second["cached"] == 60 * 6


def test_nuclear_size_and_lymphocytes_are_recovered(extracted):
    config, _, _, truth = extracted
    nuclei = _per_patient(config, "nuclei")
    ids = sorted(nuclei)
    area, inflammatory = [], []
    for pid in ids:
        features = nuclei[pid]
        names = features.meta["morphology_names"]
        morphology = features.arrays["morphology"]
        counts = features.arrays["counts"]  # (tiles, 4): tumour, inflammatory, stromal, normal
        tumour = counts[:, 0]
        column = names.index("tumour_area_um2_mean")
        area.append(np.average(morphology[:, column], weights=np.maximum(tumour, 1e-9)))
        inflammatory.append(counts[:, 1].sum() / max(counts.sum(), 1))
    rho_size = spearmanr(area, [float(truth[p]["latent_nuclear_size"]) for p in ids]).statistic
    rho_lymph = spearmanr(inflammatory,
                          [float(truth[p]["latent_lymphocytes"]) for p in ids]).statistic
    print(f"\nSpearman over {len(ids)} patients: mean tumour nuclear area vs nuclear_size "
          f"{rho_size:.3f}; inflammatory fraction vs lymphocytes {rho_lymph:.3f}")
    assert rho_size >= 0.8
    assert rho_lymph >= 0.8


def test_a_radiomics_feature_follows_the_margin(extracted):
    config, _, _, truth = extracted
    radiomics = _per_patient(config, "radiomics")
    ids = sorted(radiomics)
    margin = [float(truth[p]["latent_us_margin"]) for p in ids]
    first = radiomics[ids[0]]
    best = (0.0, "")
    for t, token_features in enumerate(first.meta["feature_names"]):
        for f, name in enumerate(token_features):
            values = [radiomics[p].arrays["tokens"][t, f] for p in ids]
            if np.ptp(values) == 0:
                continue
            rho = spearmanr(values, margin).statistic
            if abs(rho) > abs(best[0]):
                best = (rho, f"{first.meta['token_names'][t]}/{name}")
    print(f"\nbest single radiomics feature vs us_margin over {len(ids)} patients: "
          f"{best[1]} Spearman {best[0]:.3f}")
    assert abs(best[0]) >= 0.6
