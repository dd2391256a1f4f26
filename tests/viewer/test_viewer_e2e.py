"""OHIF v3 over Orthanc's DICOMweb, in Debian's Chromium, end to end: one scored phantom patient
as a reader sees it — the study list, the risk drawn on the ultrasound lesion, the report PDF.

Real parts only: Orthanc with its DICOMweb plugin, dcmtk's storescu, the OHIF build from npm
served by :class:`mrrp_pacs.viewer.ViewerServer`, and Chromium driven by playwright-core
(``viewer_check.mjs``). Screenshots are kept in ``test-artifacts/viewer/``.
"""

from __future__ import annotations

import json
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from orthanc import DICOMWEB_PLUGIN, running_orthanc, storescu
from pydicom.dataset import Dataset
from tools import tool

from exporters.pdf import TrainingKM, build_companion_pdf, build_encapsulated_pdf
from exporters.sr import build_risk_sr
from mrrp_pacs.phantom.generator import PhantomSpec, generate
from mrrp_pacs.results import EvidenceRef, RiskResult, UsRegion
from mrrp_pacs.viewer import INSTALL_COMMAND, VIEWER_DIR, ViewerServer, viewer_files

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.needs_tool("Orthanc", "libOrthancDicomWeb.so", "storescu", "node",
                                     "chromium")]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "viewer"
CHECK_SCRIPT = Path(__file__).with_name("viewer_check.mjs")
ROLES = {"level-0": "wsi", "level-1": "wsi", "level-2": "wsi", "tumour-region": "wsi_roi",
         "image": "us_image", "lesion-roi": "us_roi"}
RISK = 1.234567
# the first line of the label: the group and 100 % minus the recurrence-free probability at 60
# months (83.45 %)
HEADLINE = "MRRP risk high, recurrence within 5 years: 16.55 %"
SHOT_NAMES = ("study-list.png", "sr-on-image.png", "pdf.png")


def required_files() -> None:
    """The OHIF build and playwright-core (npm, not Debian: the programs are the module's
    ``needs_tool``), checked before the test spends time (never skip)."""
    try:
        viewer_files()
    except FileNotFoundError as missing:
        raise AssertionError(str(missing)) from None
    assert (VIEWER_DIR / "node_modules" / "playwright-core" / "package.json").is_file(), \
        f"playwright-core is not installed: run `{INSTALL_COMMAND}`"


def training_km() -> TrainingKM:
    rng = np.random.default_rng(7)
    risk = rng.normal(size=300)
    latent = rng.exponential(90.0 * np.exp(-risk))
    censor = rng.uniform(24.0, 120.0, 300)
    return TrainingKM.from_manifest({
        "training_outcomes": {"time_months": np.minimum(latent, censor).tolist(),
                              "event": (latent <= censor).astype(int).tolist(),
                              "risk": risk.tolist()},
        "risk_cutoff": float(np.median(risk))})


def scored_patient(folder: Path) -> tuple[dict[str, Dataset], RiskResult]:
    """Headers of one phantom patient's DICOM and a high-risk result over all of it.

    The US region is the phantom's lesion box, read from its ROI SR as the scorer reads it.
    """
    headers = {path.stem: pydicom.dcmread(path, stop_before_pixels=True)
               for path in sorted(folder.rglob("*.dcm"))}
    roi = hd.sr.srread(folder / "us" / "lesion-roi.dcm")
    polyline = roi.content.get_planar_roi_measurement_groups()[0].roi.value
    box = tuple(float(v) for v in (*polyline.min(axis=0), *polyline.max(axis=0)))
    image = headers["image"]
    result = RiskResult(
        patient_key=f"{image.PatientID}^^^PHANTOM", model_name="mrrp-fusion",
        model_version="20260110-1", inputs_hash="ab" * 32, risk=RISK, percentile=81.5,
        group="high", cutoff=0.125, rfs_probability={"36": 0.9123, "60": 0.8345, "84": 0.7012},
        modalities_used=["wsi", "us", "clinical"], compensated=[],
        clinical_attention=[("ki67", 0.5), ("age", 0.3), ("grade", 0.2)],
        evidence=[EvidenceRef(ROLES[name], ds.StudyInstanceUID, ds.SeriesInstanceUID,
                              ds.SOPInstanceUID, ds.SOPClassUID, "0" * 64)
                  for name, ds in headers.items()],
        us_region=UsRegion(image.SOPInstanceUID, box, "sr"),
        algorithm_parameters={"cutoff": "0.125"}, scored_at="2026-01-12T10:00:00Z")
    return headers, result


