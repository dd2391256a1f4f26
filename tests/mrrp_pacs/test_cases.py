from builders import (
    Patient,
    encode,
    pathology_result,
    tumour_annotation,
    us_image,
    us_report,
    us_roi_sr,
    wsi_image,
)

from mrrp_pacs.cases import list_cases


def _receive_all(intake, patient, *, slide=True, us=True, report=True, clinical=True,
                 status="F"):
    image = us_image(patient)
    if us:
        intake.receive_dicom(encode(image), "t")
        intake.receive_dicom(encode(us_roi_sr(patient, image, (5, 5, 20, 20))), "t")
    if slide:
        wsi = wsi_image(patient)
        intake.receive_dicom(encode(wsi), "t")
        intake.receive_dicom(encode(tumour_annotation(patient, wsi, [(1, 1), (5, 1), (5, 5)])),
                             "t")
    if report:
        intake.receive_hl7(us_report(patient, f"US-{patient.patient_id}"), "t")
    if clinical:
        intake.receive_hl7(pathology_result(patient, f"PA-{patient.patient_id}", status=status),
                           "t")


def test_modalities_and_readiness(intake, store, config):
    _receive_all(intake, Patient("P1"))
    _receive_all(intake, Patient("P2"), slide=False, report=False)
    _receive_all(intake, Patient("P3"), us=False, slide=False)   # clinical + report only
    _receive_all(intake, Patient("P4"), clinical=False)
    _receive_all(intake, Patient("P5"), status="P")               # preliminary values only
    cases = {c.patient_id: c for c in list_cases(store, config)}
    assert cases["P1"].modalities == ["wsi", "wsi_roi", "us_image", "us_roi", "us_report",
                                      "clinical"]
    assert cases["P1"].ready and cases["P1"].patient_key == "P1^^^HOSP"
    assert len(cases["P1"].clinical_variables) == 9
    assert cases["P2"].modalities == ["us_image", "us_roi", "clinical"] and cases["P2"].ready
    assert cases["P2"].missing == ["wsi", "wsi_roi", "us_report"]
    assert cases["P3"].modalities == ["us_report", "clinical"] and not cases["P3"].ready
    assert "clinical" not in cases["P4"].modalities and not cases["P4"].ready
    assert "clinical" not in cases["P5"].modalities and not cases["P5"].ready


def test_report_linked_by_accession_counts_as_us_report(intake, store, config):
    patient = Patient("P9")
    intake.receive_dicom(encode(us_image(patient)), "t")
    # a report whose OBR-24 is not an ultrasound section, linked only by accession number
    intake.receive_hl7(us_report(patient).replace(b"|US|F", b"|RAD|F"), "t")
    (case,) = list_cases(store, config)
    assert "us_report" in case.modalities


def test_identity_rules_join_dicom_and_hl7(intake, store, config):
    patient = Patient("P7", issuer="HOSP_PACS")
    intake.receive_dicom(encode(us_image(patient)), "t")
    intake.receive_hl7(pathology_result(Patient("P7", issuer="HOSP_LIS")), "t")
    assert len(list_cases(store, config)) == 2  # different issuers: two people
    aliased = config.replace("identity", issuer_aliases={"HOSP_PACS": "HOSP",
                                                         "HOSP_LIS": "HOSP"})
    (case,) = list_cases(store, aliased)
    assert case.patient_key == "P7^^^HOSP" and case.ready
    by_id = config.replace("identity", match="id")
    assert [c.patient_key for c in list_cases(store, by_id)] == ["P7"]


def test_missing_dicom_issuer_takes_the_default(intake, store, config):
    patient = Patient("P8")
    image = us_image(patient)
    del image.IssuerOfPatientID
    intake.receive_dicom(encode(image), "t")
    intake.receive_hl7(pathology_result(patient), "t")
    assert len(list_cases(store, config)) == 2
    (case,) = list_cases(store, config.replace("identity", default_issuer="HOSP"))
    assert case.ready
