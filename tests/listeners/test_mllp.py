"""The MLLP listener and client over real sockets on 127.0.0.1, with a real SQLite store."""

import logging
import random
import socket
import sqlite3
import threading
import time

import pytest
from builders import (
    PATHOLOGY_VALUES,
    Patient,
    mllp,
    pathology_result,
    us_report,
    with_ack_modes,
)
from hl7apy.parser import parse_message as hl7apy_parse
from mllp_peer import Peer, close_open_peers
from mllp_peer import msa as _msa

from exporters.mllp_client import send_files, send_messages
from listeners.mllp import (
    MllpServer,
    control_digest,
    read_header,
)
from mrrp_pacs import audit
from mrrp_pacs.hl7.message import parse_message
from mrrp_pacs.intake import Intake
from mrrp_pacs.store import Store

# -- helpers ---------------------------------------------------------------------------------


def _factory(config, busy_timeout_ms=None):
    def make():
        store = Store(config.paths.db_file, config.paths.objects_dir)
        if busy_timeout_ms is not None:
            store.conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        return Intake(store, config)
    return make


@pytest.fixture
def serve(config):
    """Start listeners on free ports (in their own threads); all are stopped after the test."""
    running = []

    def start(busy_timeout_ms=None, **options):
        options = {"port": 0, "idle_timeout_s": 10.0, **options}
        server = MllpServer(_factory(config, busy_timeout_ms), **options)
        running.append(server.run_in_thread())
        return server, running[-1]

    yield start
    for handle in running:
        handle.stop()


@pytest.fixture(autouse=True)
def _close_peers():
    yield
    close_open_peers()


def _rows(store, table, where="1", params=()):
    return store.conn.execute(f"SELECT count(*) FROM {table} WHERE {where}", params).fetchone()[0]


# -- the listener ----------------------------------------------------------------------------

def test_messages_on_one_connection_are_stored_before_their_ack(serve, store):
    _, handle = serve()
    patient = Patient()
    messages = [us_report(patient, "US-1"), pathology_result(patient, "PA-1"),
                us_report(Patient("MRN002"), "US-2")]
    peer = Peer(handle.port)
    for message in messages:
        control_id = read_header(message).control_id
        peer.send(mllp(message))
        ack = peer.ack()
        # the row is committed at the moment the acknowledgement arrives
        assert _rows(store, "hl7_messages", "control_id = ?", (control_id,)) == 1
        assert _msa(ack) == ("AA", control_id)
        assert ack.get("MSH-9") == "ACK" and ack.component(ack.segments[0], 9, 2) == "R01"
        assert ack.segment("ERR") is None
        # sender and receiver swapped, version and processing id echoed
        assert [ack.get(f"MSH-{n}") for n in (3, 4, 5, 6, 11, 12, 18)] == [
            "MRRP", "HOSP", "LIS" if control_id == "PA-1" else "RIS", "HOSP", "P", "2.5",
            "UNICODE UTF-8"]
        assert ack.get("MSH-10") not in ("", control_id)
    peer.close()
    values = {r[0]: r[1] for r in store.conn.execute(
        "SELECT variable, value_num FROM clinical_values WHERE patient_id = 'MRN001'")}
    assert values["tumour_size_mm"] == 18.0 and values["ki67_percent"] == 15.0
    assert _rows(store, "reports") == 2
    sources = {r[0] for r in store.conn.execute("SELECT source FROM hl7_messages")}
    assert sources == {"mllp:127.0.0.1"}


def test_ack_is_valid_hl7_for_hl7apy_and_in_the_message_charset(serve, store):
    _, handle = serve()
    message = us_report(Patient(), "L1").replace(b"UNICODE UTF-8", b"8859/1").replace(
        b"|RIS|HOSP|", "|RIS|KLINIK MÜNCHEN|".encode("latin-1"))
    peer = Peer(handle.port)
    peer.send(mllp(message))
    raw = peer.frame()
    assert raw.startswith("MSH|^~\\&|MRRP|HOSP|RIS|KLINIK MÜNCHEN|".encode("latin-1"))
    parsed = hl7apy_parse(raw.decode("latin-1"), find_groups=False)
    assert parsed.validate()
    assert (parsed.msa.msa_1.value, parsed.msa.msa_2.value) == ("AA", "L1")
    assert parsed.msh.msh_18.value == "8859/1"
    (facility,) = store.conn.execute("SELECT sending_facility FROM hl7_messages").fetchone()
    assert facility == "KLINIK MÜNCHEN"


