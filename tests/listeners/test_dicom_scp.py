"""The storage SCP against real senders: dcmtk's storescu/echoscu and a pynetdicom SCU."""

import logging
import sqlite3
import struct
import subprocess
import time

import pydicom
import pytest
from builders import Patient, us_image, write
from dicom_peer import store_one
from orthanc import LOOPBACK
from pydicom.uid import JPEGBaseline8Bit
from pynetdicom import AE
from pynetdicom.sop_class import UltrasoundImageStorage
from tools import tool

from listeners.dicom_scp import DUL_IDLE_POLL_S, StorageScp, intake_opener
from mrrp_pacs.phantom.generator import PhantomSpec, generate

TINY = PhantomSpec(patients=2, seed=5, slide_px=1024, missing_wsi=0.0, missing_us=0.0,
                   missing_report=0.0)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    generate(TINY, root, workers=1)
    files = sorted((root / "dicom").rglob("*.dcm"))
    assert len(files) == 12  # per patient: 3 slide levels, annotation, US image, ROI SR
    return root / "dicom", files


@pytest.fixture
def running_scp(config, store):
    scp = StorageScp(intake_opener(config), "MRRP", 0, allowed_aes={"MRRPTEST"})
    scp.start()
    yield scp
    scp.stop()


def _storescu(scp, folder, calling="MRRPTEST", called="MRRP", *options):
    return subprocess.run(
        [tool("storescu"), *options, "-R", "-xy", "-aet", calling, "-aec", called, "+sd", "+r",
         LOOPBACK, str(scp.port), str(folder)], capture_output=True, text=True, timeout=120)


def _dataset_bytes(part10: bytes) -> bytes:
    """The encoded data set after the file meta (whose group length sits at byte 140)."""
    assert part10[128:132] == b"DICM" and part10[132:136] == b"\x02\x00\x00\x00"
    (group_length,) = struct.unpack("<I", part10[140:144])
    return part10[144 + group_length:]


def _count(store, table="instances"):
    return store.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


@pytest.mark.needs_tool("storescu")
def test_storescu_objects_are_persisted_as_sent(running_scp, store, phantom, caplog):
    folder, files = phantom
    caplog.set_level(logging.INFO, logger="listeners.dicom_scp")
    sent = _storescu(running_scp, folder)
    assert sent.returncode == 0, sent.stderr
    rows = {r["sop_instance_uid"]: r for r in store.conn.execute("SELECT * FROM instances")}
    assert len(rows) == 12
    for path in files:
        original = path.read_bytes()
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        row = rows[uid]
        stored = store.objects.read_bytes(row["sha256"])
        # the data set is stored byte for byte as sent; only the file meta is ours (it is
        # rebuilt from the request: Implementation Class UID of pynetdicom, not of the writer)
        assert _dataset_bytes(stored) == _dataset_bytes(original)
        assert stored != original
        assert row["source"] == f"dicom:MRRPTEST@{LOOPBACK}"
        assert row["transfer_syntax_uid"] == pydicom.dcmread(path).file_meta.TransferSyntaxUID
    slides = [r for r in rows.values() if r["modality"] == "SM"]
    assert len(slides) == 6
    assert {r["transfer_syntax_uid"] for r in slides} == {JPEGBaseline8Bit}  # not transcoded
    assert {r["modality"] for r in rows.values()} == {"SM", "ANN", "US", "SR"}

    again = _storescu(running_scp, folder)
    assert again.returncode == 0, again.stderr
    assert _count(store) == 12  # duplicates are acknowledged and not stored twice

    log = caplog.text
    assert "association accepted: MRRPTEST -> MRRP" in log
    assert "association released: MRRPTEST, 12 new, 0 duplicate" in log
    assert "0 new, 12 duplicate" in log
    patient_ids = {pydicom.dcmread(p, stop_before_pixels=True).PatientID for p in files}
    assert not any(pid in log for pid in patient_ids)
    assert not any(uid in log for uid in rows)


