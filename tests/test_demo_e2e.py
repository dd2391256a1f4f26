"""`mrrp-pacs demo` end to end on a small cohort: Orthanc, daemon, training, SRs back, summary,
then `mrrp-pacs viewer` on its output; and the file-drop mode used where Orthanc cannot be
installed."""

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pydicom
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEMO = [sys.executable, "-m", "mrrp_pacs", "demo", "--patients", "24", "--slide-px", "1024",
        "--json"]
KEYS = {"received", "scored", "compensated", "srs_stored", "test_events", "test_c_index",
        "test_c_index_ci95", "oracle_c_index", "oracle_c_index_ci95"}


def _orthancs_of(folder) -> list[str]:
    found = subprocess.run(["pgrep", "-af", "Orthanc"], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if str(folder) in line]


def _studies_in(folder) -> set[str]:
    return {str(pydicom.dcmread(path, stop_before_pixels=True,
                                specific_tags=["StudyInstanceUID"]).StudyInstanceUID)
            for path in folder.rglob("*") if path.is_file()}


def _studies_the_viewer_lists(cwd, demo_dir: str) -> set[str]:
    """Start `mrrp-pacs viewer --demo DEMO_DIR` in ``cwd`` and ask it for the studies (QIDO-RS,
    through its proxy to the Orthanc it starts on the demo's storage), as OHIF's list does."""
    viewer = subprocess.Popen([sys.executable, "-m", "mrrp_pacs", "viewer", "--demo", demo_dir,
                               "--port", "0"], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        # "OHIF viewer on http://127.0.0.1:PORT/ (Orthanc …)", or nothing when it failed
        line = viewer.stdout.readline()
        if not line.startswith("OHIF viewer on "):
            viewer.kill()
            raise AssertionError(f"the viewer did not start: {line}{viewer.communicate()[1]}")
        request = urllib.request.Request(f"{line.split()[3]}dicom-web/studies",
                                         headers={"Accept": "application/dicom+json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            studies = json.load(answer)
    finally:
        if viewer.poll() is None:
            viewer.send_signal(signal.SIGTERM)
        viewer.communicate(timeout=60)
    assert viewer.returncode == 0
    return {study["0020000D"]["Value"][0] for study in studies}


@pytest.mark.needs_tool("Orthanc", "libOrthancDicomWeb.so")  # the demo, then the viewer
def test_e2e_demo_scores_every_patient_and_stores_srs_in_orthanc(tmp_path):
    out = tmp_path / "demo"
    # a relative --out, as `make demo` gives: Orthanc takes relative paths against its
    # configuration file's folder, so every path handed to it must be absolute
    run = subprocess.run([*DEMO, "--out", "demo"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
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
    if summary["test_events"] < 10:  # too few to show a C-index (tests/mrrp_pacs/test_demo.py)
        assert summary["test_c_index"] is None and summary["oracle_c_index"] is None
    else:
        low, high = summary["test_c_index_ci95"]
        assert 0 <= low <= summary["test_c_index"] <= high <= 1
    assert len(list((out / "reports").glob("sr-*.dcm"))) == summary["srs_queued"]
    assert len(list((out / "reports").glob("pdf-*.dcm"))) == 24
    assert (out / "reports" / "example.pdf").read_bytes().startswith(b"%PDF-")
    assert (out / "evaluation" / "km_by_risk_group.png").stat().st_size > 10_000
    for step in ("phantom hospital", "PACS", "daemon", "training", "scoring", "results"):
        assert step in run.stderr
    assert _orthancs_of(out) == [], "the demo left its Orthanc running"
    assert (out / "orthanc" / "index").is_dir() and (out / "state" / "models").is_dir()

    # `make viewer` after `make demo`: the viewer restarts the demo's Orthanc on the relative
    # folder and lists every study the phantom sent it, our SRs and PDFs stored within them
    assert _studies_the_viewer_lists(tmp_path, "demo") == _studies_in(out / "phantom" / "dicom")
    assert _orthancs_of(out) == [], "the viewer left its Orthanc running"


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
