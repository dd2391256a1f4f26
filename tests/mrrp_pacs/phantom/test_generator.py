import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message as hl7apy_parse
from orthanc import running_orthanc, storescu
from phantoms import SMALL
from validators import dciodvfy
from wsidicom import WsiDicom

from listeners.file_drop import ingest_paths
from mrrp_pacs.cases import list_cases
from mrrp_pacs.cli import main
from mrrp_pacs.clinical_schema import load_schema
from mrrp_pacs.config import load_config
from mrrp_pacs.hl7.message import parse_message
from mrrp_pacs.intake import Intake
from mrrp_pacs.phantom.cohort import HAZARD_CLINICAL, TRAITS, hazard_coefficients, hazard_design
from mrrp_pacs.phantom.generator import PhantomSpec, generate
from mrrp_pacs.phantom.messages import PATHOLOGY_OBSERVATIONS
from mrrp_pacs.store import Store


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _truth(root: Path) -> list[dict[str, str]]:
    with (root / "truth.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_layout_and_truth(small_phantom):
    truth = _truth(small_phantom)
    assert len(truth) == SMALL.patients
    assert [k for k in truth[0] if not k.startswith(("latent_", "clinical_"))] == [
        "patient_id", "time_months", "event", "true_log_hazard", "split", "has_wsi", "has_us",
        "has_report", "site"]
    # the clinical columns come last (appended for issue 16), one per variable of the schema
    assert list(truth[0])[-9:] == [f"clinical_{name}" for name in load_schema().names]
    assert {row["site"] for row in truth} == {"A"}  # one site unless --sites says more
    assert {"latent_nuclear_size", "latent_lymphocytes", "latent_us_margin"} <= set(truth[0])
    for row in truth:
        folder = small_phantom / "dicom" / row["patient_id"]
        assert (folder / "slide" / "level-0.dcm").exists() == (row["has_wsi"] == "1")
        assert (folder / "slide" / "tumour-region.dcm").exists() == (row["has_wsi"] == "1")
        assert (folder / "us" / "image.dcm").exists() == (row["has_us"] == "1")
        assert (folder / "us" / "lesion-roi.dcm").exists() == (row["has_us"] == "1")
        report = small_phantom / "hl7" / f"{row['patient_id']}-us-report.hl7"
        assert report.exists() == (row["has_report"] == "1")
        assert (small_phantom / "hl7" / f"{row['patient_id']}-pathology.hl7").exists()
    summary = json.loads((small_phantom / "phantom.json").read_text())
    assert summary["spec"]["seed"] == SMALL.seed
    assert "oracle_c_index" in summary and summary["n_test"] == 1


def test_truth_holds_the_pathology_values_and_rebuilds_the_true_hazard(small_phantom):
    """truth.csv alone rebuilds the log hazard: its clinical_* columns are the pathology
    result's OBX-5 values, and hazard_design × hazard_coefficients gives true_log_hazard."""
    truth = _truth(small_phantom)
    variable_of = {code.split("^")[0]: name for name, _, code, _ in PATHOLOGY_OBSERVATIONS}
    for row in truth:
        message = parse_message(
            (small_phantom / "hl7" / f"{row['patient_id']}-pathology.hl7").read_bytes())
        seen = {}
        for segment in message.segments:
            if segment.name == "OBX" and message.component(segment, 3, 1) in variable_of:
                seen[variable_of[message.component(segment, 3, 1)]] = message.unescape(
                    message.component(segment, 5, 1))
        assert seen == {name: row[f"clinical_{name}"] for name in variable_of.values()}
    traits = {t: np.array([float(r[f"latent_{t}"]) for r in truth]) for t in TRAITS}
    clinical = {v: np.array([float(r[f"clinical_{v}"]) for r in truth]) for v in HAZARD_CLINICAL}
    design, names = hazard_design(traits, clinical)
    assert design.shape == (len(truth), 16) and names[-1] == "nuclear_size*us_margin"
    signal = json.loads((small_phantom / "phantom.json").read_text())["spec"]["signal"]
    eta = design @ hazard_coefficients(signal)
    # latents are written with 6 decimals: the rebuilt hazard agrees to that precision
    assert np.abs(eta - [float(r["true_log_hazard"]) for r in truth]).max() < 2e-5


def test_same_seed_same_bytes_whatever_the_workers(small_phantom, tmp_path):
    again = tmp_path / "again"
    generate(SMALL, again, workers=1)
    assert _hashes(again) == _hashes(small_phantom)
    other = tmp_path / "other"
    generate(PhantomSpec(**{**SMALL.__dict__, "seed": 4}), other, workers=2)
    theirs = _hashes(other)
    mine = _hashes(small_phantom)
    assert not set(mine.values()) & set(theirs.values())


@pytest.mark.needs_tool("dciodvfy")
def test_every_dicom_object_passes_dciodvfy(small_phantom):
    files = sorted(small_phantom.rglob("*.dcm"))
    assert len(files) >= 4 * 4
    for path in files:
        errors, warnings = dciodvfy(path)
        assert errors + warnings == [], f"{path.relative_to(small_phantom)}: {errors + warnings}"


def test_slides_open_with_wsidicom_at_every_level(small_phantom):
    slides = sorted(small_phantom.glob("dicom/*/slide"))
    assert slides
    for folder in slides:
        with WsiDicom.open(folder) as wsi:
            assert len(wsi.levels) >= 3
            for level in wsi.levels:
                assert level.mpp.width == pytest.approx(0.5 * 2**level.level)
                region = wsi.read_region((0, 0), level.level, (64, 64))
                assert region.size == (64, 64)
            assert wsi.size.width == SMALL.slide_px


def test_every_message_parses_with_hl7apy_and_carries_the_variables(small_phantom):
    messages = sorted((small_phantom / "hl7").glob("*.hl7"))
    assert messages
    for path in messages:
        raw = path.read_bytes()
        # strict: the ORU_R01 group structure and every datatype are validated
        theirs = hl7apy_parse(raw.decode("utf-8"), validation_level=VALIDATION_LEVEL.STRICT,
                              find_groups=True)
        ours = parse_message(raw)
        assert theirs.msh.msh_10.value == ours.get("MSH-10")
        assert ours.get("MSH-12") == "2.5" and ours.get("MSH-9") == "ORU"
        if path.name.endswith("-pathology.hl7"):
            codes = [ours.component(s, 3, 1) for s in ours.segments if s.name == "OBX"]
            assert {"30525-0", "21889-1", "21893-3", "85330-9"} <= set(codes)
        else:
            text = ours.text
            assert "FINDINGS:" in text and re.search(r"BI-RADS (4A|4B|4C|5)", text)


def test_ingest_shows_the_expected_modalities(small_phantom, tmp_path):
    config = load_config(None, environ={}).with_db(tmp_path / "db.sqlite3")
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        summary = ingest_paths(Intake(store, config), [small_phantom])
        cases = {c.patient_id: c for c in list_cases(store, config)}
    assert {Path(r.path).name for r in summary.rejected} >= {"truth.csv", "phantom.json"}
    assert all(Path(r.path).suffix in (".csv", ".json", ".gz") for r in summary.rejected)
    for row in _truth(small_phantom):
        expected = ["wsi", "wsi_roi"] * (row["has_wsi"] == "1") + \
            ["us_image", "us_roi"] * (row["has_us"] == "1") + \
            ["us_report"] * (row["has_report"] == "1") + ["clinical"]
        case = cases[row["patient_id"]]
        assert case.modalities == expected
        assert len(case.clinical_variables) == 9
        assert case.ready == (row["has_wsi"] == "1" or row["has_us"] == "1")


@pytest.mark.needs_tool("Orthanc", "storescu")
def test_orthanc_accepts_every_object(small_phantom, tmp_path):
    files = list(small_phantom.rglob("*.dcm"))
    with running_orthanc(tmp_path / "orthanc") as pacs:
        result = storescu(pacs, small_phantom / "dicom")
        assert result.returncode == 0, result.stdout + result.stderr
        stats = pacs.statistics()
    assert stats["CountInstances"] == len(files)
    assert stats["CountPatients"] == SMALL.patients - sum(
        1 for r in _truth(small_phantom) if r["has_wsi"] == "0" and r["has_us"] == "0")


def test_cli_writes_and_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "p"
    runner = CliRunner()
    result = runner.invoke(main, ["phantom", "--patients", "2", "--seed", "9", "--out", str(out),
                                  "--slide-px", "512", "--workers", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["spec"]["patients"] == 2
    again = runner.invoke(main, ["phantom", "--patients", "2", "--seed", "9", "--out", str(out)])
    assert again.exit_code == 1 and "is not empty" in again.output
    bad = runner.invoke(main, ["phantom", "--patients", "2", "--seed", "9", "--out",
                               str(tmp_path / "q"), "--signal", "wsi=strong"])
    assert bad.exit_code == 2 and "weight 'strong' of wsi is not a number" in bad.output
    bad = runner.invoke(main, ["phantom", "--patients", "2", "--seed", "9", "--out",
                               str(tmp_path / "q"), "--missing-us", "1.5"])
    assert bad.exit_code == 2 and "--missing-us must be between 0 and 1" in bad.output
    assert np.isfinite(json.loads(result.stdout)["weibull"]["scale_months"])


def test_tumour_region_is_read_back_in_slide_coordinates(small_phantom):
    from mrrp_pacs.intake.dicom import read_meta

    path = next(small_phantom.glob("dicom/*/slide/tumour-region.dcm"))
    level0 = read_meta(path.parent / "level-0.dcm")
    (roi,) = read_meta(path).rois
    assert (roi.kind, roi.graphic_type, roi.coordinate_space) == \
        ("annotation_group", "POLYGON", "frame_mm")
    assert roi.referenced_sop_instance_uid == level0.sop_instance_uid
    points = np.array(roi.shapes[0])
    assert points.shape == (96, 3) and np.all(points[:, 2] == 0)
    side_mm = SMALL.slide_px * SMALL.mpp / 1000
    assert np.all((points[:, :2] > 0) & (points[:, :2] < side_mm))


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--event-fraction", "1.5", "--event-fraction must be between"),
    ("--test-fraction", "1", "--test-fraction must be at least 0 and below 1"),
    ("--signal", "wsi=1,pet=2", "--signal: unknown modality ['pet']"),
])
def test_cli_refuses_impossible_cohorts_before_writing(tmp_path, option, value, message):
    result = CliRunner().invoke(main, ["phantom", "--patients", "2", "--seed", "1", "--out",
                                       str(tmp_path / "p"), option, value])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "p").exists()


def test_written_cohort_is_the_one_on_disk_and_redraws_only_outcomes(small_phantom):
    from mrrp_pacs.phantom.generator import written_cohort

    truth = _truth(small_phantom)
    drawn = written_cohort(small_phantom)
    assert drawn.ids == [row["patient_id"] for row in truth]
    assert [f"{t:.1f}" for t in drawn.time_months] == [row["time_months"] for row in truth]
    assert list(drawn.split) == [row["split"] for row in truth]
    powered = written_cohort(small_phantom, event_fraction=0.6, test_fraction=0.5)
    assert np.array_equal(powered.traits["nuclear_size"], drawn.traits["nuclear_size"])
    assert np.array_equal(powered.has_us, drawn.has_us)
    assert powered.weibull_scale < drawn.weibull_scale
