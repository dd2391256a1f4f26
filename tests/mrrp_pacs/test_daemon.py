"""The scheduler's persistent job store: jobs survive a restart, a missed night is kept."""

import json
import socket
import socketserver
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from mrrp_pacs.daemon import Heartbeat, build_scheduler, scheduler_db
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


def test_the_scheduler_outlives_a_job_store_it_cannot_write(config, caplog):
    """A job store that cannot be written (here locked by another connection; on a full disk
    SQLITE_FULL) once ended APScheduler's thread for good; now the scheduler tries again, its
    heartbeat goes stale meanwhile and beats again once the store can be written."""
    import sqlite3

    config.paths.db_file.parent.mkdir(parents=True)
    heartbeat = Heartbeat(interval_s=0.2, limit_s=1.0)
    scheduler = build_scheduler(config, heartbeat=heartbeat)
    scheduler.jobstore_retry_interval = 0.5
    for job in scheduler.get_jobs(jobstore="default"):
        job.pause()  # the pipeline's jobs do not run here
    # a job of the persistent store, due every 0.3 s: each run rewrites its next run time
    scheduler.add_job("time:sleep", "interval", seconds=0.3, args=[0], id="probe")
    scheduler.resume()
    holder = sqlite3.connect(scheduler_db(config), timeout=10, isolation_level=None)
    try:
        _eventually(heartbeat.fresh)
        holder.execute("BEGIN IMMEDIATE")  # readers go on, writers wait, then fail
        _eventually(lambda: not heartbeat.fresh(), timeout_s=15)
        _eventually(lambda: "could not update its job store" in caplog.text,
                           timeout_s=15)
        holder.execute("ROLLBACK")
        _eventually(heartbeat.fresh, timeout_s=15)
        assert scheduler._thread.is_alive()
    finally:
        holder.close()
        scheduler.shutdown(wait=False)


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


def _runs(trigger, start, count):
    """The first ``count`` fire times from ``start``, as the scheduler asks for them (each
    after the previous run, with "now" just past it)."""
    fired, now = [], start
    for _ in range(count):
        fire = trigger.get_next_fire_time(fired[-1] if fired else None, now)
        fired.append(fire)
        now = fire.astimezone(UTC) + timedelta(seconds=1)
    return fired


@pytest.mark.parametrize(("rescore_time", "start", "local", "utc"), [
    # autumn: 02:00-02:59 happens twice on 2027-10-31; the run is once, at the first
    ("02:30", datetime(2027, 10, 29, 12, tzinfo=UTC), [(2, 30)] * 4,
     ["30 00:30", "31 00:30", "01 01:30", "02 01:30"]),
    ("01:30", datetime(2027, 10, 29, 12, tzinfo=UTC), [(1, 30)] * 4,
     ["29 23:30", "30 23:30", "01 00:30", "02 00:30"]),
    # spring: 02:00-02:59 does not exist on 2027-03-28; that night runs at 03:30, once
    ("02:30", datetime(2027, 3, 26, 12, tzinfo=UTC), [(2, 30), (3, 30), (2, 30), (2, 30)],
     ["27 01:30", "28 01:30", "29 00:30", "30 00:30"]),
])
def test_the_nightly_rescore_runs_once_a_night_at_its_local_time_across_both_changes(
        config, rescore_time, start, local, utc):
    config.paths.db_file.parent.mkdir(parents=True)
    berlin = config.replace("scoring", timezone="Europe/Berlin", rescore_time=rescore_time)
    scheduler = build_scheduler(berlin)
    try:
        trigger = scheduler.get_job("rescore").trigger
    finally:
        scheduler.shutdown(wait=False)
    fired = [f.astimezone(UTC).astimezone(ZoneInfo("Europe/Berlin"))
             for f in _runs(trigger, start, 4)]
    assert [(f.hour, f.minute) for f in fired] == local  # the wall clock in Berlin
    assert [f.astimezone(UTC).strftime("%d %H:%M") for f in fired] == utc


