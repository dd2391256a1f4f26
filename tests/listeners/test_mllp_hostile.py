"""The MLLP listener against hostile peers (issue 18), over real sockets on 127.0.0.1, and the
quarantine of refused input it fills (``refused_input``, ``mrrp-pacs quarantine``)."""

import dataclasses
import logging
import time

import mllp_peer
import pytest
from builders import Patient, mllp, pathology_result, us_report
from click.testing import CliRunner

from listeners.mllp import MllpServer, control_digest
from mrrp_pacs.cli import main
from mrrp_pacs.intake import Intake, refused
from mrrp_pacs.store import Store


def _with(config, section, **values):
    return dataclasses.replace(config, **{
        section: dataclasses.replace(getattr(config, section), **values)})


@pytest.fixture
def serve():
    """Start listeners on free ports with a given config; all are stopped after the test."""
    running = []

    def start(config, **options):
        def make():
            return Intake(Store(config.paths.db_file, config.paths.objects_dir), config)
        options = {"port": 0, "idle_timeout_s": 10.0, **options}
        server = MllpServer(make, **options)
        running.append(server.run_in_thread(grace_s=options.get("grace_s", 5.0)))
        return server, running[-1]

    yield start
    for handle in running:
        handle.stop()


class Peer(mllp_peer.Peer):
    def ack(self, timeout=5.0):
        """(MSA-1, MSA-2) of the next acknowledgement."""
        return mllp_peer.msa(super().ack(timeout))


@pytest.fixture(autouse=True)
def _close_peers():
    yield
    mllp_peer.close_open_peers()


def _count(config, table, where="1", params=()):
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        return store.conn.execute(f"SELECT count(*) FROM {table} WHERE {where}",
                                  params).fetchone()[0]


# -- logs ------------------------------------------------------------------------------------

SECRET = Patient(patient_id="SECRET9931", name="Verborgen^Helga", birth_date="19470812")
CONTROL = "CTRLX-5521"


def test_no_control_id_or_patient_data_reaches_any_log_record(serve, config, caplog,
                                                              monkeypatch):
    caplog.set_level(logging.DEBUG)
    config = _with(config, "identity", hl7_assigning_authority="HOSP")
    _, handle = serve(config)
    peer = Peer(handle.port)
    peer.send(mllp(us_report(SECRET, CONTROL)))
    assert peer.ack() == ("AA", CONTROL)
    # refused for its content (no identifier of the configured authority): AE, kept
    peer.send(mllp(us_report(dataclasses.replace(SECRET, issuer="ELSEWHERE"), CONTROL + "b")
                   .replace(b"~99887^^^NATIONAL^NI", b"")))
    assert peer.ack() == ("AE", CONTROL + "b")
    # a failing path whose exception text quotes the patient: AR, the text stays out of logs
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        store.conn.execute("CREATE TRIGGER leak BEFORE INSERT ON hl7_messages BEGIN SELECT "
                           f"RAISE(ABORT, 'bad row for {SECRET.patient_id} {SECRET.name} "
                           f"{SECRET.birth_date} {CONTROL}'); END")
    peer.send(mllp(pathology_result(SECRET, CONTROL + "c")))
    assert peer.ack() == ("AR", CONTROL + "c")
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        store.conn.execute("DROP TRIGGER leak")
    monkeypatch.setenv("MRRP_FAULTS", "intake.hl7.before_commit=raise")
    peer.send(mllp(pathology_result(SECRET, CONTROL + "d")))
    assert peer.ack() == ("AR", CONTROL + "d")
    peer.close()
    handle.stop()
    records = caplog.records
    assert any(control_digest(CONTROL) in r.getMessage() for r in records)
    assert any("unexpected IntegrityError" in r.getMessage() for r in records)
    for record in records:
        text = record.getMessage() + (record.exc_text or "")
        for secret in (CONTROL, SECRET.patient_id, "Verborgen", "Helga", SECRET.birth_date):
            assert secret not in text, (secret, text)
    # the AR (a failure of ours, not of the content) was not kept as refused input
    assert _count(config, "refused_input") == 1


# -- the quarantine of refused input ---------------------------------------------------------

