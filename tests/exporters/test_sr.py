"""The risk SR against the real validators: dciodvfy (0 errors, only the private-scheme warning),
dcmtk's dsrdump, and highdicom reading every value back; UIDs by result and by patient."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import builders
import highdicom as hd
import numpy as np
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes as dcm_codes
from tools import tool
from validators import PRIVATE_SCHEME_WARNING, dciodvfy

from exporters import codes
from exporters.sr import build_risk_sr, model_device_uid, tracking_uid
from mrrp_pacs.results import EvidenceRef, RiskResult, UsRegion

BOX = (10.0, 12.0, 40.0, 44.0)


@pytest.fixture(scope="module")
def instances():
    patient = builders.Patient()
    us = builders.us_image(patient)
    wsi = builders.wsi_image(patient)
    roi = builders.us_roi_sr(patient, us, BOX)
    return {"us": us, "wsi": wsi, "roi": roi}


def reference(role: str, ds) -> EvidenceRef:
    return EvidenceRef(role, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                       ds.SOPClassUID, "0" * 64)


def make_result(instances, **changes) -> RiskResult:
    us, wsi, roi = instances["us"], instances["wsi"], instances["roi"]
    result = RiskResult(
        patient_key="MRN001^^^HOSP", model_name="mrrp-fusion", model_version="20260110-1",
        inputs_hash="ab" * 32, risk=1.234567, percentile=81.5, group="high", cutoff=0.125,
        rfs_probability={"36": 0.9123, "60": 0.8345, "84": 0.7012},
        modalities_used=["us", "clinical"], compensated=["wsi"],
        clinical_attention=[("ki67", 0.5), ("age", 0.3), ("grade", 0.2)],
        evidence=[reference("wsi", wsi), reference("us_image", us), reference("us_roi", roi)],
        us_region=UsRegion(us.SOPInstanceUID, BOX, "sr"),
        algorithm_parameters={"horizons_months": "36,60,84", "cutoff": "0.125"},
        scored_at="2026-01-12T10:00:00Z")
    return dataclasses.replace(result, **changes)


def build(instances, result: RiskResult, **kwargs) -> hd.sr.Comprehensive3DSR:
    defaults = {"study": instances["wsi"], "series_number": 90, "instance_number": 1,
                "us_image": instances["us"], "uid_secret": "test-secret"}
    return build_risk_sr(result, [instances["wsi"], instances["us"], instances["roi"]],
                         **{**defaults, **kwargs})


def reread(sr) -> hd.sr.Comprehensive3DSR:
    """The SR as a reader sees it (a built SR's content is not yet a MeasurementReport)."""
    return hd.sr.Comprehensive3DSR.from_dataset(sr)


def write(sr, path: Path) -> Path:
    sr.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.needs_tool("dciodvfy")
@pytest.mark.parametrize("placement", ["wsi", "us"])
def test_dciodvfy_finds_no_error_and_only_the_private_scheme_warning(instances, tmp_path,
                                                                    placement):
    result = make_result(instances)
    sr = build(instances, result, study=instances[placement], predecessor=instances["roi"])
    errors, warnings = dciodvfy(write(sr, tmp_path / "sr.dcm"))
    assert errors == []
    assert warnings and set(warnings) == {PRIVATE_SCHEME_WARNING}


@pytest.mark.needs_tool("dciodvfy")
def test_minimal_result_without_region_attention_or_parameters_is_valid(instances, tmp_path):
    result = make_result(instances, group="low", us_region=None, clinical_attention=[],
                         algorithm_parameters={}, compensated=[],
                         modalities_used=["wsi", "us", "clinical"])
    sr = build(instances, result, us_image=None)
    errors, warnings = dciodvfy(write(sr, tmp_path / "sr.dcm"))
    assert errors == [] and set(warnings) == {PRIVATE_SCHEME_WARNING}
    assert reread(sr).content.get_planar_roi_measurement_groups() == []
    assert "PredecessorDocumentsSequence" not in sr


@pytest.mark.needs_tool("dsrdump")
def test_dsrdump_renders_the_score(instances, tmp_path):
    path = write(build(instances, make_result(instances)), tmp_path / "sr.dcm")
    run = subprocess.run([tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert '"Recurrence risk score (log hazard)")="1.234567" ({risk},UCUM' in run.stdout
    assert '(15508007,SCT,"High risk")' in run.stdout
    assert "(POLYLINE,10/12" in run.stdout


def test_every_value_reads_back_through_highdicom(instances, tmp_path):
    result = make_result(instances)
    path = write(build(instances, result, study=instances["wsi"],
                       predecessor=instances["roi"]), tmp_path / "sr.dcm")
    sr = hd.sr.Comprehensive3DSR.from_dataset(hd.sr.srread(path))

    (group,) = sr.content.get_image_measurement_groups()
    assert group.tracking_uid == tracking_uid(result.patient_key, "test-secret")
    assert group.tracking_identifier == "MRRP recurrence risk"
    values = {m.name: m.value for m in group.get_measurements()
              if m.name != codes.ATTENTION_WEIGHT}
    assert values == {
        codes.RISK_SCORE: 1.234567, codes.PERCENTILE_RANKING: 81.5,
        codes.RFS_PROBABILITY[36]: 91.23, codes.RFS_PROBABILITY[60]: 83.45,
        codes.RFS_PROBABILITY[84]: 70.12}
    (score,) = group.get_measurements(codes.RISK_SCORE)
    assert score.unit == codes.UNIT_RISK
    attention = [(m[0].ContentSequence[0].TextValue, m.value)
                 for m in group.get_measurements(codes.ATTENTION_WEIGHT)]
    assert attention == [("ki67", 0.5), ("age", 0.3), ("grade", 0.2)]

    evaluations = [(e.name, e.value) for e in group.get_qualitative_evaluations()]
    assert (codes.RISK_GROUP, codes.RISK_GROUP_VALUE["high"]) in evaluations
    assert [v for n, v in evaluations if n == codes.MODALITY_USED] == [
        dcm_codes.DCM.Ultrasound, codes.MODALITY["clinical"]]
    assert [v for n, v in evaluations if n == codes.MODALITY_COMPENSATED] == [
        dcm_codes.DCM.SlideMicroscopy]

    def text(container, name) -> list[str]:
        return [item.value for item in find_content_items(container, name=name)]

    assert text(group[0], dcm_codes.DCM.AlgorithmName) == ["mrrp-fusion"]
    assert text(group[0], dcm_codes.DCM.AlgorithmVersion) == ["20260110-1"]
    assert text(group[0], dcm_codes.DCM.AlgorithmParameters) == [
        "cutoff=0.125", "horizons_months=36,60,84"]

    (observer,) = sr.content.get_observer_contexts(observer_type=dcm_codes.DCM.Device)
    device = observer.observer_identifying_attributes
    assert device.uid == model_device_uid(result.model_label, "test-secret")
    assert (device.name, device.model_name) == ("MRRP", "20260110-1")
    (procedure,) = find_content_items(sr.content[0], name=dcm_codes.DCM.ProcedureReported)
    assert procedure.value == codes.RISK_ASSESSMENT

    (region_group,) = sr.content.get_planar_roi_measurement_groups()
    assert region_group.reference_type == dcm_codes.DCM.ImageRegion
    np.testing.assert_array_equal(region_group.roi.value, [
        [10, 12], [40, 12], [40, 44], [10, 44], [10, 12]])
    assert region_group.roi.GraphicType == "POLYLINE"
    source = region_group.roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert source.ReferencedSOPInstanceUID == instances["us"].SOPInstanceUID
    (shown,) = region_group.get_measurements()
    # the recurrence within 5 years and the recurrence-free probability at 60 months add up
    assert (shown.name.meaning, shown.value, shown.unit.value) == (
        "MRRP risk high, recurrence within 5 years", 16.55, "%")
    # OHIF labels the region with the first five NUMs of both groups (they share the Tracking
    # UID): every one of them in %, the score's {risk} unit after them
    numbers = [item for item in [*region_group[0].ContentSequence, *group[0].ContentSequence]
               if item.ValueType == "NUM"]
    assert [item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue
            for item in numbers[:6]] == ["%"] * 5 + ["{risk}"]
    # OHIF hides a NUM that carries modifiers: the algorithm sits on the group
    assert "ContentSequence" not in shown[0]
    assert text(region_group[0], dcm_codes.DCM.AlgorithmName) == ["mrrp-fusion"]

    assert {uid for _, _, uid, _ in sr.get_evidence()} == {
        ds.SOPInstanceUID for ds in instances.values()}
    assert "PertinentOtherEvidenceSequence" not in sr
    assert [item.StudyInstanceUID for item in sr.CurrentRequestedProcedureEvidenceSequence] \
        == [instances["wsi"].StudyInstanceUID, instances["us"].StudyInstanceUID]
    predecessor = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == \
        instances["roi"].SOPInstanceUID
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99MRRP"


@pytest.mark.needs_tool("dciodvfy")
def test_a_tiny_probability_is_not_written_as_zero(instances, tmp_path):
    # OHIF prints no value for a NUM of 0: a model's near-certain recurrence must read 0.00 %
    result = make_result(instances, rfs_probability={"36": 0.0123457, "60": 3.2e-05,
                                                     "84": 1.5e-09})
    built = build(instances, result)
    errors, warnings = dciodvfy(write(built, tmp_path / "sr.dcm"))
    assert errors == [] and set(warnings) == {PRIVATE_SCHEME_WARNING}
    sr = reread(built)
    (group,) = sr.content.get_image_measurement_groups()
    values = {m.name: m.value for m in group.get_measurements()}
    assert [values[codes.RFS_PROBABILITY[m]] for m in (36, 60, 84)] == [1.23457, 0.0032, 1.5e-07]
    (region_group,) = sr.content.get_planar_roi_measurement_groups()
    (shown,) = region_group.get_measurements()
    assert shown.value == 99.9968


def test_sr_is_placed_in_the_given_study(instances):
    sr = build(instances, make_result(instances), study=instances["us"])
    assert sr.StudyInstanceUID == instances["us"].StudyInstanceUID
    assert sr.AccessionNumber == instances["us"].AccessionNumber
    assert (sr.PatientID, sr.SeriesDescription, sr.Modality) == (
        "MRN001", "MRRP recurrence risk", "SR")
    # scored at 10:00 UTC, written in the machine's local time like the study's dates
    local = datetime(2026, 1, 12, 10, tzinfo=UTC).astimezone()
    assert (str(sr.ContentDate), str(sr.ContentTime)) == (
        local.strftime("%Y%m%d"), local.strftime("%H%M%S"))


def test_uids_follow_the_result_and_tracking_follows_the_patient(instances, tmp_path):
    result = make_result(instances)
    first, again = build(instances, result), build(instances, result)
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert (write(first, tmp_path / "a.dcm").read_bytes()
            == write(again, tmp_path / "b.dcm").read_bytes())

    new_inputs = build(instances, dataclasses.replace(result, inputs_hash="cd" * 32))
    assert new_inputs.SOPInstanceUID != first.SOPInstanceUID
    assert new_inputs.SeriesInstanceUID == first.SeriesInstanceUID

    new_model = dataclasses.replace(result, model_version="20260301-2", risk=0.2, group="low")
    other = build(instances, new_model)
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesInstanceUID != first.SeriesInstanceUID
    tracking = [reread(sr).content.get_image_measurement_groups()[0].tracking_uid
                for sr in (first, other)]
    assert tracking[0] == tracking[1] == tracking_uid(result.patient_key, "test-secret")
    devices = [model_device_uid(r.model_label, "test-secret") for r in (result, new_model)]
    assert devices[0] != devices[1]

    in_us_study = build(instances, result, study=instances["us"])
    assert in_us_study.SOPInstanceUID != first.SOPInstanceUID

    another_patient = build(instances, dataclasses.replace(result, patient_key="MRN002^^^HOSP"))
    assert (reread(another_patient).content.get_image_measurement_groups()[0].tracking_uid
            != tracking[0])
    other_site = build(instances, result, uid_secret="another-site")
    assert other_site.SOPInstanceUID != first.SOPInstanceUID
    assert all(re.fullmatch(r"2\.25\.\d{1,39}", uid) for uid in (
        first.SOPInstanceUID, first.SeriesInstanceUID, tracking[0], devices[0]))


def test_explicit_device_observer_uid_is_used(instances):
    sr = reread(build(instances, make_result(instances), device_observer_uid="1.2.3.4"))
    (observer,) = sr.content.get_observer_contexts(observer_type=dcm_codes.DCM.Device)
    assert observer.observer_identifying_attributes.uid == "1.2.3.4"


@pytest.mark.parametrize(("change", "message"), [
    ({"group": "medium"}, "risk group 'medium' has no code"),
    ({"modalities_used": ["mri", "clinical"]}, r"modalities \['mri'\] have no code"),
    ({"rfs_probability": {"36": 0.9}}, r"lacks the horizons \['60', '84'\]"),
    ({"us_region": UsRegion("1.2.3", BOX, "sr")}, "is not the image of the US region"),
    ({"us_region": None, "evidence": [EvidenceRef("wsi", "1", "2", "9.9.9", "1.2", "0")]},
     r"no source dataset given for evidence instance\(s\) \['9.9.9'\]"),
])
def test_results_the_sr_cannot_code_are_refused(instances, change, message):
    with pytest.raises(ValueError, match=message):
        build(instances, make_result(instances, **change))


def test_region_outside_the_image_is_refused(instances):
    result = make_result(instances, us_region=UsRegion(
        instances["us"].SOPInstanceUID, (10.0, 12.0, 400.0, 44.0), "sr"))
    with pytest.raises(ValueError, match="is not inside the 80×64 image"):
        build(instances, result)


@pytest.mark.needs_tool("dciodvfy")
def test_sources_read_without_pixels_are_enough(instances, tmp_path):
    headers = {}
    for name, ds in instances.items():
        path = builders.write(ds, tmp_path / f"{name}.dcm")
        headers[name] = pydicom.dcmread(path, stop_before_pixels=True)
    sr = build_risk_sr(make_result(instances), list(headers.values()), study=headers["wsi"],
                       series_number=90, instance_number=1, us_image=headers["us"])
    errors, _ = dciodvfy(write(sr, tmp_path / "sr.dcm"))
    assert errors == []


@pytest.mark.needs_tool("dciodvfy")
def test_sr_over_a_phantom_patient_is_valid(tmp_path):
    """Real-world headers: UTF-8, multi-frame slide levels, annotation, US image and ROI SR."""
    from mrrp_pacs.phantom.generator import PhantomSpec, generate

    generate(PhantomSpec(patients=1, seed=5, slide_px=1024, missing_wsi=0.0, missing_us=0.0,
                         missing_report=0.0), tmp_path / "phantom", workers=1)
    (folder,) = (tmp_path / "phantom" / "dicom").iterdir()
    headers = {path.stem: pydicom.dcmread(path, stop_before_pixels=True)
               for path in sorted(folder.rglob("*.dcm"))}
    roi = hd.sr.srread(folder / "us" / "lesion-roi.dcm")
    polyline = roi.content.get_planar_roi_measurement_groups()[0].roi.value
    box = (*polyline.min(axis=0), *polyline.max(axis=0))
    roles = {"level-0": "wsi", "level-1": "wsi", "level-2": "wsi", "tumour-region": "wsi_roi",
             "image": "us_image", "lesion-roi": "us_roi"}
    result = make_result(
        {"us": headers["image"], "wsi": headers["level-0"], "roi": headers["lesion-roi"]},
        patient_key=f"{headers['image'].PatientID}^^^PHANTOM",
        modalities_used=["wsi", "us", "clinical"], compensated=[],
        evidence=[reference(roles[name], ds) for name, ds in headers.items()],
        us_region=UsRegion(headers["image"].SOPInstanceUID,
                           tuple(float(v) for v in box), "sr"))
    sr = build_risk_sr(result, list(headers.values()), study=headers["level-0"],
                       series_number=90, instance_number=1, us_image=headers["image"])
    errors, warnings = dciodvfy(write(sr, tmp_path / "sr.dcm"))
    assert errors == [] and set(warnings) == {PRIVATE_SCHEME_WARNING}
    assert len(sr.get_evidence()) == 6
    assert sr.StudyInstanceUID == headers["level-0"].StudyInstanceUID
    assert sr.SpecificCharacterSet == "ISO_IR 192"


@pytest.mark.needs_tool("dciodvfy")
@pytest.mark.parametrize("shape", ["outline", "box"])
def test_region_says_whether_features_saw_an_outline_or_a_box(instances, tmp_path, shape):
    result = make_result(instances, us_region=UsRegion(instances["us"].SOPInstanceUID, BOX,
                                                       "sr", shape))
    path = write(build(instances, result), tmp_path / "sr.dcm")
    errors, warnings = dciodvfy(path)
    assert errors == [] and set(warnings) == {PRIVATE_SCHEME_WARNING}
    sr = hd.sr.Comprehensive3DSR.from_dataset(hd.sr.srread(path))
    (region_group,) = sr.content.get_planar_roi_measurement_groups()
    evaluations = [(e.name, e.value) for e in region_group.get_qualitative_evaluations()]
    assert evaluations == [(codes.US_ROI_SHAPE, codes.US_ROI_SHAPE_VALUE[shape])]
    assert codes.US_ROI_SHAPE_VALUE[shape].meaning == {
        "outline": "Drawn lesion outline", "box": "Bounding box, no lesion outline drawn"}[shape]


def test_a_region_recorded_before_outlines_were_read_is_a_box():
    region = UsRegion("1.2.3", BOX, "sr")
    assert (region.roi_shape, region.frame) == ("box", None)
    old = RiskResult.from_json(re.sub(r', "roi_shape": "box"', "", re.sub(
        r', "frame": null', "", make_result_json(region))))
    assert old.us_region == region


def make_result_json(region: UsRegion) -> str:
    result = RiskResult(
        patient_key="P^^^H", model_name="m", model_version="1", inputs_hash="00", risk=0.0,
        percentile=50.0, group="low", cutoff=0.0, rfs_probability={"36": 1.0, "60": 1.0,
                                                                   "84": 1.0},
        modalities_used=["us"], compensated=[], clinical_attention=[], evidence=[],
        us_region=region)
    text = result.to_json()
    assert '"roi_shape": "box"' in text and '"frame": null' in text
    return text


def test_region_is_drawn_on_the_frame_the_lesion_was_drawn_on(instances):
    cine = instances["us"].copy()
    cine.NumberOfFrames = 4
    cine.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image
    result = make_result(instances, us_region=UsRegion(cine.SOPInstanceUID, BOX, "sr",
                                                       "outline", 3))
    sr = build(instances, result, us_image=cine)
    (region_group,) = reread(sr).content.get_planar_roi_measurement_groups()
    source = region_group.roi.ContentSequence[0].ReferencedSOPSequence[0]
    assert list(np.atleast_1d(source.ReferencedFrameNumber)) == [3]
    with pytest.raises(ValueError, match="frame 5 is not one of the 4 frame"):
        build(instances, dataclasses.replace(result, us_region=dataclasses.replace(
            result.us_region, frame=5)), us_image=cine)
    with pytest.raises(ValueError, match="shape 'blob' has no code"):
        build(instances, dataclasses.replace(result, us_region=dataclasses.replace(
            result.us_region, roi_shape="blob")), us_image=cine)