def test_a_nightly_job_stored_with_a_fixed_utc_offset_is_replaced_by_the_named_zone(config):
    """An earlier version stored the trigger with the offset of the day it started (+01:00):
    kept, it would run an hour off all summer. It is replaced; a missed night stays due."""
    from apscheduler.triggers.cron import CronTrigger

    config.paths.db_file.parent.mkdir(parents=True)
    berlin = config.replace("scoring", timezone="Europe/Berlin", rescore_time="01:30")
    old = build_scheduler(berlin)
    missed = datetime.now(UTC) - timedelta(hours=1)
    old.add_job("mrrp_pacs.daemon:run_job", CronTrigger(
        hour=1, minute=30, timezone=timezone(timedelta(hours=1))), args=["rescore"],
        id="rescore", name="rescore", replace_existing=True, next_run_time=missed)
    old.shutdown(wait=False)

    again = build_scheduler(berlin)
    try:
        job = again.get_job("rescore")
        assert str(job.trigger.timezone) == "Europe/Berlin"
        assert job.next_run_time == missed  # the night it missed still runs at start
        summer = job.trigger.get_next_fire_time(None, datetime(2027, 7, 1, 12, tzinfo=UTC))
        assert (summer.hour, summer.minute) == (1, 30)
        assert summer.astimezone(UTC).strftime("%H:%M") == "23:30"
    finally:
        again.shutdown(wait=False)


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _health(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
            status, body = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    components = json.loads(body)["components"]
    return status, sorted(name for name, alive in components.items() if not alive)


def _eventually(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.05)


# the MLLP thread is killed by stopping its loop under it: asyncio.run raises in that thread
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_healthz_names_the_listener_or_scheduler_whose_thread_died(config):
    from mrrp_pacs.daemon import Daemon, Heartbeat, components_from_config

    site = (config.replace("dicom", port=0).replace("hl7", port=0)
            .replace("http", port=_free_port()))
    port = site.http.port
    now = [1000.0]  # the heartbeat's monotonic clock, moved by the test
    components = components_from_config(site)
    daemon = Daemon(site, components,
                    heartbeat=Heartbeat(interval_s=0.2, limit_s=60, monotonic=lambda: now[0]))
    daemon.start()
    try:
        assert _health(port) == (200, [])
        # the scheduler stops firing jobs (paused: its thread lives on, the heartbeat ages)
        daemon.scheduler.pause()
        time.sleep(0.5)  # a beat already handed to the executor is done
        now[0] += 60
        assert _health(port) == (200, [])  # not older than the limit yet
        now[0] += 1
        assert _health(port) == (503, ["scheduler"])
        daemon.scheduler.resume()  # the overdue heartbeat runs at once
        _eventually(lambda: _health(port) == (200, []))

        mllp = components.listeners[1]
        loop, thread = mllp.handle.loop, mllp.handle.thread
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        assert not thread.is_alive()
        assert _health(port) == (503, ["hl7"])

        scp = components.listeners[0]
        server, acceptor = scp._servers[0]
        socketserver.BaseServer.shutdown(server)  # its acceptor loop ends
        _eventually(lambda: not acceptor.is_alive())
        assert _health(port) == (503, ["dicom", "hl7"])

        daemon.scheduler.shutdown(wait=False)
        assert _health(port) == (503, ["dicom", "hl7", "scheduler"])
    finally:
        daemon.stop()


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


@pytest.mark.needs_tool("openssl")
def test_tls_only_listeners_pinning_and_allow_list_reach_the_daemon(config, store, certs):
    """[dicom]/[hl7] tls with plain = false: only the TLS ports listen (the plain ports stay
    closed); [dicom] ae_addresses and [hl7] allowed_addresses reach the listeners."""
    from exporters.mllp_client import send_messages
    from mrrp_pacs.daemon import components_from_config
    from mrrp_pacs.doctor import c_echo
    from mrrp_pacs.tls import client_context

    dicom_plain, hl7_plain, dicom_tls, hl7_tls = (_free_port() for _ in range(4))
    site = (config.replace("tls", cert_file=certs.server_cert, key_file=certs.server_key,
                           ca_file=certs.ca, require_client_cert=True)
            .replace("dicom", port=dicom_plain, tls=True, tls_port=dicom_tls, plain=False,
                     allowed_aes=["MODALITY"], ae_addresses={"MODALITY": ["127.0.0.2"]})
            .replace("hl7", port=hl7_plain, tls=True, tls_port=hl7_tls, plain=False,
                     allowed_addresses=["127.0.0.2/32"])
            .replace("http", port=0)).check()
    components = components_from_config(site)
    scp, mllp = components.listeners[0], components.listeners[1]
    client = client_context(site.tls)  # our server certificate is the client's here too
    scp.start()
    mllp.start()
    try:
        assert scp.port is None and mllp.handle.server.port is None
        assert (scp.tls_port, mllp.handle.tls_port) == (dicom_tls, hl7_tls)
        for port in (dicom_plain, hl7_plain):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert c_echo("127.0.0.1", scp.tls_port, "MRRP", "ORTHANC", timeout_s=10,
                      ssl_context=client) is None
        assert c_echo("127.0.0.1", scp.tls_port, "MRRP", "ORTHANC", timeout_s=3) is not None
        # MODALITY is pinned to 127.0.0.2: from 127.0.0.1 it is rejected
        assert c_echo("127.0.0.1", scp.tls_port, "MRRP", "MODALITY", timeout_s=10,
                      ssl_context=client) is not None
        # the MLLP listener admits 127.0.0.2 only: from 127.0.0.1 the connection is closed
        # before the TLS handshake
        with pytest.raises(OSError):
            send_messages("127.0.0.1", mllp.handle.tls_port, [b"MSH|^~\\&|A|B|C|D|"
                          b"20260101||ORU^R01|X1|P|2.5\r"], timeout_s=5, ssl_context=client)
    finally:
        mllp.stop()
        scp.stop()
