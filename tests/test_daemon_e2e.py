"""End to end: a phantom in a real Orthanc, its HL7 over MLLP, the daemon pulls, scores and
stores one SR (and PDF) per patient back in Orthanc; a SIGTERM mid-run and a restart score
every patient exactly once. The daemon logs at DEBUG, and no line of its log nor of /metrics
and /healthz quotes a phantom patient's name, ID, accession number or birth date.

The model is trained beforehand on the phantom's training split (file-drop ingest into a
separate database), as a hospital would train it on its own history.
"""

from __future__ import annotations

import csv
import signal
import subprocess
import urllib.request

import pytest
from daemon_proc import MRRP, TRAINING, daemon_config, find_series, query, serve, wait_for
from orthanc import LOOPBACK, free_port, running_orthanc, storescu
from phi import leaks, phantom_identifiers

from exporters.pdf import SERIES_DESCRIPTION as PDF_SERIES
from exporters.sr import SERIES_DESCRIPTION as SR_SERIES

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.needs_tool("Orthanc", "storescu")]

SPEC = TRAINING  # the daemon scores the phantom its model was trained on
def test_e2e_daemon_pulls_scores_and_stores_reports_surviving_sigterm(tmp_path, trained_phantom):
    phantom, models = trained_phantom
    dicom_files = [p for p in (phantom / "dicom").rglob("*") if p.is_file()]
    with (phantom / "truth.csv").open() as handle:
        truth = list(csv.DictReader(handle))
    # a patient with a slide and a US lesion gets an SR in both studies, others one
    expected_srs = sum(1 + (row["has_wsi"] == "1" and row["has_us"] == "1") for row in truth)
    ports = {"dicom": free_port(), "hl7": free_port(), "http": free_port()}
    # Orthanc moves studies to our SCP and answers our queries: it must know our AE and port
    with running_orthanc(tmp_path / "orthanc", modalities={
            "MRRP": ["MRRP", LOOPBACK, ports["dicom"]]}) as orthanc:
        config = daemon_config(tmp_path, str(models), ports, orthanc.dicom_port,
                               settings={"logging": {"level": "DEBUG"}})
        loaded = storescu(orthanc, phantom / "dicom")
        assert loaded.returncode == 0, loaded.stderr
        db = tmp_path / "daemon" / "mrrp.sqlite3"
        log = tmp_path / "daemon.log"
        daemon = serve(config, log)
        served = []  # the text of /healthz and /metrics
        try:
            wait_for("every DICOM object pulled",
                  lambda: query(db, "SELECT COUNT(*) FROM instances")[:1] == [
                      (len(dicom_files),)], 240, daemon, log)
            sent = subprocess.run([*MRRP, "hl7", "send", *map(str, sorted(
                (phantom / "hl7").glob("*.hl7"))), "--port", str(ports["hl7"])],
                capture_output=True, text=True, timeout=120)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert sent.stdout.count(" AA") == len(list((phantom / "hl7").glob("*.hl7")))
            health = urllib.request.urlopen(f"http://{LOOPBACK}:{ports['http']}/healthz",
                                            timeout=10)
            assert health.status == 200
            served.append(health.read().decode())
            # interrupt while scoring is under way
            wait_for("the first score", lambda: query(db, "SELECT COUNT(*) FROM scores")[:1]
                  not in ([], [(0,)]), 300, daemon, log)
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=120) == 0, log.read_text()[-3000:]
            scored_before = query(db, "SELECT COUNT(*) FROM scores")[0][0]
            assert scored_before < SPEC.patients, "SIGTERM came too late to test a restart"
            daemon = serve(config, log)
            wait_for("every patient scored",
                  lambda: query(db, "SELECT COUNT(DISTINCT patient_key) FROM scores")[:1]
                  == [(SPEC.patients,)], 600, daemon, log)
            wait_for("every SR and PDF sent",
                  lambda: query(db, "SELECT COUNT(*) FROM exports WHERE state = 'sent'")[:1]
                  == [(expected_srs + SPEC.patients,)], 120, daemon, log)
            metrics = urllib.request.urlopen(f"http://{LOOPBACK}:{ports['http']}/metrics",
                                             timeout=10).read().decode()
            served.append(metrics)
            assert f"mrrp_patients_scored {SPEC.patients}" in metrics
            assert f'mrrp_exports{{state="sent"}} {expected_srs + SPEC.patients}' in metrics
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=120)
        assert code == 0, log.read_text()[-3000:]

        # no patient identifier in any log line, at DEBUG, nor in what the HTTP port serves
        text = log.read_text()
        assert " DEBUG " in text and "stored HL7 ORU^R01 message row" in text
        identifiers = phantom_identifiers(phantom)
        assert len({v for v, what in identifiers.items() if what == "PatientID"}) == SPEC.patients
        assert leaks("\n".join([text, *served]), identifiers) == []

        # exactly once: one score per patient; one PDF each, and an SR in each study reported
        # on (the pathology study, and the US study where the lesion region is drawn)
        per_patient = query(db, "SELECT patient_key, COUNT(*) FROM scores GROUP BY 1")
        assert sorted(n for _, n in per_patient) == [1] * SPEC.patients
        kinds = dict(query(db, "SELECT kind, COUNT(*) FROM exports GROUP BY kind"))
        assert kinds == {"sr": expected_srs, "pdf": SPEC.patients}
        states = {s for (s,) in query(db, "SELECT state FROM jobs")}
        assert states <= {"done", "interrupted"}, states

        # what Orthanc holds, found by C-FIND: those SR series and one PDF series per patient
        series = find_series(orthanc.dicom_port)
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

