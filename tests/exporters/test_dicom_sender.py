"""DicomSender against a real Orthanc and a real pynetdicom storage SCP (for chosen statuses)."""

from __future__ import annotations

import io
import socket
import time
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from builders import Patient, encode, us_image, us_roi_sr
from orthanc import LOOPBACK, Orthanc, free_port, running_orthanc
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from storage_peer import COMPREHENSIVE_SR, ENCAPSULATED_PDF, storage_scp

from exporters.dicom_sender import DicomSender
from mrrp_pacs.errors import SendError

PDF_BYTES = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


def encapsulated_pdf(patient: Patient) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = ENCAPSULATED_PDF
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName = patient.patient_id, patient.name
    ds.StudyInstanceUID, ds.SeriesInstanceUID = patient.path_study_uid, generate_uid()
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DOC", 90, 1
    ds.DocumentTitle = "MRRP recurrence risk"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.BurnedInAnnotation = "YES"
    ds.EncapsulatedDocument = PDF_BYTES
    return ds


def sr_object(patient: Patient) -> Dataset:
    return us_roi_sr(patient, us_image(patient), (10.0, 12.0, 40.0, 30.0))


def orthanc_instances(server: Orthanc) -> dict[str, str]:
    """SOP Instance UID → Orthanc id of everything Orthanc holds."""
    return {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"]
            for i in server.get("/instances?expand")}


def orthanc_file(server: Orthanc, orthanc_id: str) -> Dataset:
    url = f"http://{LOOPBACK}:{server.http_port}/instances/{orthanc_id}/file"
    with urllib.request.urlopen(url, timeout=30) as reply:
        return dcmread(io.BytesIO(reply.read()))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), aet="PACS") as server:
        yield server


@pytest.mark.needs_tool("Orthanc")
def test_sends_sr_and_pdf_to_orthanc_unchanged(orthanc: Orthanc) -> None:
    patient = Patient("SND001")
    sr, pdf = sr_object(patient), encapsulated_pdf(patient)
    sender = DicomSender(LOOPBACK, orthanc.dicom_port, "PACS", timeout_s=10)
    sender.send(encode(sr))
    sender.send(encode(pdf))

    held = orthanc_instances(orthanc)
    stored_sr = orthanc_file(orthanc, held[sr.SOPInstanceUID])
    stored_pdf = orthanc_file(orthanc, held[pdf.SOPInstanceUID])
    assert stored_sr.SOPClassUID == COMPREHENSIVE_SR
    assert stored_sr.ContentSequence == sr.ContentSequence
    assert stored_pdf.EncapsulatedDocument == PDF_BYTES
    assert stored_pdf.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


@pytest.mark.needs_tool("Orthanc")
def test_compressed_object_is_stored_in_its_own_transfer_syntax(orthanc: Orthanc) -> None:
    image = us_image(Patient("SND002"), rows=32, columns=48)
    image.compress(RLELossless)
    DicomSender(LOOPBACK, orthanc.dicom_port, "PACS", timeout_s=10).send(encode(image))

    orthanc_id = orthanc_instances(orthanc)[image.SOPInstanceUID]
    syntax = orthanc.get(f"/instances/{orthanc_id}/metadata?expand")["TransferSyntax"]
    assert syntax == RLELossless
    stored = orthanc_file(orthanc, orthanc_id)
    assert np.array_equal(stored.pixel_array, image.pixel_array)


def test_one_session_reuses_its_association_and_adds_contexts_on_demand() -> None:
    patient = Patient("SND003")
    objects = [sr_object(patient), sr_object(patient), encapsulated_pdf(patient),
               sr_object(patient), encapsulated_pdf(patient)]
    with storage_scp() as peer:
        sender = DicomSender(LOOPBACK, peer.port, "TESTSCP", timeout_s=10)
        with sender.session() as session:
            for ds in objects:
                session.send(encode(ds))
        # SR context first; the first PDF needs a second association (SR + PDF); then reuse
        assert peer.associations == 2
        assert peer.received == [ds.SOPInstanceUID for ds in objects]


