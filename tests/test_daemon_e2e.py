"""End to end: a phantom in a real Orthanc, its HL7 over MLLP, the daemon pulls, scores and
stores one SR (and PDF) per patient back in Orthanc; a SIGTERM mid-run and a restart score
every patient exactly once.

The model is trained beforehand on the phantom's training split (file-drop ingest into a
separate database), as a hospital would train it on its own history.
"""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from datetime import date
from pathlib import Path

import pytest
from orthanc import LOOPBACK, free_port, running_orthanc, storescu
from phantoms import extracted_phantom
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from exporters.pdf import SERIES_DESCRIPTION as PDF_SERIES
from exporters.sr import SERIES_DESCRIPTION as SR_SERIES
from mrrp_pacs.phantom.generator import EARLIEST_STUDY_DATE, PhantomSpec

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.needs_tool("Orthanc", "storescu")]

SPEC = PhantomSpec(patients=16, seed=4, slide_px=1024, missing_wsi=0.2, missing_us=0.2,
                   missing_report=0.2)
MRRP = [sys.executable, "-m", "mrrp_pacs"]
# the puller queries study dates from today back: far enough for the phantom's oldest study,
# counted from the day the test runs, so the window never runs out
PHANTOM_WINDOW_DAYS = (date.today() - EARLIEST_STUDY_DATE).days + 1


