"""`mrrp-pacs demo` end to end on a small cohort: Orthanc, daemon, training, SRs back, summary;
and the file-drop mode used where Orthanc cannot be installed."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEMO = [sys.executable, "-m", "mrrp_pacs", "demo", "--patients", "24", "--slide-px", "1024",
        "--json"]
KEYS = {"received", "scored", "compensated", "srs_stored", "test_c_index", "oracle_c_index"}


def _orthancs_of(folder) -> list[str]:
    found = subprocess.run(["pgrep", "-af", "Orthanc"], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if str(folder) in line]


def test_e2e_demo_scores_every_patient_and_stores_srs_in_orthanc(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([*DEMO, "--out", str(out)], capture_output=True, text=True,
                         timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert set(summary) >= KEYS
    assert summary["mode"] == "pacs"
    assert summary["received"] == 24
    assert summary["scored"] == 24  # every phantom patient has clinical data and an image
    assert 0 < summary["compensated"] < 24
    # an SR in each study a result is drawn on: the pathology study, and the US study too
    assert summary["srs_stored"] == summary["srs_queued"] >= summary["scored"]
    assert summary["test_c_index"] is None or 0 <= summary["test_c_index"] <= 1
    assert len(list((out / "reports").glob("sr-*.dcm"))) == summary["srs_queued"]
    assert len(list((out / "reports").glob("pdf-*.dcm"))) == 24
    assert (out / "reports" / "example.pdf").read_bytes().startswith(b"%PDF-")
    assert (out / "evaluation" / "km_by_risk_group.png").stat().st_size > 10_000
    for step in ("phantom hospital", "PACS", "daemon", "training", "scoring", "results"):
        assert step in run.stderr
    assert _orthancs_of(out) == [], "the demo left its Orthanc running"


def test_e2e_demo_file_drop_mode_runs_the_same_pipeline_without_a_pacs(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([*DEMO, "--out", str(out), "--file-drop"], capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["mode"] == "file-drop"
    assert summary["received"] == 24 and summary["scored"] == 24
    assert summary["srs_stored"] == 0
    assert len(list((out / "reports").glob("sr-*.dcm"))) >= 24
