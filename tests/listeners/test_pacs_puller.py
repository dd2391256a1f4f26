"""The PACS puller against a real Orthanc: C-FIND, then C-MOVE into our SCP or C-GET."""

import struct
from collections import Counter
from datetime import datetime, timedelta

import pydicom
import pytest
from orthanc import LOOPBACK, free_port, running_orthanc, storescu
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from listeners.dicom_scp import StorageScp, intake_opener
from listeners.pacs_puller import PacsPuller, RemotePacs
from mrrp_pacs.phantom.generator import PhantomSpec, generate

TINY = PhantomSpec(patients=2, seed=7, slide_px=1024, missing_wsi=0.0, missing_us=0.0,
                   missing_report=0.0)
NOW = datetime(2030, 1, 1, 12, 0)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    generate(TINY, root, workers=1)
    files = sorted((root / "dicom").rglob("*.dcm"))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    assert len(files) == 12 and len({h.StudyInstanceUID for h in headers}) == 4
    return root / "dicom", files, headers


@pytest.fixture
def scp_port():
    return free_port()


@pytest.fixture
def pacs(tmp_path, phantom, scp_port):
    with running_orthanc(tmp_path / "orthanc", "PACS",
                         {"MRRP": ["MRRP", LOOPBACK, scp_port]}) as server:
        loaded = storescu(server, phantom[0])
        assert loaded.returncode == 0, loaded.stderr
        assert server.statistics()["CountInstances"] == 12
        yield server


def _puller(store, pacs, scp_port, **options):
    options.setdefault("window_days", None)
    return PacsPuller(store, RemotePacs(LOOPBACK, pacs.dicom_port, "PACS"), "MRRP",
                      our_port=scp_port, **options)


def _rows(store, sql):
    return [dict(r) for r in store.conn.execute(sql)]


def _dataset_bytes(part10):
    (group_length,) = struct.unpack("<I", part10[140:144])
    return part10[144 + group_length:]


def _assert_same_objects(store, files, headers):
    rows = {r["sop_instance_uid"]: r for r in _rows(store, "SELECT * FROM instances")}
    assert set(rows) == {h.SOPInstanceUID for h in headers}
    for path, header in zip(files, headers, strict=True):
        row = rows[header.SOPInstanceUID]
        assert row["source"] == "dicom:PACS"
        assert row["transfer_syntax_uid"] == header.file_meta.TransferSyntaxUID
        stored = store.objects.read_bytes(row["sha256"])
        assert _dataset_bytes(stored) == _dataset_bytes(path.read_bytes())
    assert {r["transfer_syntax_uid"] for r in rows.values() if r["modality"] == "SM"} == {
        JPEGBaseline8Bit}


@pytest.mark.needs_tool("Orthanc", "storescu")
def test_move_retrieves_each_study_once_and_again_when_it_grows(config, store, pacs, scp_port,
                                                                 phantom, tmp_path):
    _, files, headers = phantom
    with StorageScp(intake_opener(config), "MRRP", scp_port, allowed_aes={"PACS"}):
        puller = _puller(store, pacs, scp_port)
        first = puller.poll(NOW)
        assert first.errors == [] and first.ok
        assert (first.found, first.retrieved, first.failed) == (4, 4, 0)
        per_study = Counter(h.StudyInstanceUID for h in headers)
        assert {s.study_instance_uid: s.completed for s in first.studies} == per_study
        _assert_same_objects(store, files, headers)
        retrievals = _rows(store, "SELECT * FROM retrievals")
        assert {r["state"] for r in retrievals} == {"complete"}
        assert {r["study_instance_uid"]: r["remote_instances"] for r in retrievals} == per_study
        assert {r["attempts"] for r in retrievals} == {1}
        assert {r["method"] for r in retrievals} == {"move"}

        second = puller.poll(NOW)
        assert (second.found, second.up_to_date, second.retrieved) == (4, 4, 0)
        assert second.studies == []
        assert len(_rows(store, "SELECT id FROM instances")) == 12

        # a new image arrives in an ultrasound study already retrieved
        us_path = next(p for p, h in zip(files, headers, strict=True) if h.Modality == "US")
        extra = pydicom.dcmread(us_path)
        extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        (tmp_path / "extra").mkdir()
        extra.save_as(tmp_path / "extra" / "extra.dcm")
        assert storescu(pacs, tmp_path / "extra").returncode == 0
        third = puller.poll(NOW)
    assert (third.found, third.up_to_date, third.retrieved) == (4, 3, 1)
    grown = third.studies[0]
    assert grown.study_instance_uid == extra.StudyInstanceUID
    # only the series that grew is moved again, not the rest of the study
    in_series = sum(h.SeriesInstanceUID == extra.SeriesInstanceUID for h in headers)
    assert (grown.series, grown.completed) == (1, in_series + 1)
    assert len(_rows(store, "SELECT id FROM instances")) == 13  # the rest were duplicates
    row = _rows(store, "SELECT attempts, remote_instances FROM retrievals WHERE "
                f"study_instance_uid = '{extra.StudyInstanceUID}'")[0]
    assert row == {"attempts": 2, "remote_instances": per_study[extra.StudyInstanceUID] + 1}