@pytest.mark.parametrize(("status", "transient", "words"), [
    (0xA700, True, "status 0xA700 (Refused: Out of Resources)"),
    (0x0110, True, "status 0x0110 (Processing Failure)"),
    (0xA7FF, True, "status 0xA7FF (Refused: Out of Resources)"),
    (0x0213, True, "status 0x0213 (Resource Limitation)"),
    (0xA900, False, "status 0xA900 (Data Set Does Not Match SOP Class)"),
    (0xC000, True, "status 0xC000 (Cannot Understand)"),
    (0xCFFF, True, "status 0xCFFF (Cannot Understand)"),
    (0x0122, False, "status 0x0122 (Refused: SOP Class Not Supported)"),
    (0x0124, False, "status 0x0124 (Refused: Not Authorised)"),
    (0xFA11, False, "status 0xFA11 (unknown status)"),
])
def test_failure_statuses_raise_with_their_code(status: int, transient: bool,
                                                words: str) -> None:
    with storage_scp([status]) as peer:
        sender = DicomSender(LOOPBACK, peer.port, "TESTSCP", timeout_s=10)
        with pytest.raises(SendError) as caught:
            sender.send(encode(encapsulated_pdf(Patient("SND004"))))
    assert caught.value.transient is transient
    assert caught.value.reason == f"C-STORE refused by TESTSCP@{LOOPBACK}:{peer.port}: {words}"
    assert "SND004" not in caught.value.reason


@pytest.mark.parametrize("status", [0xB000, 0xB006, 0xB007, 0xB123, 0x0001, 0x0107])
def test_warning_statuses_are_deliveries(status: int, caplog: pytest.LogCaptureFixture) -> None:
    with storage_scp([status]) as peer:
        DicomSender(LOOPBACK, peer.port, "TESTSCP", timeout_s=10).send(
            encode(encapsulated_pdf(Patient())))
        assert len(peer.received) == 1
    assert f"warning 0x{status:04X}" in caplog.text


def test_connection_refused_is_transient_and_the_rest_of_the_batch_fails_fast() -> None:
    port = free_port()  # nothing listens there
    sender = DicomSender(LOOPBACK, port, "PACS", timeout_s=5)
    started = time.monotonic()
    with sender.session() as session:
        for _ in range(3):
            with pytest.raises(SendError) as caught:
                session.send(encode(encapsulated_pdf(Patient())))
            assert caught.value.transient
            assert caught.value.reason.startswith(f"no association with PACS@{LOOPBACK}:{port}")
    assert time.monotonic() - started < 2.0


def test_silent_peer_times_out() -> None:
    with socket.socket() as listener:  # accepts TCP, never answers the association request
        listener.bind((LOOPBACK, 0))
        listener.listen()
        sender = DicomSender(LOOPBACK, listener.getsockname()[1], "PACS", timeout_s=1)
        started = time.monotonic()
        with pytest.raises(SendError) as caught:
            sender.send(encode(encapsulated_pdf(Patient())))
        elapsed = time.monotonic() - started
    assert caught.value.transient
    assert "timeout 1 s" in caught.value.reason
    assert 0.9 < elapsed < 5.0


@pytest.mark.needs_tool("Orthanc")
def test_called_ae_mismatch_is_a_readable_rejection(orthanc: Orthanc) -> None:
    sender = DicomSender(LOOPBACK, orthanc.dicom_port, "NOTPACS", calling_ae="MRRP", timeout_s=10)
    with sender.session() as session:
        with pytest.raises(SendError) as caught:
            session.send(encode(encapsulated_pdf(Patient())))
        started = time.monotonic()
        with pytest.raises(SendError) as again:  # the rest of the batch fails fast
            session.send(encode(sr_object(Patient())))
        assert time.monotonic() - started < 1.0
    # rejected-permanent: not worth retrying until the PACS or our configuration changes
    assert not caught.value.transient and not again.value.transient
    assert caught.value.reason == again.value.reason == (
        f"association rejected by NOTPACS@{LOOPBACK}:{orthanc.dicom_port}: Called AE title not "
        "recognised (Rejected Permanent, from Service User; calling AE MRRP)")


