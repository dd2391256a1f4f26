"""The PACS puller against a real Orthanc: C-FIND, then C-MOVE into our SCP or C-GET."""

import logging
import struct
from collections import Counter
from datetime import datetime, timedelta

import pydicom
import pytest
from orthanc import LOOPBACK, free_port, running_orthanc, storescu
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from listeners.dicom_scp import StorageScp, intake_opener
from listeners.pacs_puller import PacsPuller, RemotePacs
from mrrp_pacs.clock import iso_utc
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
        # C-GET: the puller's own association names the PACS; C-MOVE: our SCP adds its address
        assert row["source"] in {"dicom:PACS", f"dicom:PACS@{LOOPBACK}"}
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
def test_failed_studies_are_recorded_and_retried_after_their_backoff(config, store, pacs,
                                                                      scp_port, clock):
    puller = _puller(store, pacs, scp_port)
    down = puller.poll(NOW)  # our storage SCP is not running: every sub-operation fails
    assert down.errors == [] and (down.retrieved, down.failed) == (0, 4)
    error = down.studies[0].error
    assert error is not None and "C-MOVE of series 1 of 2" in error
    assert f"MRRP at this host, port {scp_port}" in error
    failed = _rows(store, "SELECT state, attempts, error, completed_at, failures, "
                          "failing_since, next_attempt_at FROM retrievals")
    assert [(r["state"], r["attempts"], r["completed_at"], r["failures"]) for r in failed] == [
        ("failed", 1, None, 1)] * 4
    assert {(r["failing_since"], r["next_attempt_at"]) for r in failed} == {
        (iso_utc(clock()), iso_utc(clock() + timedelta(seconds=300)))}
    assert not any("1.2." in r["error"] for r in failed)  # errors name no UID
    with StorageScp(intake_opener(config), "MRRP", scp_port, allowed_aes={"PACS"}):
        waiting = puller.poll(NOW)  # the same moment: every study waits for its backoff
        assert (waiting.found, waiting.backing_off, waiting.studies) == (4, 4, [])
        clock.advance(seconds=300)
        again = puller.poll(NOW)
    assert (again.retrieved, again.failed, again.backing_off) == (4, 0, 0)
    retried = _rows(store, "SELECT state, attempts, error, failures, failing_since, "
                           "next_attempt_at FROM retrievals")
    assert retried == [{"state": "complete", "attempts": 2, "error": None, "failures": 0,
                        "failing_since": None, "next_attempt_at": None}] * 4
    assert len(_rows(store, "SELECT id FROM instances")) == 12


def _copy(path, folder, **changes):
    """A copy of a DICOM file with new UIDs and the attributes in ``changes``."""
    dataset = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    if "SOPClassUID" in changes:
        dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    dataset.save_as(folder / f"{dataset.SOPInstanceUID}.dcm")
    return dataset


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # a storage class our SCP does not accept