def test_garbage_and_junk_between_frames(serve, store):
    server, handle = serve()
    peer = Peer(handle.port)
    peer.send(mllp(b"this is not an HL7 message"))
    ack = peer.ack()
    assert _msa(ack) == ("AE", "")
    assert "MSH" in ack.get("ERR-8") and ack.get("ERR-3") == "102"
    assert ack.get("MSH-3") == "MRRP" and ack.get("MSH-9") == "ACK"
    peer.send(mllp(b"MSH|^~\\&|A|B|C|D|2026||ORU^R01||P|2.5\r"))  # no MSH-10
    ack = peer.ack()
    assert _msa(ack) == ("AE", "") and "MSH-10" in ack.get("MSA-3")
    peer.send(b"line noise\r\n" + mllp(us_report(Patient(), "AFTER-NOISE")))
    assert _msa(peer.ack()) == ("AA", "AFTER-NOISE")
    peer.close()
    assert _rows(store, "hl7_messages") == 1
    assert server.stats().junk_bytes == len(b"line noise\r\n")


def test_logs_carry_control_id_digests_but_no_patient_data(serve, caplog):
    caplog.set_level(logging.DEBUG)
    _, handle = serve()
    patient = Patient(patient_id="SECRET77", name="Hidden^Person", birth_date="19610203")
    broken = us_report(patient, "LOG-3").replace(b"|2.5||||||UNICODE UTF-8", b"|2.5||||||X")
    acks = send_messages("127.0.0.1", handle.port, [
        us_report(patient, "LOG-1"), pathology_result(patient, "LOG-2"), broken], timeout_s=5)
    assert [a.code for a in acks] == ["AA", "AA", "AE"]
    # a digest of the control id, never the id itself (it can quote an order number)
    assert control_digest("LOG-1") in caplog.text and control_digest("LOG-3") in caplog.text
    for secret in ("SECRET77", "Hidden", "19610203", "hypoechoic", "Ki-67", "luminal", "LOG-"):
        assert secret not in caplog.text


def test_too_large_message_is_refused_and_serving_goes_on(serve, store):
    server, handle = serve(max_message_bytes=1500)
    lines = tuple(f"Finding line {i}: nothing of note in this quadrant." for i in range(100))
    big = us_report(Patient(), "BIG-1", text=lines)
    assert len(big) > 5000
    other = Peer(handle.port)
    peer = Peer(handle.port)
    peer.send(mllp(big) + mllp(us_report(Patient(), "SMALL-1")))
    ack = peer.ack()
    assert _msa(ack) == ("AE", "BIG-1")
    assert f"{len(big)} bytes" in ack.get("ERR-8") and "1500" in ack.get("ERR-8")
    assert _msa(peer.ack()) == ("AA", "SMALL-1")  # the same connection goes on
    other.send(mllp(pathology_result(Patient(), "OTHER-1")))
    assert _msa(other.ack()) == ("AA", "OTHER-1")
    assert _rows(store, "hl7_messages", "control_id = 'BIG-1'") == 0
    assert server.stats().acknowledgements == {"AE": 1, "AA": 2}
    # the audit names the peer and the control id digests: the refused frame (its control id
    # unknown: the frame was not read whole) and each message stored, one row each
    rows = sorted((r.event, r.who, r.what) for r in audit.listing(store))
    assert rows == sorted([("refused", "mllp:127.0.0.1", "-"),
                           ("received", "mllp:127.0.0.1", control_digest("SMALL-1")),
                           ("received", "mllp:127.0.0.1", control_digest("OTHER-1"))])