def write_results(headers: dict[str, Dataset], result: RiskResult, out: Path) -> None:
    """The SR in each study it reports on (OHIF draws a region only from an SR in the image's
    study) and the report PDF in the pathology study, as files for storescu."""
    out.mkdir()
    slide, image = headers["level-0"], headers["image"]
    for name, study in (("sr-pathology", slide), ("sr-us", image)):
        sr = build_risk_sr(result, list(headers.values()), study=study, series_number=9901,
                           instance_number=1, us_image=image)
        sr.save_as(out / f"{name}.dcm", enforce_file_format=True)
    pdf = build_companion_pdf(result, training_km(), patient_id=str(image.PatientID))
    build_encapsulated_pdf(pdf, slide, result=result, series_number=9902, instance_number=1
                           ).save_as(out / "pdf.dcm", enforce_file_format=True)


def browse(viewer: ViewerServer, headers: dict[str, Dataset]) -> dict[str, Any]:
    """Run viewer_check.mjs against ``viewer``; what it saw, as a dict."""
    slide_day = datetime.strptime(str(headers["level-0"].StudyDate), "%Y%m%d")
    arguments = {
        "base": viewer.url, "viewerDir": str(VIEWER_DIR), "chromium": tool("chromium"),
        "outDir": str(ARTIFACTS), "accession": str(headers["image"].AccessionNumber),
        "srSeries": "MRRP recurrence risk", "expectLabel": HEADLINE,
        # OHIF's study browser names a study by its date, DD-Mon-YYYY
        "otherStudyLabel": slide_day.strftime("%d-%b-%Y"),
        "pdfSeries": "MRRP recurrence risk report", "timeoutMs": 60_000, "pdfRenderMs": 3_000,
    }
    run = subprocess.run([tool("node"), str(CHECK_SCRIPT), json.dumps(arguments)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    try:
        seen: dict[str, Any] = json.loads(run.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"viewer_check.mjs printed no result (exit {run.returncode}): "
                             f"{run.stderr[-3000:]}") from None
    assert run.returncode == 0 and seen["failure"] is None, (
        f"the browser run stopped: {seen['failure']}\nsteps done: {seen['steps']}\n"
        f"page text: {(seen.get('failureText') or '')[:1500]}\n"
        f"tries to draw the SR: {seen.get('attempts')}\nWebGL: {seen.get('webgl')}\n"
        f"console: {chr(10).join((seen.get('consoleTail') or [])[-30:])}\n"
        f"see {ARTIFACTS / 'failure.png'}")
    return seen


def test_a_reader_sees_the_risk_on_the_ultrasound_lesion_and_the_report(tmp_path):
    required_files()
    generate(PhantomSpec(patients=1, seed=5, slide_px=1024, missing_wsi=0.0, missing_us=0.0,
                         missing_report=0.0), tmp_path / "phantom", workers=1)
    (folder,) = (tmp_path / "phantom" / "dicom").iterdir()
    headers, result = scored_patient(folder)
    write_results(headers, result, tmp_path / "results")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for stale in [*SHOT_NAMES, "failure.png"]:
        (ARTIFACTS / stale).unlink(missing_ok=True)

    with running_orthanc(tmp_path / "orthanc", plugins=[DICOMWEB_PLUGIN]) as orthanc:
        for source in (folder, tmp_path / "results"):
            stored = storescu(orthanc, source)
            assert stored.returncode == 0, stored.stderr
        assert orthanc.statistics()["CountInstances"] == 9
        files = viewer_files()
        with ViewerServer(files.dist_dir, files.app_config,
                          f"http://127.0.0.1:{orthanc.http_port}") as viewer:
            seen = browse(viewer, headers)

    print(f"\nviewer steps {seen['steps']}; drags needed for the SR: {len(seen['attempts'])}")
    # nothing failed on the way: every request answered, from our one origin, no script error
    assert seen["httpErrors"] == []
    assert seen["failedRequests"] == []
    assert seen["foreignRequests"] == []
    assert seen["consoleErrors"] == []
    for accession in (headers["image"].AccessionNumber, headers["level-0"].AccessionNumber):
        assert accession in seen["studyListText"]
    assert headers["image"].StudyInstanceUID in seen["viewerUrl"]

    # the US image is drawn, with the SR's lesion box labelled by group and score first
    assert any(c["inViewport"] and c["width"] > 0 and c["height"] > 0
               for c in seen["canvases"]), seen["canvases"]
    (label,) = seen["annotationText"]
    # every line "meaning: value %": no unit code a reader would have to decode
    assert label.startswith(HEADLINE), label
    assert "Percentile Ranking of measurement: 81.50 %" in label
    assert "Recurrence-free probability at 60 months: 83.45 %" in label
    assert "{" not in label and "Recurrence risk score" not in label, label

    # the report PDF is loaded in OHIF's PDF viewport from our own origin
    assert seen["pdf"]["data"].startswith(f"blob:{viewer.url}/"), seen["pdf"]
    assert seen["pdf"]["width"] > 0 and seen["pdf"]["height"] > 0
    for name in SHOT_NAMES:
        assert (ARTIFACTS / name).stat().st_size > 10_000, f"{name} looks empty"