@pytest.mark.needs_tool("Orthanc", "storescu")
def test_a_failing_study_backs_off_is_given_up_and_does_not_starve_the_others(
        config, store, pacs, scp_port, phantom, clock, tmp_path, caplog):
    """A study whose objects our SCP refuses (a Secondary Capture image in a US series) fails
    at every attempt: it waits 300, 600, then 1200 s (the cap) between attempts, studies never
    tried are retrieved before it, and after the retry budget (1 h) it is given up, logged
    without identifiers, and skipped."""
    caplog.set_level(logging.INFO, logger="listeners.pacs_puller")
    files, headers = phantom[1], phantom[2]
    us_path = next(p for p, h in zip(files, headers, strict=True) if h.Modality == "US")
    bad = _copy(us_path, tmp_path / "bad", SOPClassUID=SECONDARY_CAPTURE,
                StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid())
    assert storescu(pacs, tmp_path / "bad").returncode == 0
    puller = _puller(store, pacs, scp_port, retry_backoff_s=300, retry_max_backoff_s=1200,
                     retry_budget_s=3600)
    one_per_poll = _puller(store, pacs, scp_port, retry_backoff_s=300,
                           retry_max_backoff_s=1200, retry_budget_s=3600,
                           max_studies_per_poll=1)

    def bad_row():
        return _rows(store, "SELECT state, attempts, failures, next_attempt_at FROM "
                     f"retrievals WHERE study_instance_uid = '{bad.StudyInstanceUID}'")[0]

    waits = []
    with StorageScp(intake_opener(config), "MRRP", scp_port, allowed_aes={"PACS"}):
        first = puller.poll(NOW)
        assert (first.found, first.retrieved, first.failed) == (5, 4, 1)
        assert [s.study_instance_uid for s in first.studies if s.state == "failed"] == [
            bad.StudyInstanceUID]
        while bad_row()["state"] == "failed":
            due = datetime.fromisoformat(bad_row()["next_attempt_at"])
            waits.append(int((due - clock()).total_seconds()))
            clock.set(due - timedelta(seconds=1))
            early = puller.poll(NOW)
            assert (early.backing_off, early.studies) == (1, [])
            assert early.up_to_date == early.found - 1
            clock.set(due)
            if len(waits) == 3:
                # a new study arrives while the failing one is due: the new one goes first
                _copy(us_path, tmp_path / "new", StudyInstanceUID=generate_uid(),
                      SeriesInstanceUID=generate_uid())
                assert storescu(pacs, tmp_path / "new").returncode == 0
                ordered = one_per_poll.poll(NOW)
                assert [s.state for s in ordered.studies] == ["complete"]
                assert ordered.studies[0].study_instance_uid != bad.StudyInstanceUID
                assert ordered.deferred == 1
            attempt = puller.poll(NOW)
            assert [s.study_instance_uid for s in attempt.studies] == [bad.StudyInstanceUID]
        given_up = attempt
        later = puller.poll(NOW)
    # failing since t=0: attempts at 300, 900, 2100, 3300 back off; the one at 4500 gives up
    assert waits == [300, 600, 1200, 1200, 1200]
    assert given_up.gave_up == 1 and given_up.as_dict()["gave_up"] == 1
    assert bad_row() == {"state": "gave_up", "attempts": 6, "failures": 6,
                         "next_attempt_at": None}
    assert (later.abandoned, later.studies, later.up_to_date) == (1, [], 5)
    assert "1 studies given up after failing for 1 hours" in caplog.text
    for uid in {h.StudyInstanceUID for h in headers} | {bad.StudyInstanceUID}:
        assert uid not in caplog.text
    assert not any(h.PatientID in caplog.text for h in headers)


@pytest.fixture
def late_slide_pacs(tmp_path, phantom, scp_port):
    """The PACS after a slide was scanned weeks after its study began: the ultrasound studies
    are dated yesterday, the slide study of the first patient 30 days ago (its StudyDate is
    the biopsy's), and the second patient's slide is not there."""
    _, files, headers = phantom
    first_patient = min(h.PatientID for h in headers)
    folder = tmp_path / "late"
    for path, header in zip(files, headers, strict=True):
        if header.Modality in ("SM", "ANN") and header.PatientID != first_patient:
            continue
        dataset = pydicom.dcmread(path)
        days = 30 if header.Modality in ("SM", "ANN") else 1
        dataset.StudyDate = f"{NOW - timedelta(days=days):%Y%m%d}"
        (folder / header.PatientID).mkdir(parents=True, exist_ok=True)
        dataset.save_as(folder / header.PatientID / f"{header.SOPInstanceUID}.dcm")
    with running_orthanc(tmp_path / "orthanc", "PACS",
                         {"MRRP": ["MRRP", LOOPBACK, scp_port]}) as server:
        assert storescu(server, folder).returncode == 0
        assert server.statistics()["CountInstances"] == 8
        yield server, first_patient