def _train(root: Path) -> tuple[Path, Path]:
    """The training phantom's folder, and the model store the model was trained into."""
    db, env, _ = extracted_phantom(root / "training", SPEC, max_tiles=4)
    truth = root / "training" / "phantom" / "truth.csv"
    outcomes = root / "outcomes.csv"
    with truth.open() as source, outcomes.open("w", newline="") as target:
        writer = csv.writer(target)
        writer.writerow(["patient_id", "time_months", "event", "split"])
        for row in csv.DictReader(source):
            writer.writerow([row["patient_id"], row["time_months"], row["event"], row["split"]])
    trained = subprocess.run([*MRRP, "train", *db, "--outcomes", str(outcomes),
                              "--max-epochs", "3"], env={**os.environ, **env},
                             capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    return root / "training" / "phantom", Path(db[1]).parent / "models"


def _config(root: Path, models: str, ports: dict[str, int], pacs_port: int) -> Path:
    path = root / "mrrp.toml"
    path.write_text(f"""
[paths]
data_dir = "{root / 'daemon'}"
model_store = "{models}"
[features]
max_tiles = 4
[dicom]
port = {ports['dicom']}
[hl7]
port = {ports['hl7']}
[http]
port = {ports['http']}
[pacs]
host = "{LOOPBACK}"
port = {pacs_port}
ae_title = "ORTHANC"
interval_s = 2
window_days = {PHANTOM_WINDOW_DAYS}
[scoring]
interval_s = 2
wait_hours = 0
[export]
interval_s = 2
backoff_s = 1
""")
    return path


def _serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*MRRP, "--config", str(config), "serve"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _wait(what: str, condition, timeout_s: float, process: subprocess.Popen[bytes] | None,
          log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process is None or process.poll() is None, \
            f"daemon exited while waiting for {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, \
            f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _query(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=30) as conn:
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:  # not migrated yet
            return []


def _find_series(port: int) -> list[Dataset]:
    """C-FIND (study root, SERIES level) for every series in Orthanc."""
    ae = AE(ae_title="MRRP")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    found: list[Dataset] = []
    assoc = ae.associate(LOOPBACK, port, ae_title="ORTHANC")
    assert assoc.is_established, "Orthanc refused the C-FIND association"
    try:
        for study_uid in _study_uids(assoc):
            query = Dataset()
            query.QueryRetrieveLevel = "SERIES"
            query.StudyInstanceUID = study_uid
            query.SeriesInstanceUID = ""
            query.SeriesDescription = ""
            query.Modality = ""
            query.NumberOfSeriesRelatedInstances = ""
            for status, answer in assoc.send_c_find(
                    query, StudyRootQueryRetrieveInformationModelFind):
                if status and status.Status in (0xFF00, 0xFF01) and answer is not None:
                    found.append(answer)
    finally:
        assoc.release()
    return found


def _study_uids(assoc) -> list[str]:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    uids = []
    for status, answer in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        if status and status.Status in (0xFF00, 0xFF01) and answer is not None:
            uids.append(str(answer.StudyInstanceUID))
    return uids


def test_e2e_daemon_pulls_scores_and_stores_reports_surviving_sigterm(tmp_path):
    phantom, models = _train(tmp_path)
    dicom_files = [p for p in (phantom / "dicom").rglob("*") if p.is_file()]
    with (phantom / "truth.csv").open() as handle:
        truth = list(csv.DictReader(handle))
    # a patient with a slide and a US lesion gets an SR in both studies, others one
    expected_srs = sum(1 + (row["has_wsi"] == "1" and row["has_us"] == "1") for row in truth)
    ports = {"dicom": free_port(), "hl7": free_port(), "http": free_port()}
    # Orthanc moves studies to our SCP and answers our queries: it must know our AE and port
    with running_orthanc(tmp_path / "orthanc", modalities={
            "MRRP": ["MRRP", LOOPBACK, ports["dicom"]]}) as orthanc:
        config = _config(tmp_path, str(models), ports, orthanc.dicom_port)
        loaded = storescu(orthanc, phantom / "dicom")
        assert loaded.returncode == 0, loaded.stderr
        db = tmp_path / "daemon" / "mrrp.sqlite3"
        log = tmp_path / "daemon.log"
        daemon = _serve(config, log)
        try:
            _wait("every DICOM object pulled",
                  lambda: _query(db, "SELECT COUNT(*) FROM instances")[:1] == [
                      (len(dicom_files),)], 240, daemon, log)
            sent = subprocess.run([*MRRP, "hl7", "send", *map(str, sorted(
                (phantom / "hl7").glob("*.hl7"))), "--port", str(ports["hl7"])],
                capture_output=True, text=True, timeout=120)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert sent.stdout.count(" AA") == len(list((phantom / "hl7").glob("*.hl7")))
            health = urllib.request.urlopen(f"http://{LOOPBACK}:{ports['http']}/healthz",
                                            timeout=10)
            assert health.status == 200
            # interrupt while scoring is under way
            _wait("the first score", lambda: _query(db, "SELECT COUNT(*) FROM scores")[:1]
                  not in ([], [(0,)]), 300, daemon, log)
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=120) == 0, log.read_text()[-3000:]
            scored_before = _query(db, "SELECT COUNT(*) FROM scores")[0][0]
            assert scored_before < SPEC.patients, "SIGTERM came too late to test a restart"
            daemon = _serve(config, log)
            _wait("every patient scored",
                  lambda: _query(db, "SELECT COUNT(DISTINCT patient_key) FROM scores")[:1]
                  == [(SPEC.patients,)], 600, daemon, log)
            _wait("every SR and PDF sent",
                  lambda: _query(db, "SELECT COUNT(*) FROM exports WHERE state = 'sent'")[:1]
                  == [(expected_srs + SPEC.patients,)], 120, daemon, log)
            metrics = urllib.request.urlopen(f"http://{LOOPBACK}:{ports['http']}/metrics",
                                             timeout=10).read().decode()
            assert f"mrrp_patients_scored {SPEC.patients}" in metrics
            assert f'mrrp_exports{{state="sent"}} {expected_srs + SPEC.patients}' in metrics
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=120)
        assert code == 0, log.read_text()[-3000:]

        # exactly once: one score per patient; one PDF each, and an SR in each study reported
        # on (the pathology study, and the US study where the lesion region is drawn)
        per_patient = _query(db, "SELECT patient_key, COUNT(*) FROM scores GROUP BY 1")
        assert sorted(n for _, n in per_patient) == [1] * SPEC.patients
        kinds = dict(_query(db, "SELECT kind, COUNT(*) FROM exports GROUP BY kind"))
        assert kinds == {"sr": expected_srs, "pdf": SPEC.patients}
        states = {s for (s,) in _query(db, "SELECT state FROM jobs")}
        assert states <= {"done", "interrupted"}, states

        # what Orthanc holds, found by C-FIND: those SR series and one PDF series per patient
        series = _find_series(orthanc.dicom_port)
        ours = [s for s in series if s.SeriesDescription == SR_SERIES]
        pdfs = [s for s in series if s.SeriesDescription == PDF_SERIES]
        assert len(ours) == expected_srs and len(pdfs) == SPEC.patients
        assert {s.Modality for s in ours} == {"SR"} and {s.Modality for s in pdfs} == {"DOC"}
        assert all(int(s.NumberOfSeriesRelatedInstances) == 1 for s in ours + pdfs)
        # each report sits in the patient's pathology study, or the US study without a slide
        slide_studies = {s.StudyInstanceUID for s in series if s.Modality == "SM"}
        us_studies = {s.StudyInstanceUID for s in series if s.Modality == "US"}
        in_slide_study = sum(s.StudyInstanceUID in slide_studies for s in ours)
        assert in_slide_study == sum(row["has_wsi"] == "1" for row in truth)
        in_us_study = sum(s.StudyInstanceUID in us_studies for s in ours)
        assert in_us_study == sum(row["has_us"] == "1" for row in truth)
        assert in_slide_study + in_us_study == expected_srs

