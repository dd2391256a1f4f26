"""The scheduler's persistent job store: jobs survive a restart, a missed night is kept."""

import time
from datetime import UTC, datetime, timedelta

import pytest

from mrrp_pacs.daemon import build_scheduler, scheduler_db
from mrrp_pacs.errors import ConfigError


def test_jobs_persist_and_a_missed_nightly_rescore_runs_at_the_next_start(config):
    config.paths.db_file.parent.mkdir(parents=True)
    first = build_scheduler(config)
    assert {job.id for job in first.get_jobs()} == {"process", "rescore", "export"}
    missed = datetime.now(UTC) - timedelta(hours=1)
    first.modify_job("rescore", next_run_time=missed)  # the daemon was down at 02:00
    first.shutdown(wait=False)
    assert scheduler_db(config).exists()

    again = build_scheduler(config)
    try:
        assert again.get_job("rescore").next_run_time == missed  # due at once, coalesced
        assert again.get_job("process").next_run_time <= datetime.now(UTC)
    finally:
        again.shutdown(wait=False)

    moved = build_scheduler(config.replace("scoring", rescore_time="03:30"))
    try:
        rescore = moved.get_job("rescore")
        assert rescore.next_run_time > datetime.now(UTC)
        assert (rescore.next_run_time.hour, rescore.next_run_time.minute) == (3, 30)
    finally:
        moved.shutdown(wait=False)
    with_pacs = build_scheduler(config.replace("pacs", host="127.0.0.1"))
    try:
        assert with_pacs.get_job("pull") is not None
    finally:
        with_pacs.shutdown(wait=False)


def test_nightly_rescore_keeps_its_local_time_across_daylight_saving(config):
    config.paths.db_file.parent.mkdir(parents=True)
    berlin = config.replace("scoring", timezone="Europe/Berlin", rescore_time="01:30")
    scheduler = build_scheduler(berlin)
    try:
        trigger = scheduler.get_job("rescore").trigger
    finally:
        scheduler.shutdown(wait=False)
    # Berlin moves from UTC+1 to UTC+2 on 2027-03-28: a fixed offset would drift an hour
    fired, moment = [], datetime(2027, 3, 26, 12, tzinfo=UTC)
    for _ in range(4):
        moment = trigger.get_next_fire_time(fired[-1] if fired else None, moment)
        fired.append(moment)
        moment += timedelta(minutes=1)
    assert [(f.hour, f.minute) for f in fired] == [(1, 30)] * 4
    assert [f.astimezone(UTC).strftime("%d %H:%M") for f in fired] == [
        "27 00:30", "28 00:30", "28 23:30", "29 23:30"]


def test_a_time_zone_that_does_not_exist_is_refused(config):
    with pytest.raises(ConfigError, match=r"scoring\.timezone = 'Mars/Olympus'"):
        config.replace("scoring", timezone="Mars/Olympus").check()


def test_the_pacs_we_pull_from_stays_allowed_when_other_senders_are_listed(config, caplog):
    """C-MOVE sub-operations arrive with the PACS's AE title: listing a modality that pushes
    to us must not lock the PACS out; the start log names the allowed titles."""
    import logging

    from mrrp_pacs.daemon import allowed_calling_aes, components_from_config
    from mrrp_pacs.doctor import c_echo

    site = config.replace("dicom", allowed_aes=["MODALITY"], port=0).replace("http", port=0)
    assert allowed_calling_aes(site) == {"MODALITY", "ORTHANC"}
    scp = components_from_config(site).listeners[0]
    caplog.set_level(logging.INFO, logger="listeners.dicom_scp")
    scp.start()
    try:
        assert "calling AEs allowed: MODALITY, ORTHANC" in caplog.text
        for calling in ("ORTHANC", "MODALITY"):
            assert c_echo("127.0.0.1", scp.port, "MRRP", calling, timeout_s=10) is None
        assert c_echo("127.0.0.1", scp.port, "MRRP", "STRANGER", timeout_s=10) is not None
    finally:
        scp.stop()


def test_scoring_and_io_jobs_run_on_their_own_threads_also_after_an_upgrade(config):
    """A rescoring that takes hours must not hold up pull and export: they have their own
    executor; a job store written before the split (export on the scoring thread) is moved."""
    config.paths.db_file.parent.mkdir(parents=True)
    config = config.replace("pacs", host="127.0.0.1")
    old = build_scheduler(config)
    old.modify_job("export", executor="default")  # as the single-thread scheduler stored it
    old.shutdown(wait=False)
    scheduler = build_scheduler(config)
    try:
        executors = {job.id: job.executor for job in scheduler.get_jobs()}
        assert executors == {"process": "default", "rescore": "default", "pull": "io",
                             "export": "io"}
        assert scheduler._executors["io"]._pool._max_workers == 1
    finally:
        scheduler.shutdown(wait=False)


def test_dicom_max_associations_bounds_the_associations_served_at_once(config, store):
    """[dicom] max_associations reaches the daemon's SCP: that many senders are served at
    once, one more is rejected (A-ASSOCIATE-RJ) until one of them releases."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from mrrp_pacs.daemon import components_from_config

    with pytest.raises(ConfigError, match=r"dicom\.max_associations = 0"):
        config.replace("dicom", max_associations=0).check()
    site = config.replace("dicom", max_associations=3, port=0).replace("http", port=0)
    scp = components_from_config(site).listeners[0]
    scp.start()
    sender = AE(ae_title="ORTHANC")
    sender.add_requested_context(Verification)
    opened = []
    try:
        for _ in range(3):
            opened.append(sender.associate("127.0.0.1", scp.port, ae_title="MRRP"))
        assert all(a.is_established for a in opened)
        extra = sender.associate("127.0.0.1", scp.port, ae_title="MRRP")
        assert extra.is_rejected
        opened.pop().release()
        deadline = time.monotonic() + 10
        while len(scp.ae.active_associations) > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        again = sender.associate("127.0.0.1", scp.port, ae_title="MRRP")
        assert again.is_established
        opened.append(again)
    finally:
        for assoc in opened:
            assoc.release()
        scp.stop()