@pytest.mark.needs_tool("Orthanc", "storescu")
def test_the_look_back_finds_a_slide_dated_before_the_window(config, store, late_slide_pacs,
                                                              scp_port, clock):
    pacs, first_patient = late_slide_pacs
    puller = _puller(store, pacs, scp_port, method="get",
                     open_intake=intake_opener(config, clock=clock),  # received_at by the clock
                     window_days=7, lookback_patients=1, lookback_days=90,
                     lookback_interval_s=6 * 3600)

    def modalities():
        return {(r["patient_id"], r["modality"]) for r in _rows(
            store, "SELECT DISTINCT patient_id, modality FROM instances")}

    window = puller.poll(NOW)  # only the ultrasound studies are dated in the window
    assert (window.found, window.retrieved, window.looked_back) == (2, 2, 0)
    assert {m for _, m in modalities()} == {"US", "SR"}
    # both patients now lack a slide; past the horizon from their first arrival, neither is asked
    clock.advance(days=91)
    assert puller.lookback_candidates() == []
    clock.advance(days=-91)
    assert len(puller.lookback_candidates()) == 1  # lookback_patients bounds each poll

    polls = [puller.poll(NOW), puller.poll(NOW)]  # one patient each
    assert [p.looked_back for p in polls] == [1, 1]
    assert sum(p.found_by_lookback for p in polls) == 1 and sum(p.retrieved for p in polls) == 1
    assert (first_patient, "SM") in modalities() and (first_patient, "ANN") in modalities()
    assert {m for p, m in modalities() if p != first_patient} == {"US", "SR"}
    asked = _rows(store, "SELECT patient_id, studies FROM pull_lookbacks ORDER BY patient_id")
    assert [r["patient_id"] for r in asked] == sorted({p for p, _ in modalities()})
    # the first patient is complete; the second, still without a slide, waits 6 h to be asked
    assert puller.poll(NOW).looked_back == 0
    clock.advance(hours=6)
    again = puller.poll(NOW)
    assert (again.looked_back, again.found_by_lookback, again.studies) == (1, 0, [])


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
    with pytest.raises(ValueError, match="lookback_days"):
        PacsPuller(store, remote, "MRRP", lookback_days=-1)
    with pytest.raises(ValueError, match="retry_backoff_s"):
        PacsPuller(store, remote, "MRRP", retry_backoff_s=600, retry_max_backoff_s=60)


@pytest.mark.needs_tool("Orthanc", "storescu")
def test_a_study_found_by_looking_back_is_not_lost_when_deferred_or_failed(
        config, store, late_slide_pacs, scp_port, phantom, clock, tmp_path):
    """Found only by the look-back, the slide study is retrieved although the poll that found
    it had no room left (its patient is asked again at the next poll) and although its first
    attempt failed (it is retried from the retrievals table when due, the patient not asked)."""
    pacs, first_patient = late_slide_pacs
    _, files, headers = phantom
    options = {"window_days": 7, "lookback_interval_s": 6 * 3600, "retry_backoff_s": 300}
    puller = _puller(store, pacs, scp_port, max_studies_per_poll=1, **options)
    with StorageScp(intake_opener(config, clock=clock), "MRRP", scp_port,
                    allowed_aes={"PACS"}):
        assert _puller(store, pacs, scp_port, **options).poll(NOW).retrieved == 2  # the US
        # a newer ultrasound study of the other patient arrives: it is retrieved first
        other_us = next(p for p, h in zip(files, headers, strict=True)
                        if h.Modality == "US" and h.PatientID != first_patient)
        _copy(other_us, tmp_path / "newer", StudyInstanceUID=generate_uid(),
              SeriesInstanceUID=generate_uid(), StudyDate=f"{NOW:%Y%m%d}")
        assert storescu(pacs, tmp_path / "newer").returncode == 0
        crowded = puller.poll(NOW)
    assert (crowded.looked_back, crowded.found_by_lookback) == (2, 1)
    assert (crowded.retrieved, crowded.deferred) == (1, 1)
    failing = puller.poll(NOW)  # asked again at once; our SCP is down: the C-MOVE fails
    assert (failing.looked_back, failing.found_by_lookback, failing.failed) == (1, 1, 1)
    clock.advance(seconds=300)
    with StorageScp(intake_opener(config, clock=clock), "MRRP", scp_port,
                    allowed_aes={"PACS"}):
        retried = puller.poll(NOW)
    assert (retried.looked_back, retried.found_by_lookback, retried.retrieved) == (0, 0, 1)
    slides = _rows(store, "SELECT DISTINCT patient_id FROM instances WHERE modality = 'SM'")
    assert slides == [{"patient_id": first_patient}]
    assert _rows(store, "SELECT state FROM retrievals WHERE state != 'complete'") == []
