"""The companion PDF rendered by poppler (pdftoppm, pdftotext) and its Encapsulated PDF checked
by dciodvfy; the rendered page is kept as test-artifacts/exporters/companion.png."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import builders
import numpy as np
import pydicom
import pytest
from PIL import Image
from tools import tool
from validators import PRIVATE_SCHEME_WARNING, dciodvfy

from exporters import codes
from exporters.pdf import (
    ENCAPSULATED_PDF,
    INTENDED_USE,
    TrainingKM,
    build_companion_pdf,
    build_encapsulated_pdf,
)
from mrrp_pacs.results import EvidenceRef, RiskResult

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "exporters"


@pytest.fixture(scope="module")
def patient():
    patient = builders.Patient()
    return {"us": builders.us_image(patient), "wsi": builders.wsi_image(patient)}


@pytest.fixture(scope="module")
def result(patient) -> RiskResult:
    evidence = [EvidenceRef(role, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                            ds.SOPClassUID, "0" * 64)
                for role, ds in (("us_image", patient["us"]), ("wsi", patient["wsi"]))]
    return RiskResult(
        patient_key="MRN001^^^HOSP", model_name="mrrp-fusion", model_version="20260110-1",
        inputs_hash="ab" * 32, risk=1.234567, percentile=81.5, group="high", cutoff=0.125,
        rfs_probability={"36": 0.9123, "60": 0.8345, "84": 0.7012},
        modalities_used=["us", "clinical"], compensated=["wsi"],
        clinical_attention=[("ki67", 0.4), ("tumour_size_mm", 0.25), ("age", 0.2),
                            ("grade", 0.15)],
        evidence=evidence, us_region=None, scored_at="2026-01-12T10:00:00Z")


@pytest.fixture(scope="module")
def km() -> TrainingKM:
    rng = np.random.default_rng(7)
    n = 300
    risk = rng.normal(size=n)
    latent = rng.exponential(90.0 * np.exp(-risk))
    censor = rng.uniform(24.0, 120.0, n)
    manifest = {"training_outcomes": {"time_months": np.minimum(latent, censor).tolist(),
                                      "event": (latent <= censor).astype(int).tolist(),
                                      "risk": risk.tolist()},
                "risk_cutoff": float(np.median(risk))}
    return TrainingKM.from_manifest(manifest)


@pytest.fixture(scope="module")
def pdf(result, km) -> bytes:
    return build_companion_pdf(result, km, patient_id="MRN001")


@pytest.mark.needs_tool("pdftoppm")
def test_page_renders_as_a_non_blank_a4_png(pdf, tmp_path):
    pdftoppm = tool("pdftoppm")
    source = tmp_path / "companion.pdf"
    source.write_bytes(pdf)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([pdftoppm, "-png", "-r", "100", "-singlefile", str(source),
                          str(ARTIFACTS / "companion")], capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    png = ARTIFACTS / "companion.png"
    assert png.is_file()
    with Image.open(png) as image:
        width, height = image.size
        grey = np.asarray(image.convert("L"))
    assert (width, height) == (827, 1169)  # 210 × 297 mm at 100 dpi
    assert height / width == pytest.approx(297 / 210, rel=0.005)
    inked = (grey < 200).mean()
    assert 0.03 < inked < 0.5, f"{inked:.1%} of the page is inked"
    # the Kaplan–Meier panel (lower half) and the header (top) both carry ink
    assert (grey[: height // 5] < 200).mean() > 0.02
    assert (grey[height // 2 :] < 200).mean() > 0.02


@pytest.mark.needs_tool("pdftotext")
def test_text_carries_score_probabilities_and_intended_use(pdf, tmp_path):
    pdftotext = tool("pdftotext")
    source = tmp_path / "companion.pdf"
    source.write_bytes(pdf)
    run = subprocess.run([pdftotext, "-layout", str(source), "-"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text = " ".join(run.stdout.split())
    assert "recurrence" in text.lower()
    for expected in ("1.23", "HIGH RISK", "81.5 %", "3 years: 91.2 %", "5 years: 83.5 %",
                     "7 years: 70.1 %", "Patient ID MRN001", "mrrp-fusion@20260110-1",
                     "whole-slide image", "breast ultrasound", "tumour_size_mm",
                     "2026-01-12", "this patient's group"):
        assert expected in text, expected
    assert " ".join(INTENDED_USE.split()) in text
    assert "Not a medical device" in text


def test_pdf_is_one_a4_page_and_the_same_bytes_for_the_same_result(pdf, result, km):
    assert pdf.startswith(b"%PDF-")
    assert pdf.count(b"/Type /Page\n") + pdf.count(b"/Type /Page ") == 1
    assert b"/MediaBox [ 0 0 595.44 841.68 ]" in pdf  # 8.27 × 11.69 in, in points
    assert b"/CreationDate" not in pdf
    assert build_companion_pdf(result, km, patient_id="MRN001") == pdf
    low = build_companion_pdf(dataclasses.replace(result, group="low", risk=-0.5), km)
    assert low != pdf and b"MRN001" not in low


@pytest.mark.needs_tool("dciodvfy")
def test_encapsulated_pdf_passes_dciodvfy(pdf, result, patient, tmp_path):
    ds = build_encapsulated_pdf(pdf, patient["wsi"], result=result, series_number=91,
                                instance_number=1, uid_secret="test-secret")
    path = tmp_path / "pdf.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors, warnings = dciodvfy(path)
    assert errors == []
    assert set(warnings) == {PRIVATE_SCHEME_WARNING}

    back = pydicom.dcmread(path)
    assert back.SOPClassUID == ENCAPSULATED_PDF
    assert back.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert (back.Modality, back.BurnedInAnnotation) == ("DOC", "YES")
    assert back.DocumentTitle == "MRRP recurrence risk report"
    concept = back.ConceptNameCodeSequence[0]
    assert (concept.CodeValue, concept.CodingSchemeDesignator) == (
        codes.RISK_REPORT.value, "99MRRP")
    assert back.EncapsulatedDocumentLength == len(pdf)
    assert bytes(back.EncapsulatedDocument)[: len(pdf)] == pdf
    assert len(back.EncapsulatedDocument) % 2 == 0
    assert back.StudyInstanceUID == patient["wsi"].StudyInstanceUID
    assert back.SeriesInstanceUID != patient["wsi"].SeriesInstanceUID
    assert (back.PatientID, back.AccessionNumber) == ("MRN001", patient["wsi"].AccessionNumber)
    assert [item.ReferencedSOPInstanceUID for item in back.SourceInstanceSequence] == [
        patient["us"].SOPInstanceUID, patient["wsi"].SOPInstanceUID]


def test_odd_length_pdf_is_padded_and_its_length_kept(result, patient):
    odd = b"%PDF-1.4\n%%EOF\n"
    assert len(odd) % 2 == 1
    ds = build_encapsulated_pdf(odd, patient["us"], result=result, series_number=91,
                                instance_number=1)
    assert ds.EncapsulatedDocument == odd + b"\x00"
    assert ds.EncapsulatedDocumentLength == len(odd)


def test_encapsulated_uids_follow_the_result(pdf, result, patient):
    def build(r: RiskResult, study="wsi"):
        return build_encapsulated_pdf(pdf, patient[study], result=r, series_number=91,
                                      instance_number=1)

    first = build(result)
    assert build(result).SOPInstanceUID == first.SOPInstanceUID
    assert build(dataclasses.replace(result, inputs_hash="cd" * 32)).SOPInstanceUID \
        != first.SOPInstanceUID
    assert build(result, "us").SOPInstanceUID != first.SOPInstanceUID


def test_not_a_pdf_is_refused(result, patient):
    with pytest.raises(ValueError, match="not a PDF"):
        build_encapsulated_pdf(b"<html>", patient["us"], result=result, series_number=1,
                               instance_number=1)


def test_manifest_without_training_outcomes_is_refused():
    with pytest.raises(ValueError, match="lacks 'training_outcomes'"):
        TrainingKM.from_manifest({"risk_cutoff": 0.0})
    with pytest.raises(ValueError, match="of one length"):
        TrainingKM.from_manifest({"training_outcomes": {"time_months": [1.0, 2.0],
                                                        "event": [1], "risk": [0.1, 0.2]},
                                  "risk_cutoff": 0.0})