def test_hostile_frames_each_get_an_answer(serve):
    rng = random.Random(7)
    valid = pathology_result(Patient(), "FUZZ")
    hostile = [b"", b"MSH", b"MSH|", b"MSH|^~\\&|" + b"|" * 5000, b"\xff\xfe" * 100,
               b"MSH|^~\\&|A|B|C|D|2026||ORU^R01|X|P|2.5||||||KLINGON\r"]
    for _ in range(120):
        data = bytearray(valid[: rng.randrange(len(valid))] if rng.random() < 0.3 else valid)
        for _ in range(rng.randint(1, 3)):
            if data:
                data[rng.randrange(len(data))] = rng.choice(
                    [b for b in range(256) if b not in (0x0B, 0x1C)])
        hostile.append(bytes(data))
    hostile += [bytes(rng.choice(range(0x20, 0x7F)) for _ in range(rng.randrange(400)))
                for _ in range(40)]
    _, handle = serve()
    peer = Peer(handle.port)
    codes = []
    for data in hostile:
        peer.send(mllp(data))
        raw = peer.frame()
        assert raw is not None and parse_message(raw).get("MSH-9") == "ACK"
        header = read_header(data)
        sep = raw[3:4]
        msa = next(line for line in raw.split(b"\r") if line.startswith(b"MSA")).split(sep)
        codes.append(msa[1].decode())
        if header is None:
            assert msa[2] == b""
        elif raw[3:8] == (header.field_separator + header.encoding_characters[:4]).encode(
                header.codec, "replace"):
            # MSA-2 gives back the bytes of MSH-10 as sent, whatever their encoding
            assert msa[2] == header.control_id.encode(header.codec, "replace")
        else:  # delimiters unfit for an answer: the standard ones, values escaped
            assert raw[3:8] == b"|^~\\&" and bool(msa[2]) == bool(header.control_id)
    # a mutated MSH-15 asks for a commit acknowledgement (CA/CE) now and then
    assert set(codes) <= {"AA", "AE", "CA", "CE"} and codes.count("AE") > len(hostile) // 2


def test_duplicate_control_id_is_acknowledged_and_processed_once(serve, store):
    _, handle = serve()
    patient = Patient()
    first = pathology_result(patient, "SAME-1")
    changed = pathology_result(patient, "SAME-1", observed="20260111")
    peer = Peer(handle.port)
    for message in (first, changed, first):
        peer.send(mllp(message))
        assert _msa(peer.ack()) == ("AA", "SAME-1")
    peer.close()
    states = [r[0] for r in store.conn.execute("SELECT state FROM hl7_messages ORDER BY id")]
    assert states == ["parsed", "duplicate_control_id"]
    assert _rows(store, "clinical_values") == len(PATHOLOGY_VALUES) + 1  # + age from PID-7
    assert _rows(store, "observations") == len(PATHOLOGY_VALUES)