@pytest.mark.needs_tool("Orthanc", "storescu")
def test_get_retrieves_on_our_own_association(config, store, pacs, scp_port, phantom):
    _, files, headers = phantom
    puller = _puller(store, pacs, scp_port, method="get", open_intake=intake_opener(config))
    summary = puller.poll(NOW)  # no storage SCP is running: C-GET needs none
    assert summary.errors == [] and (summary.retrieved, summary.failed) == (4, 0)
    assert sum(s.completed for s in summary.studies) == 12
    _assert_same_objects(store, files, headers)
    assert {r["method"] for r in _rows(store, "SELECT method FROM retrievals")} == {"get"}
    assert puller.poll(NOW).up_to_date == 4


@pytest.mark.needs_tool("Orthanc", "storescu")
def test_window_and_modalities_choose_studies_and_series(store, pacs, scp_port, phantom,
                                                         config):
    _, _, headers = phantom
    us_studies = {h.StudyInstanceUID: h.StudyDate for h in headers if h.Modality == "US"}
    latest = max(us_studies.values())
    now = datetime.strptime(latest, "%Y%m%d") + timedelta(days=1)
    in_window = {uid for uid, date in us_studies.items() if date >= f"{now - timedelta(2):%Y%m%d}"}
    puller = _puller(store, pacs, scp_port, method="get", open_intake=intake_opener(config),
                     modalities=("US",), window_days=2)
    summary = puller.poll(now)
    assert summary.errors == []
    assert in_window and {s.study_instance_uid for s in summary.studies} == in_window
    # only the US series: the ROI SR in the same study is not wanted here
    modalities = {r["modality"] for r in _rows(store, "SELECT modality FROM instances")}
    assert modalities == {"US"}
    assert all(s.series == 1 for s in summary.studies)


@pytest.mark.needs_tool("Orthanc", "storescu")
def test_failed_studies_are_recorded_and_retried_next_poll(config, store, pacs, scp_port):
    puller = _puller(store, pacs, scp_port)
    down = puller.poll(NOW)  # our storage SCP is not running: every sub-operation fails
    assert down.errors == [] and (down.retrieved, down.failed) == (0, 4)
    error = down.studies[0].error
    assert error is not None and "C-MOVE of series 1 of 2" in error
    assert f"MRRP at this host, port {scp_port}" in error
    failed = _rows(store, "SELECT state, attempts, error, completed_at FROM retrievals")
    assert [(r["state"], r["attempts"], r["completed_at"]) for r in failed] == [
        ("failed", 1, None)] * 4
    assert not any("1.2." in r["error"] for r in failed)  # errors name no UID
    with StorageScp(intake_opener(config), "MRRP", scp_port, allowed_aes={"PACS"}):
        again = puller.poll(NOW)
    assert (again.retrieved, again.failed) == (4, 0)
    retried = _rows(store, "SELECT state, attempts, error FROM retrievals")
    assert retried == [{"state": "complete", "attempts": 2, "error": None}] * 4
    assert len(_rows(store, "SELECT id FROM instances")) == 12


@pytest.mark.needs_tool("Orthanc")
def test_pacs_errors_are_returned_not_raised(store, tmp_path, scp_port):
    closed = RemotePacs(LOOPBACK, free_port(), "PACS")
    summary = PacsPuller(store, closed, "MRRP", window_days=None).poll(NOW)
    assert summary.found == 0 and not summary.ok
    assert "cannot associate with the PACS (AE PACS, 127.0.0.1:" in summary.errors[0]

    with running_orthanc(tmp_path / "orthanc", "PACS", {}) as server:  # does not know us
        unknown = PacsPuller(store, RemotePacs(LOOPBACK, server.dicom_port, "PACS"), "MRRP",
                             window_days=None).poll(NOW)
    assert "DicomModalities" in unknown.errors[0]
    assert _rows(store, "SELECT id FROM retrievals") == []


def test_configuration_is_checked_eagerly(store):
    remote = RemotePacs(LOOPBACK, 104, "PACS")
    with pytest.raises(ValueError, match="needs open_intake"):
        PacsPuller(store, remote, "MRRP", method="get")
    with pytest.raises(ValueError, match="method"):
        PacsPuller(store, remote, "MRRP", method="push")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="modalities"):
        PacsPuller(store, remote, "MRRP", modalities=("us; drop",))
    with pytest.raises(ValueError, match="window_days"):
        PacsPuller(store, remote, "MRRP", window_days=0)