def test_a_transient_association_rejection_is_retried_later() -> None:
    with storage_scp(max_associations=1) as peer:
        busy = AE(ae_title="OTHER")
        busy.add_requested_context(ENCAPSULATED_PDF, ExplicitVRLittleEndian)
        held = busy.associate(LOOPBACK, peer.port, ae_title="TESTSCP")
        assert held.is_established
        try:
            sender = DicomSender(LOOPBACK, peer.port, "TESTSCP", timeout_s=10)
            with pytest.raises(SendError) as caught:
                sender.send(encode(encapsulated_pdf(Patient())))
        finally:
            held.release()
        assert caught.value.transient
        assert "Rejected Transient" in caught.value.reason
        peer.wait_idle()
        sender.send(encode(encapsulated_pdf(Patient())))  # free again: delivered
        assert len(peer.received) == 1


@pytest.mark.parametrize("make", [sr_object, encapsulated_pdf])
def test_a_peer_taking_implicit_vr_only_gets_our_explicit_vr_objects(make) -> None:
    ds = make(Patient("SND010"))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    with storage_scp(transfer_syntaxes=[ImplicitVRLittleEndian]) as peer:
        DicomSender(LOOPBACK, peer.port, "TESTSCP", timeout_s=10).send(encode(ds))
        assert peer.syntaxes == [ImplicitVRLittleEndian]
        (received,) = peer.datasets
    # the same attributes, re-encoded by pynetdicom in the accepted transfer syntax
    assert received.SOPInstanceUID == ds.SOPInstanceUID
    for keyword in ("ContentSequence", "EncapsulatedDocument", "PatientID", "StudyInstanceUID"):
        if keyword in ds:
            assert received[keyword].value == ds[keyword].value, keyword


def test_an_explicit_vr_peer_gets_explicit_vr() -> None:
    with storage_scp(transfer_syntaxes=[ExplicitVRLittleEndian, ImplicitVRLittleEndian]) as peer:
        DicomSender(LOOPBACK, peer.port, "TESTSCP", timeout_s=10).send(
            encode(encapsulated_pdf(Patient())))
        assert peer.syntaxes == [ExplicitVRLittleEndian]


def test_peer_without_the_sop_class_is_a_permanent_failure() -> None:
    wsi = dcmread(io.BytesIO(encode(us_image(Patient()))))
    wsi.SOPClassUID = wsi.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.77.1.6")
    with storage_scp() as peer:
        with pytest.raises(SendError) as caught:
            DicomSender(LOOPBACK, peer.port, "TESTSCP", timeout_s=10).send(encode(wsi))
        assert peer.received == []
    assert not caught.value.transient
    assert "accepts none of the offered presentation contexts" in caught.value.reason


@pytest.mark.filterwarnings("ignore:End of file reached:UserWarning")
@pytest.mark.parametrize("data", [b"", b"MSH|^~\\&|MRRP\r", b"\0" * 128 + b"DICM" + b"\xff" * 40])
def test_bytes_that_are_not_dicom_are_refused_before_connecting(data: bytes) -> None:
    sender = DicomSender(LOOPBACK, free_port(), "PACS", timeout_s=5)
    with pytest.raises(SendError) as caught:
        sender.send(data)
    assert not caught.value.transient
    assert caught.value.reason.startswith(("not a DICOM file", "DICOM object lacks"))


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"called_ae": ""}, "called AE title"),
    ({"called_ae": "A" * 17}, "called AE title"),
    ({"calling_ae": "BAD\\AE"}, "calling AE title"),
    ({"port": 70000}, "DICOM port"),
    ({"timeout_s": 0}, "timeout_s"),
])
def test_bad_settings_are_refused(kwargs: dict[str, object], words: str) -> None:
    settings: dict[str, object] = {"host": LOOPBACK, "port": 104, "called_ae": "PACS"}
    with pytest.raises(ValueError, match=words):
        DicomSender(**(settings | kwargs))  # type: ignore[arg-type]


def test_peer_names_destination() -> None:
    assert DicomSender("pacs.local", 11112, "PACS", "ME").peer == "PACS@pacs.local:11112"