@pytest.mark.needs_tool("storescu")
def test_concurrent_associations_each_persist_safely(running_scp, store, phantom):
    folder, _ = phantom
    command = [tool("storescu"), "-R", "-xy", "-aet", "MRRPTEST", "-aec", "MRRP", "+sd", "+r",
               LOOPBACK, str(running_scp.port), str(folder)]
    senders = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for sender in senders:
        _, errors = sender.communicate(timeout=120)
        assert sender.returncode == 0, errors
    # the same objects raced in three threads: each stored once, every copy acknowledged
    assert _count(store) == 12
    assert store.conn.execute("SELECT count(DISTINCT sha256) FROM instances").fetchone()[0] == 12


@pytest.mark.needs_tool("echoscu")
def test_echo_answers_and_a_busy_port_fails_at_start(running_scp, config):
    echo = subprocess.run([tool("echoscu"), "-aet", "MRRPTEST", "-aec", "MRRP", LOOPBACK,
                           str(running_scp.port)], capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    second = StorageScp(intake_opener(config), "MRRP", running_scp.port)
    with pytest.raises(OSError):
        second.start()
    assert not second.running


@pytest.mark.needs_tool("storescu")
def test_unknown_calling_or_called_ae_is_rejected_at_association(running_scp, store, phantom,
                                                                  caplog):
    folder, _ = phantom
    caplog.set_level(logging.WARNING, logger="listeners.dicom_scp")
    stranger = _storescu(running_scp, folder, calling="STRANGER")
    assert stranger.returncode != 0
    assert "Association Rejected" in stranger.stderr
    assert "Calling AE Title Not Recognized" in stranger.stderr
    misdialled = _storescu(running_scp, folder, called="OTHERPACS")
    assert misdialled.returncode != 0
    assert "Called AE Title Not Recognized" in misdialled.stderr
    assert _count(store) == 0
    assert "rejected (calling AE title not recognised): STRANGER -> MRRP" in caplog.text
    assert "rejected (called AE title not recognised): MRRPTEST -> OTHERPACS" in caplog.text


@pytest.mark.needs_tool("storescu")
def test_unsupported_sop_class_gets_no_presentation_context(running_scp, store, tmp_path):
    ct = us_image(Patient())
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ct.Modality = "CT"
    write(ct, tmp_path / "ct" / "ct.dcm")
    sent = _storescu(running_scp, tmp_path / "ct")
    assert sent.returncode != 0
    assert "No presentation context" in sent.stderr or "no acceptable presentation" in (
        sent.stderr.lower())
    assert _count(store) == 0


@pytest.mark.needs_tool("storescu")
def test_persistence_failure_answers_out_of_resources(config, store, tmp_path):
    blocked = tmp_path / "objects-is-a-file"
    blocked.write_bytes(b"")  # the object store cannot create its folders: a real OSError
    broken = config.replace("paths", objects=blocked)
    path = write(us_image(Patient()), tmp_path / "one" / "us.dcm")
    with StorageScp(intake_opener(broken), "MRRP", 0, allowed_aes={"MRRPTEST"}) as scp:
        sent = _storescu(scp, path.parent, "MRRPTEST", "MRRP", "-v")
    assert sent.returncode != 0
    # storescu -v names status 0xA700 by its meaning
    assert "Received Store Response (Refused: OutOfResources)" in sent.stderr, sent.stderr
    assert _count(store) == 0


def test_unusable_object_answers_cannot_understand(running_scp, store):
    bad = us_image(Patient())
    del bad.StudyInstanceUID  # intake refuses an object it cannot file
    status = store_one(running_scp.port, bad)
    assert status.Status == 0xC000
    assert "StudyInstanceUID" in status.ErrorComment
    assert len(status.ErrorComment) <= 64
    assert _count(store) == 0


def test_configuration_is_checked_eagerly(config):
    opener = intake_opener(config)
    with pytest.raises(ValueError, match="allowed_aes is empty"):
        StorageScp(opener, "MRRP", 0, allowed_aes=set())
    with pytest.raises(ValueError):
        StorageScp(opener, "A" * 17, 0)
    with pytest.raises(ValueError, match="port"):
        StorageScp(opener, "MRRP", 70000)
    assert StorageScp(opener, "MRRP", 0).host == "127.0.0.1"


def test_the_opener_lends_connections_again_and_drops_a_failed_one(config, store):
    opener = intake_opener(config)
    with opener() as first:
        pass
    with opener() as second:
        assert second.store is first.store  # returned after use, lent again
        with opener() as third:  # at the same time: a connection of its own
            assert third.store is not first.store
    with pytest.raises(RuntimeError), opener() as failing:
        lent = failing.store
        raise RuntimeError("the object could not be stored")
    with pytest.raises(sqlite3.ProgrammingError):  # closed, not lent again
        lent.conn.execute("SELECT 1")
    with opener() as after:
        assert after.store is not lent


def test_idle_associations_poll_their_socket_less_often(running_scp):
    ae = AE(ae_title="MRRPTEST")
    ae.add_requested_context(UltrasoundImageStorage)
    assoc = ae.associate(LOOPBACK, running_scp.port, ae_title="MRRP")
    assert assoc.is_established
    try:
        served = running_scp.ae.active_associations
        assert len(served) == 1
        assert served[0].dul._run_loop_delay == DUL_IDLE_POLL_S > 0.001  # pynetdicom's 1 ms
        assert "_waiting_get_msg" in served[0].dimse.get_msg.__qualname__  # ours, not the poll
        for _ in range(3):  # and it still serves one request after another
            assert assoc.send_c_store(us_image(Patient())).Status == 0x0000
    finally:
        assoc.release()
    # a release is noticed within the reactor's wait
    deadline = time.monotonic() + 5
    while running_scp.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not running_scp.ae.active_associations




@pytest.mark.needs_tool("storescu")
def test_another_ae_cannot_replace_an_instance_and_is_told_not_to_retry(config, store,
                                                                        tmp_path):
    """AE A stores an image; AE B sends the same SOP Instance UID with other bytes: refused
    with 0xC000 (not retried), the stored bytes stay, the object is kept for the operator
    (`mrrp-pacs quarantine list`) and audited. A re-sending a corrected object replaces it."""
    from click.testing import CliRunner

    from mrrp_pacs import audit
    from mrrp_pacs.cli import main

    image = us_image(Patient())
    first = write(image, tmp_path / "a" / "us.dcm")
    image.InstanceNumber = 2
    with StorageScp(intake_opener(config), "MRRP", 0, allowed_aes={"A", "B"}) as scp:
        sent = _storescu(scp, first.parent, "A", "MRRP")
        assert sent.returncode == 0, sent.stderr
        (row,) = store.conn.execute("SELECT * FROM instances").fetchall()
        assert row["source"] == f"dicom:A@{LOOPBACK}"
        stored = store.objects.read_bytes(row["sha256"])

        status = store_one(scp.port, image, calling="B")
        assert status.Status == 0xC000
        assert "another source" in status.ErrorComment
        (still,) = store.conn.execute("SELECT * FROM instances").fetchall()
        assert store.objects.read_bytes(still["sha256"]) == stored

        listed = CliRunner().invoke(main, ["quarantine", "list", "--db",
                                           str(config.paths.db_file)])
        assert listed.exit_code == 0, listed.output
        assert f"dicom/dicom  B@{LOOPBACK}" in listed.output
        assert "SOP Instance UID stored from another source; not replaced" in listed.output
        assert [(r.event, r.who, r.what) for r in audit.listing(store)] == [
            ("received", f"dicom:A@{LOOPBACK}", image.SOPInstanceUID),
            ("refused", f"dicom:B@{LOOPBACK}", image.SOPInstanceUID)]

        corrected = write(image, tmp_path / "a2" / "us.dcm")
        sent = _storescu(scp, corrected.parent, "A", "MRRP")
        assert sent.returncode == 0, sent.stderr
    current = store.conn.execute("SELECT * FROM instances WHERE superseded_by IS NULL").fetchall()
    assert len(current) == 1 and current[0]["id"] != row["id"]
    assert pydicom.dcmread(store.objects.path_for(current[0]["sha256"])).InstanceNumber == 2