def test_a_misconfigured_authority_keeps_results_for_reprocessing(serve, config, tmp_path):
    wrong = _with(config, "identity", hl7_assigning_authority="NOWHERE")
    server, handle = serve(wrong)
    peer = Peer(handle.port)
    sent = [pathology_result(SECRET, "Q-1"), us_report(SECRET, "Q-2")]
    for number, message in enumerate(sent, start=1):
        peer.send(mllp(message))
        assert peer.ack() == ("AE", f"Q-{number}")
    assert server.stats().refused_kept == 2
    assert _count(config, "hl7_messages") == 0
    db = str(config.paths.db_file)
    runner = CliRunner()
    listed = runner.invoke(main, ["quarantine", "list", "--db", db])
    assert listed.exit_code == 0, listed.output
    assert "hl7/mllp" in listed.output and "127.0.0.1" in listed.output
    assert "assigning authority" in listed.output and "2 refused inputs kept" in listed.output
    assert str(len(sent[0])) in listed.output
    shown = runner.invoke(main, ["quarantine", "show", "1", "--db", db])
    assert shown.exit_code == 0 and "reason:" in shown.output
    for output in (listed.output, shown.output):
        for secret in (SECRET.patient_id, "Verborgen", SECRET.birth_date, "Q-1"):
            assert secret not in output
    raw = runner.invoke(main, ["quarantine", "show", "1", "--raw", "--db", db])
    assert raw.exit_code == 0 and SECRET.patient_id in raw.output and "Q-1" in raw.output
    # the authority fixed (the default config takes the MR repetition): both are stored
    done = runner.invoke(main, ["quarantine", "reprocess", "--all", "--db", db])
    assert done.exit_code == 0, done.output
    assert "2 reprocessed: 2 new" in done.output
    assert _count(config, "hl7_messages", "control_id IN ('Q-1', 'Q-2')") == 2
    assert _count(config, "clinical_values", "patient_id = ?", (SECRET.patient_id,)) > 0
    again = runner.invoke(main, ["quarantine", "reprocess", "1", "--db", db])
    assert again.exit_code == 1 and "already reprocessed (new: stored as row" in again.output
    assert "0 reprocessed" in runner.invoke(main, ["quarantine", "reprocess", "--all",
                                                   "--db", db]).output
    assert "reprocessed: new" in runner.invoke(main, ["quarantine", "list", "--db", db]).output
    missing = runner.invoke(main, ["quarantine", "show", "99", "--db", db])
    assert missing.exit_code == 1 and "no refused input 99" in missing.output
    assert runner.invoke(main, ["quarantine", "reprocess", "--db", db]).exit_code == 2


def test_a_frame_larger_than_the_limit_keeps_its_first_bytes_and_size(serve, config):
    small = _with(config, "ingest", max_hl7_bytes=100_000)
    _, handle = serve(small, max_message_bytes=100_000)
    big = us_report(SECRET, "BIG-1", text=tuple(f"line {i} " + "x" * 60 for i in range(3000)))
    assert len(big) > 150_000
    peer = Peer(handle.port)
    peer.send(mllp(big))
    assert peer.ack() == ("AE", "BIG-1")
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        (item,) = refused.listing(store)
        assert (item.size_bytes, item.kept_bytes) == (len(big), refused.HEAD_BYTES)
        assert refused.raw_bytes(store, item) == big[:refused.HEAD_BYTES]
        with pytest.raises(refused.RefusedError, match="only its first 65536"):
            refused.reprocess(Intake(store, config), item.id)


def test_kept_bytes_stay_under_the_cap_dropping_the_oldest(store):
    ids = [refused.keep(store, kind="hl7", listener="mllp", peer="10.0.0.9",
                        reason=f"reason {i}", data=bytes([65 + i]) * 400, size_bytes=400,
                        max_bytes=1000, keep_bytes=1000) for i in range(5)]
    kept = refused.listing(store)
    assert [i.id for i in kept] == ids[-2:][::-1]  # 800 bytes fit, a third would not
    objects = refused.refused_objects(store)
    # the dropped rows' bytes are deleted, the kept ones are not
    assert all(objects.contains(i.sha256) for i in kept)
    assert len(list(objects.root.glob("??/??/*"))) == 2
    assert refused.keep(store, kind="hl7", listener="mllp", peer=None, reason="r",
                        data=b"x" * 2000, size_bytes=2000, max_bytes=4000,
                        keep_bytes=1000) is None


