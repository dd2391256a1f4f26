"""End to end on a small phantom: ingest → train the US encoder → extract → cached rerun."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from listeners.file_drop import ingest_paths
from mrrp_pacs.cli import main
from mrrp_pacs.config import Config, load_config
from mrrp_pacs.errors import ModelUnavailable
from mrrp_pacs.features import pipeline
from mrrp_pacs.features.cache import FeatureCache
from mrrp_pacs.features.families import FAMILY_NAMES, family_named
from mrrp_pacs.intake import Intake
from mrrp_pacs.model.dataset import FAMILY_SOURCES
from mrrp_pacs.phantom.generator import PhantomSpec, generate
from mrrp_pacs.store import Store

SPEC = PhantomSpec(patients=10, seed=21, slide_px=1024, missing_wsi=0.2, missing_us=0.2,
                   missing_report=0.2)


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> tuple[Path, Config]:
    root = tmp_path_factory.mktemp("pipeline")
    generate(SPEC, root / "phantom", workers=2)
    config = load_config(None, environ={}).with_db(root / "state" / "mrrp.sqlite3")
    config = config.replace("paths", model_store=root / "models")
    config = config.replace("features", max_tiles=8)
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        ingest_paths(Intake(store, config), [root / "phantom" / "dicom", root / "phantom" / "hl7"])
    return root, config


def _cli(config: Config, *args: str):
    environ = {"MRRP__PATHS__MODEL_STORE": str(config.paths.model_store_dir),
               "MRRP__FEATURES__MAX_TILES": str(config.features.max_tiles)}
    return CliRunner().invoke(main, [*args, "--db", str(config.paths.db_file)], env=environ)


def test_extract_then_nothing_to_do(state):
    root, config = state
    trained = _cli(config, "train-encoder", "us", "--epochs", "1")
    assert trained.exit_code == 0, trained.output
    assert "promoted" in trained.output

    first = _cli(config, "extract", "--json")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["failed"] == [] and summary["computed"] > 0 and summary["cached"] == 0
    second = json.loads(_cli(config, "extract", "--json").stdout)
    assert second["computed"] == 0 and second["cached"] == summary["computed"]

    truth = {row.split(",")[0]: row.split(",") for row in
             (root / "phantom" / "truth.csv").read_text().splitlines()[1:]}
    cases = json.loads(_cli(config, "cases", "--json").stdout)
    for case in cases:
        row = truth[case["patient_id"]]
        has_wsi, has_us, has_report = row[5] == "1", row[6] == "1", row[7] == "1"
        expected = {"clinical"} | ({"wsi", "nuclei"} if has_wsi else set()) | (
            {"us", "radiomics"} if has_us else set()) | ({"text"} if has_report else set())
        assert set(case["features"]) == expected, case["patient_id"]


def test_shapes_and_tokens(state):
    _, config = state
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        cache = FeatureCache(store)
        keys = [row[0] for row in store.conn.execute(
            "SELECT DISTINCT patient_key FROM features WHERE family = 'nuclei'")]
        assert keys
        wsi = cache.current(keys[0], "wsi")
        nuclei = cache.current(keys[0], "nuclei")
        assert wsi is not None and nuclei is not None
        n = wsi.arrays["deep"].shape[0]
        assert 1 <= n <= 8
        assert nuclei.arrays["morphology"].shape[0] == n == nuclei.arrays["topology"].shape[0]
        assert np.allclose(wsi.arrays["positions_um"], nuclei.arrays["positions_um"])
        assert np.isfinite(nuclei.arrays["topology"]).all()
        us_key = store.conn.execute(
            "SELECT patient_key FROM features WHERE family = 'us' LIMIT 1").fetchone()[0]
        us = cache.current(us_key, "us")
        assert us is not None and us.arrays["tokens"].shape == (256, 64)
        radiomics = cache.current(us_key, "radiomics")
        assert radiomics is not None and radiomics.arrays["tokens"].ndim == 2
        # the phantom's SR holds a traced outline: both families describe it, not its box
        for features in (us, radiomics):
            assert features.meta["roi_shape"] == "outline" and features.meta["frame"] >= 1
            assert features.arrays["roi_is_outline"].tolist() == [True]
        text_key = store.conn.execute(
            "SELECT patient_key FROM features WHERE family = 'text' LIMIT 1").fetchone()[0]
        text = cache.current(text_key, "text")
        assert text is not None and text.arrays["tokens"].shape[1] == 384


def test_every_family_stores_the_arrays_its_registry_entry_names(state):
    _, config = state
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        rows = store.conn.execute("SELECT family, meta FROM features").fetchall()
    assert {family for family, _ in rows} == set(FAMILY_NAMES)
    for family, meta in rows:
        assert set(json.loads(meta)["shapes"]) == set(family_named(family).arrays), family
    for family, array in FAMILY_SOURCES.values():  # what the model reads is stored
        assert array in family_named(family).arrays, (family, array)


def test_a_new_extractor_version_recomputes_only_its_family(state, monkeypatch):
    _, config = state
    from mrrp_pacs.features import radiomics

    monkeypatch.setattr(radiomics, "RADIOMICS_VERSION", "test-bump")
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        summary = pipeline.extract(store, config)
    recomputed = {o.family for o in summary.outcomes if o.status == "computed"}
    assert recomputed == {"radiomics"}
    assert summary.failures == []


def test_an_unusable_input_is_reported_and_writes_nothing(state, tmp_path):
    _, config = state
    broken = dataclasses.replace(config, features=dataclasses.replace(
        config.features, wsi_encoder="uni"))  # no checkpoint configured
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        before = store.conn.execute("SELECT count(*) FROM features").fetchone()[0]
        with pytest.raises(ModelUnavailable, match=r"tile encoder.*uni"):
            pipeline.extract(store, broken, families=("wsi",))
        assert store.conn.execute("SELECT count(*) FROM features").fetchone()[0] == before


def test_encoder_leaves_the_test_split_out(state):
    """With --outcomes, the US encoder trains on the crops of non-test patients only."""
    root, config = state
    rows = [line.split(",") for line in (root / "phantom" / "truth.csv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    split, has_us = header.index("split"), header.index("has_us")
    test = {row[0] for row in rows if row[split] == "test"}
    assert test and any(row[has_us] == "1" for row in rows if row[0] in test)
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        every, _ = pipeline.lesion_crops(store, config)
        without, _ = pipeline.lesion_crops(store, config, exclude=test)
    with_us_in_test = sum(row[has_us] == "1" for row in rows if row[0] in test)
    assert len(every) == sum(row[has_us] == "1" for row in rows)
    assert len(without) == len(every) - with_us_in_test

    trained = _cli(config, "train-encoder", "us", "--epochs", "1", "--no-promote",
                   "--outcomes", str(root / "phantom" / "truth.csv"))
    assert trained.exit_code == 0, trained.output
    assert f"leaving out the {len(test)} test patients" in trained.output
    assert f"on {len(without)} crops" in trained.output