def test_locked_database_answers_ar_and_the_resend_is_stored(serve, store, config):
    # one worker: its store is opened at start, before the lock (a second would open later)
    _, handle = serve(busy_timeout_ms=200, workers=1)
    blocker = sqlite3.connect(config.paths.db_file, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    message = pathology_result(Patient(), "LOCK-1")
    peer = Peer(handle.port)
    try:
        peer.send(mllp(message))
        ack = peer.ack()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert _msa(ack) == ("AR", "LOCK-1")
    assert ack.get("ERR-3") == "206" and "send again" in ack.get("ERR-8")
    assert _rows(store, "hl7_messages") == 0
    peer.send(mllp(message))
    assert _msa(peer.ack()) == ("AA", "LOCK-1")
    assert _rows(store, "hl7_messages", "state = 'parsed'") == 1


def test_a_failed_commit_answers_ar_and_the_next_message_is_stored(serve, store, config):
    """A COMMIT that fails (here a deferred foreign key planted by a trigger: SQLite checks it
    at COMMIT and keeps the transaction open) is rolled back in the worker: once the fault is
    gone the same worker stores the next message instead of answering AR until restart."""
    _, handle = serve(workers=1)
    store.conn.executescript(
        "CREATE TABLE fault_targets (id INTEGER PRIMARY KEY);"
        "CREATE TABLE fault_rows (target INTEGER REFERENCES fault_targets(id) "
        "DEFERRABLE INITIALLY DEFERRED);"
        "CREATE TRIGGER commit_fault AFTER INSERT ON hl7_messages BEGIN "
        "INSERT INTO fault_rows (target) VALUES (404); END;")
    peer = Peer(handle.port)
    peer.send(mllp(pathology_result(Patient(), "COMMIT-1")))
    ack = peer.ack()
    assert _msa(ack) == ("AR", "COMMIT-1") and "send again" in ack.get("ERR-8")
    assert _rows(store, "hl7_messages") == 0
    store.conn.execute("DROP TRIGGER commit_fault")  # the fault clears
    peer.send(mllp(pathology_result(Patient(), "COMMIT-1")))
    assert _msa(peer.ack()) == ("AA", "COMMIT-1")
    peer.send(mllp(us_report(Patient("MRN002"), "COMMIT-2")))
    assert _msa(peer.ack()) == ("AA", "COMMIT-2")
    assert _rows(store, "hl7_messages", "state = 'parsed'") == 2


def _full_database_then_room(writer, store, port):
    """With ``writer``'s database capped at its present size, a report needing new (overflow)
    pages (~40 kB) is answered AR and not kept; once the cap is lifted its resend is AA."""
    pages = writer.conn.execute("PRAGMA page_count").fetchone()[0]
    writer.conn.execute(f"PRAGMA max_page_count = {pages}")
    peer = Peer(port)
    message = us_report(Patient(), "FULL-1", text=("Findings. " * 400,) * 10)
    peer.send(mllp(message))
    ack = peer.ack()
    assert _msa(ack) == ("AR", "FULL-1") and ack.get("ERR-8") == (
        "database unavailable, send again")
    assert _rows(store, "hl7_messages") == 0
    writer.conn.execute("PRAGMA max_page_count = 1073741823")
    peer.send(mllp(message))
    assert _msa(peer.ack()) == ("AA", "FULL-1")


def test_a_full_database_answers_ar_and_recovers_when_there_is_room(config, store, caplog):
    """SQLite's own disk-full error (a tiny max_page_count on the worker's connection) is
    answered AR, the log names the full disk (not a failed ROLLBACK), and the next message is
    stored once there is room."""
    caplog.set_level(logging.INFO, logger="listeners.mllp")
    opened = []

    def make():
        opened.append(Store(config.paths.db_file, config.paths.objects_dir, migrate=False))
        return Intake(opened[-1], config)

    handle = MllpServer(make, port=0, idle_timeout_s=10.0, workers=1).run_in_thread()
    try:
        (worker,) = opened
        _full_database_then_room(worker, store, handle.port)
        assert "AR sent, database unavailable (SQLITE_FULL)" in caplog.text
    finally:
        handle.stop()
    assert _rows(store, "hl7_messages", "state = 'parsed'") == 1


def test_unwritable_object_store_answers_ar(serve, store, config):
    _, handle = serve()
    staging = config.paths.objects_dir / "tmp"
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.write_bytes(b"")  # a file where the staging folder must be: mkdir fails (OSError)
    peer = Peer(handle.port)
    peer.send(mllp(us_report(Patient(), "DISK-1")))
    ack = peer.ack()
    assert _msa(ack) == ("AR", "DISK-1") and ack.get("ERR-3") == "207"
    assert _rows(store, "hl7_messages") == 0
    staging.unlink()
    peer.send(mllp(us_report(Patient(), "DISK-1")))
    assert _msa(peer.ack()) == ("AA", "DISK-1")


def test_enhanced_acknowledgement_modes_on_the_wire(serve):
    _, handle = serve()
    patient = Patient()
    peer = Peer(handle.port)
    quiet = 0.4
    peer.send(mllp(with_ack_modes(us_report(patient, "NE-1"), "NE", "NE")))
    assert peer.frame(quiet) is None
    peer.send(mllp(us_report(patient, "ORIG-1")))
    assert _msa(peer.ack()) == ("AA", "ORIG-1")  # nothing stray was queued before it
    peer.send(mllp(with_ack_modes(us_report(patient, "CA-1"), "AL", "NE")))
    assert _msa(peer.ack()) == ("CA", "CA-1")
    peer.send(mllp(with_ack_modes(us_report(patient, "AP-1"), "NE", "AL")))
    assert _msa(peer.ack()) == ("AA", "AP-1")
    peer.send(mllp(with_ack_modes(us_report(patient, "ER-1"), "ER", "ER")))
    assert peer.frame(quiet) is None
    peer.send(mllp(with_ack_modes(us_report(patient, ""), "ER", "ER")))  # empty MSH-10: an error
    assert _msa(peer.ack()) == ("AE", "")
    peer.send(mllp(with_ack_modes(us_report(patient, ""), "SU", "SU")))
    assert peer.frame(quiet) is None
    peer.send(mllp(with_ack_modes(us_report(patient, "SU-1"), "SU", "SU")))
    assert _msa(peer.ack()) == ("AA", "SU-1")


def test_the_log_names_the_acknowledgement_sent_or_that_none_was(serve, caplog):
    caplog.set_level(logging.INFO, logger="listeners.mllp")
    _, handle = serve()
    patient = Patient()
    peer = Peer(handle.port)
    peer.send(mllp(with_ack_modes(us_report(patient, "QUIET-1"), "NE", "NE")))
    assert peer.frame(0.4) is None
    peer.send(mllp(with_ack_modes(us_report(patient, "COMMIT-1"), "AL", "NE")))
    assert _msa(peer.ack()) == ("CA", "COMMIT-1")
    peer.send(mllp(us_report(patient, "PLAIN-1")))
    assert _msa(peer.ack()) == ("AA", "PLAIN-1")
    lines = {line.split()[1]: line for line in caplog.messages if line.startswith("HL7 c:")}
    quiet, commit, plain = (lines[control_digest(c)] for c in ("QUIET-1", "COMMIT-1", "PLAIN-1"))
    assert quiet.endswith("no acknowledgement sent (MSH-15/16 ask for none)")
    assert "AA" not in quiet and "stored as row" in quiet
    assert ": CA sent, stored as row" in commit
    assert ": AA sent, stored as row" in plain


def test_split_frames_and_two_frames_in_one_write(serve, store):
    _, handle = serve()
    peer = Peer(handle.port)
    for byte in mllp(us_report(Patient(), "DRIP-1")):
        peer.send(bytes([byte]))
    assert _msa(peer.ack()) == ("AA", "DRIP-1")
    peer.send(mllp(us_report(Patient(), "PAIR-1")) + mllp(pathology_result(Patient(), "PAIR-2")))
    assert [_msa(peer.ack()) for _ in range(2)] == [("AA", "PAIR-1"), ("AA", "PAIR-2")]
    assert _rows(store, "hl7_messages") == 3


def test_connection_limit_and_idle_timeout(serve):
    server, handle = serve(max_connections=1, idle_timeout_s=0.5)
    first = Peer(handle.port)
    first.send(mllp(us_report(Patient(), "LIM-1")))
    assert _msa(first.ack()) == ("AA", "LIM-1")
    second = Peer(handle.port)
    assert second.closed_by_server(timeout=2)
    started = time.monotonic()
    assert first.closed_by_server(timeout=5)
    assert 0.3 < time.monotonic() - started < 3
    third = Peer(handle.port)
    third.send(mllp(us_report(Patient(), "LIM-2")))
    assert _msa(third.ack()) == ("AA", "LIM-2")
    stats = server.stats()
    assert (stats.connections_total, stats.connections_refused) == (2, 1)


def test_client_sends_messages_and_files(serve, tmp_path):
    _, handle = serve()
    patient = Patient()
    acks = send_messages("127.0.0.1", handle.port, [
        us_report(patient, "C-1"), b"not HL7 at all\r", pathology_result(patient, "C-2"),
        with_ack_modes(us_report(patient, "C-3"), "NE", "NE"), us_report(patient, "C-4")],
        timeout_s=5)
    assert [(a.control_id, a.code, a.acked_control_id) for a in acks] == [
        ("C-1", "AA", "C-1"), ("", "AE", ""), ("C-2", "AA", "C-2"), ("C-3", "", ""),
        ("C-4", "AA", "C-4")]
    assert [a.accepted for a in acks] == [True, False, True, False, True]
    assert "MSH" in acks[1].error and "NE" in acks[3].error

    batch = tmp_path / "batch.hl7"
    batch.write_bytes(b"FHS|^~\\&|LIS|HOSP\rBHS|^~\\&|LIS|HOSP\r" + pathology_result(
        patient, "F-1") + pathology_result(Patient("MRN009"), "F-2") + b"BTS|2\rFTS|1\r")
    framed = tmp_path / "framed.mllp"
    framed.write_bytes(mllp(us_report(patient, "F-3")))
    missing = tmp_path / "missing.hl7"
    results = send_files([batch, missing, framed], "127.0.0.1", handle.port, timeout_s=5)
    assert [(p.name, a.control_id, a.code) for p, a in results] == [
        ("batch.hl7", "F-1", "AA"), ("batch.hl7", "F-2", "AA"), ("missing.hl7", "", ""),
        ("framed.mllp", "F-3", "AA")]
    assert "No such file" in results[2][1].error


def test_hl7_send_command_sends_to_the_configured_listener(serve, tmp_path):
    """`mrrp-pacs --config FILE hl7 send` without --port uses [hl7] port (and bind)."""
    from click.testing import CliRunner

    from mrrp_pacs.cli import main

    _, handle = serve()
    message = tmp_path / "report.hl7"
    message.write_bytes(us_report(Patient(), "CFG-1"))
    config = tmp_path / "mrrp.toml"
    config.write_text(f'[hl7]\nport = {handle.port}\nbind = "0.0.0.0"\n')
    result = CliRunner().invoke(main, ["--config", str(config), "hl7", "send", str(message)])
    assert result.exit_code == 0, result.output
    assert result.stdout == "report.hl7: CFG-1 AA\n"
    config.write_text('[hl7]\nport = 1\n')  # the flags still win over the file
    result = CliRunner().invoke(main, ["--config", str(config), "hl7", "send", str(message),
                                       "--host", "127.0.0.1", "--port", str(handle.port)])
    assert result.exit_code == 0 and "CFG-1 AA" in result.output


def test_client_waits_as_the_mode_says_and_stops_after_a_missing_ack(serve):
    _, handle = serve()
    patient = Patient()
    acks = send_messages("127.0.0.1", handle.port, [
        us_report(patient, "FRAMED\x1c"), with_ack_modes(us_report(patient, "ER-1"), "ER", "ER"),
        us_report(patient, "S-2")], timeout_s=0.5)
    assert acks[0].code == "" and "framing" in acks[0].error
    assert acks[1].code == "" and "only on error" in acks[1].error
    assert (acks[2].code, acks[2].acked_control_id) == ("AA", "S-2")

    with socket.socket() as mute:  # accepts and reads, never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        acks = send_messages("127.0.0.1", mute.getsockname()[1],
                             [us_report(patient, "M-1"), us_report(patient, "M-2")], timeout_s=0.5)
    assert [a.code for a in acks] == ["", ""]
    assert "no acknowledgement within 0.5 s" in acks[0].error
    assert acks[1].error.startswith("not sent:")
    with pytest.raises(ConnectionRefusedError):
        send_messages("127.0.0.1", _closed_port(), [us_report(patient)], timeout_s=1)


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_stop_answers_the_message_in_flight_and_closes_idle_connections(serve, store, config):
    server, handle = serve(busy_timeout_ms=5000, workers=1)
    idle = Peer(handle.port)
    busy = Peer(handle.port)
    blocker = sqlite3.connect(config.paths.db_file, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        busy.send(mllp(us_report(Patient(), "FLIGHT-1")))
        deadline = time.monotonic() + 5
        while server.stats().in_flight == 0:
            assert time.monotonic() < deadline, "the message never reached the intake"
            time.sleep(0.01)
        stopper = threading.Thread(target=handle.stop)
        stopper.start()
        assert idle.closed_by_server(timeout=3)
        with pytest.raises(ConnectionRefusedError):  # no longer accepting
            Peer(handle.port)
        stopper.join(timeout=0.5)  # stop() must not return while a message is in flight
        assert stopper.is_alive() and server.stats().in_flight == 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert _msa(busy.ack()) == ("AA", "FLIGHT-1")
    assert busy.closed_by_server(timeout=5)
    stopper.join(10)
    assert not stopper.is_alive()
    assert _rows(store, "hl7_messages", "control_id = 'FLIGHT-1'") == 1
    assert not handle.thread.is_alive()


def test_run_in_thread_reports_a_port_in_use(config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = MllpServer(_factory(config), port=taken.getsockname()[1])
        with pytest.raises(OSError):
            server.run_in_thread()


def test_through_a_group_committer_a_full_database_answers_ar_and_recovers(config, store):
    """The daemon's listeners write through one GroupCommitter: SQLite's disk-full error on
    its connection (which rolls the whole transaction back) is answered AR, nothing is kept,
    and the resend is stored once there is room; ten connections at once are all stored."""
    from mrrp_pacs.store.groupcommit import GroupCommitter

    writers = []

    def open_writer():
        writers.append(Store(config.paths.db_file, config.paths.objects_dir, migrate=False))
        return writers[-1]

    committer = GroupCommitter(open_writer)
    committer.start()
    (writer,) = writers

    def make():
        return Intake(Store(config.paths.db_file, config.paths.objects_dir, migrate=False),
                      config, committer=committer)

    handle = MllpServer(make, port=0, idle_timeout_s=10.0, workers=4,
                        max_connections_per_address=16).run_in_thread()
    try:
        _full_database_then_room(writer, store, handle.port)
        peers = [Peer(handle.port) for _ in range(10)]
        for i, each in enumerate(peers):
            each.send(mllp(pathology_result(Patient(f"MRN1{i:02d}"), f"MANY-{i}")))
        assert [_msa(each.ack()) for each in peers] == [("AA", f"MANY-{i}") for i in range(10)]
    finally:
        handle.stop()
        committer.stop()
    assert _rows(store, "hl7_messages", "state = 'parsed'") == 11
    assert committer.writes == 12