def test_the_totals_follow_the_rows_and_the_row_cap_drops_the_oldest(store, monkeypatch):
    """The kept rows and bytes are read from refused_totals (triggers), not summed over every
    row at each refusal (168 ms a refusal at 100,000 rows, found by make soak)."""
    def totals():
        return tuple(store.conn.execute(
            "SELECT row_count, kept_bytes FROM refused_totals").fetchone())

    def summed():
        return tuple(store.conn.execute(
            "SELECT count(*), COALESCE(SUM(kept_bytes), 0) FROM refused_input").fetchone())

    monkeypatch.setattr(refused, "MAX_ROWS", 3)
    ids = [refused.keep(store, kind="hl7", listener="mllp", peer=None, reason="r",
                        data=b"%d" % i * (i + 1), size_bytes=i + 1, max_bytes=1000,
                        keep_bytes=10_000) for i in range(5)]
    assert [i.id for i in refused.listing(store)] == ids[-3:][::-1]  # 3 rows, the newest
    assert totals() == summed() == (3, 3 + 4 + 5)
    with store.transaction() as conn:
        conn.execute("UPDATE refused_input SET kept_bytes = 1 WHERE id = ?", (ids[-1],))
        conn.execute("DELETE FROM refused_input WHERE id = ?", (ids[-3],))
    assert totals() == summed() == (2, 4 + 1)


# -- deadlines, caps, stop -------------------------------------------------------------------

def test_a_slow_frame_is_cut_at_its_deadline_but_idle_between_frames_is_not(serve, config):
    server, handle = serve(config, frame_timeout_s=0.6, idle_timeout_s=10.0)
    patient = Patient()
    honest = Peer(handle.port)
    honest.send(mllp(us_report(patient, "OK-1")))
    assert honest.ack() == ("AA", "OK-1")
    time.sleep(1.0)  # idle between frames for longer than a frame may take: still served
    honest.send(mllp(us_report(patient, "OK-2")))
    assert honest.ack() == ("AA", "OK-2")
    slow = Peer(handle.port)
    started = time.monotonic()
    data = mllp(us_report(patient, "SLOW-1"))
    for byte in data[:40]:  # a byte every 50 ms: each read is quick, the frame never ends
        try:
            slow.send(bytes([byte]))
        except OSError:
            break
        time.sleep(0.05)
    assert slow.closed_by_server(timeout=3)
    assert time.monotonic() - started < 3.0
    assert server.stats().frame_timeouts == 1
    honest.send(mllp(us_report(patient, "OK-3")))
    assert honest.ack() == ("AA", "OK-3")


def test_one_address_cannot_take_every_connection(serve, config):
    server, handle = serve(config, max_connections_per_address=3, max_connections=32)
    flood = [Peer(handle.port, "127.0.0.2") for _ in range(3)]
    for peer in flood:  # each held open, answered
        peer.send(mllp(us_report(Patient(), f"F-{id(peer)}")))
        assert peer.ack()[0] == "AA"
    extra = [Peer(handle.port, "127.0.0.2") for _ in range(5)]
    assert all(peer.closed_by_server(timeout=3) for peer in extra)
    other = Peer(handle.port, "127.0.0.1")
    other.send(mllp(pathology_result(Patient(), "OTHER-1")))
    assert other.ack() == ("AA", "OTHER-1")
    stats = server.stats()
    assert stats.connections_refused_address == 5 and stats.connections_open == 4
    flood[0].close()
    deadline = time.monotonic() + 3
    while server.stats().connections_open > 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    again = Peer(handle.port, "127.0.0.2")  # a slot freed: the address gets in again
    again.send(mllp(us_report(Patient(), "AGAIN-1")))
    assert again.ack() == ("AA", "AGAIN-1")


def test_stop_keeps_its_grace_with_every_worker_busy_and_frames_queued(config, monkeypatch):
    # each message holds its worker 1.5 s after its commit: two workers, eight frames
    monkeypatch.setenv("MRRP_FAULTS", "intake.hl7.committed=sleep:1.5")

    def make():
        return Intake(Store(config.paths.db_file, config.paths.objects_dir), config)

    handle = MllpServer(make, port=0, workers=2, idle_timeout_s=10.0).run_in_thread(grace_s=0.3)
    peers = [Peer(handle.port) for _ in range(8)]
    for number, peer in enumerate(peers):
        peer.send(mllp(us_report(Patient(), f"BUSY-{number}")))
    deadline = time.monotonic() + 5
    while handle.server.stats().in_flight < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert handle.server.stats().in_flight == 8  # two at work, six queued
    started = time.monotonic()
    handle.stop(timeout_s=30)
    took = time.monotonic() - started
    # the grace, then the two frames at work finish; the six queued are dropped unanswered
    # (working through all eight would take 4 × 1.5 s at least)
    assert took < 0.3 + 1.5 + 1.0, took
    assert not handle.thread.is_alive()
    assert _count(config, "hl7_messages") <= 2
