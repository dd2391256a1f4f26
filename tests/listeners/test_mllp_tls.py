"""MLLP over TLS (mutual TLS with a CA) and the listener's address allow-list, over real sockets
on 127.0.0.1 (127.0.0.2 as another source address). Certificates: tests/support/certs.py."""

import logging
import socket
import ssl
import time

import pytest
from builders import Patient, mllp, pathology_result, us_report

from exporters.hl7_result import MllpSender
from exporters.mllp_client import FrameReader, send_messages
from listeners.mllp import MllpServer
from mrrp_pacs.config import TlsConfig
from mrrp_pacs.errors import SendError
from mrrp_pacs.intake import Intake
from mrrp_pacs.store import Store
from mrrp_pacs.tls import client_context, parse_networks, server_context

pytestmark = pytest.mark.needs_tool("openssl")


@pytest.fixture
def serve(config, certs):
    running = []

    def start(**options):
        def make():
            return Intake(Store(config.paths.db_file, config.paths.objects_dir), config)
        context = server_context(TlsConfig(cert_file=certs.server_cert,
                                           key_file=certs.server_key, ca_file=certs.ca,
                                           require_client_cert=True))
        options = {"port": None, "tls_port": 0, "ssl_context": context, "idle_timeout_s": 10.0,
                   **options}
        server = MllpServer(make, **options)
        running.append(server.run_in_thread())
        return server

    yield start
    for handle in running:
        handle.stop()


def _client(certs, with_cert=True, ca=None):
    return client_context(TlsConfig(
        ca_file=ca or certs.ca, cert_file=certs.client_cert if with_cert else None,
        key_file=certs.client_key if with_cert else None))


def _eventually(check, timeout_s=5.0):
    """``check()`` once it holds (the server counts a closed connection just after closing)."""
    deadline = time.monotonic() + timeout_s
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    return check()


def _closed_by_peer(sock):
    """Whether the listener closed ``sock`` (an end of stream, or a reset when it closed with
    our bytes unread), rather than answering."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def _count(store, table="hl7_messages"):
    return store.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_python_ssl_client_sends_an_oru_and_gets_aa(serve, certs, store):
    server = serve()
    assert server.port is None  # TLS only: no plain listener
    raw = socket.create_connection(("127.0.0.1", server.tls_port), timeout=5)
    with _client(certs).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        assert sock.version() in ("TLSv1.2", "TLSv1.3")
        sock.sendall(mllp(pathology_result(Patient(), "PA-TLS")))
        ack = FrameReader(sock, 5.0).next_frame()
    assert ack is not None and b"MSA|AA|PA-TLS" in ack
    assert _count(store) == 1


def test_mllp_client_and_result_sender_over_tls(serve, certs, store):
    server = serve()
    acks = send_messages("127.0.0.1", server.tls_port,
                         [us_report(Patient(), "US-T1"), us_report(Patient("MRN002"), "US-T2")],
                         timeout_s=5, ssl_context=_client(certs))
    assert [a.code for a in acks] == ["AA", "AA"]
    sender = MllpSender("127.0.0.1", server.tls_port, timeout_s=5, ssl_context=_client(certs))
    sender.send(pathology_result(Patient(), "PA-T3"))
    assert sender.peer.startswith("mllps://")
    assert _count(store) == 3
    # a sender that does not trust our CA does not send
    distrusting = MllpSender("127.0.0.1", server.tls_port, timeout_s=5,
                             ssl_context=_client(certs, ca=certs.other_ca))
    with pytest.raises(SendError, match="CERTIFICATE_VERIFY_FAILED") as failed:
        distrusting.send(pathology_result(Patient(), "PA-T4"))
    assert failed.value.transient
    assert _count(store) == 3


def test_clients_without_our_cas_certificate_or_tls_are_refused(serve, certs, store, caplog):
    caplog.set_level(logging.WARNING, logger="listeners.mllp")
    server = serve()
    message = pathology_result(Patient(), "PA-X")
    try:
        acks = send_messages("127.0.0.1", server.tls_port, [message], timeout_s=5,
                             ssl_context=_client(certs, with_cert=False))
        assert not acks[0].accepted  # TLS 1.3: the refusal arrives after the client's handshake
    except ssl.SSLError:
        pass  # TLS 1.2: during it
    stranger = client_context(TlsConfig(ca_file=certs.ca, cert_file=certs.stranger_cert,
                                        key_file=certs.stranger_key))
    try:
        acks = send_messages("127.0.0.1", server.tls_port, [message], timeout_s=5,
                             ssl_context=stranger)
        assert not acks[0].accepted
    except ssl.SSLError:
        pass
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=5) as plain:
        plain.sendall(mllp(message))
        answer = plain.recv(1024)
        assert answer == b"" or answer[:1] == b"\x15"  # closed, or a TLS alert record
    assert _eventually(lambda: server.stats().tls_handshake_failures == 3)
    assert _count(store) == 0
    lines = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(lines) == 3 and any("CERTIFICATE" in line for line in lines), lines


def test_slow_handshake_is_cut_at_the_deadline_and_frames_keep_theirs(serve, certs, caplog):
    caplog.set_level(logging.WARNING, logger="listeners.mllp")
    server = serve(handshake_timeout_s=1.0, frame_timeout_s=1.0)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=5) as silent:
        silent.sendall(b"\x16\x03\x01")  # the first bytes of a ClientHello, then nothing
        assert silent.recv(1024) == b""
    waited = time.monotonic() - started
    assert 0.8 < waited < 3, waited
    assert _eventually(lambda: server.stats().tls_handshake_failures == 1)
    assert "TLS handshake failed (not complete within 1 s)" in caplog.text
    # after the handshake, an unfinished frame is cut by the frame deadline as over TCP
    raw = socket.create_connection(("127.0.0.1", server.tls_port), timeout=5)
    with _client(certs).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(b"\x0bMSH|^~\\&|")
        started = time.monotonic()
        assert sock.recv(1024) == b""
        assert time.monotonic() - started < 3
    assert _eventually(lambda: server.stats().frame_timeouts == 1)


def test_allow_list_closes_other_addresses_at_once(serve, config, store, caplog):
    caplog.set_level(logging.WARNING, logger="listeners.mllp")
    server = MllpServer(lambda: Intake(Store(config.paths.db_file, config.paths.objects_dir),
                                       config), port=0, idle_timeout_s=10.0,
                        allowed_addresses=parse_networks(["127.0.0.1"], "hl7.allowed_addresses"))
    handle = server.run_in_thread()
    try:
        other = socket.socket()
        other.bind(("127.0.0.2", 0))
        other.settimeout(5)
        other.connect(("127.0.0.1", server.port))
        started = time.monotonic()
        with other:
            other.sendall(mllp(pathology_result(Patient(), "PA-A1")))
            assert _closed_by_peer(other)
        assert time.monotonic() - started < 1
        acks = send_messages("127.0.0.1", server.port, [pathology_result(Patient(), "PA-A2")],
                             timeout_s=5)
        assert acks[0].code == "AA"
    finally:
        handle.stop()
    assert _eventually(lambda: server.stats().connections_not_allowed == 1)
    assert _count(store) == 1
    assert "refused: address not in hl7.allowed_addresses" in caplog.text
    assert "127.0.0.2" in caplog.text


def test_hl7_send_command_uses_tls_for_a_tls_only_listener(serve, certs, tmp_path):
    """`hl7 send` to a listener configured TLS only goes to [hl7] tls_port over TLS with the
    [tls] files; --no-tls sends plain (and the TLS listener refuses it)."""
    from click.testing import CliRunner

    from mrrp_pacs.cli import main

    server = serve()
    message = tmp_path / "report.hl7"
    message.write_bytes(us_report(Patient(), "CLI-TLS"))
    config = tmp_path / "mrrp.toml"
    config.write_text(
        f'[hl7]\ntls = true\nplain = false\ntls_port = {server.tls_port}\n'
        f'[tls]\ncert_file = "{certs.client_cert}"\nkey_file = "{certs.client_key}"\n'
        f'ca_file = "{certs.ca}"\n')
    result = CliRunner().invoke(main, ["--config", str(config), "hl7", "send", str(message)])
    assert result.exit_code == 0, result.output
    assert result.stdout == "report.hl7: CLI-TLS AA\n"
    plain = CliRunner().invoke(main, ["--config", str(config), "hl7", "send", str(message),
                                      "--no-tls", "--port", str(server.tls_port),
                                      "--timeout", "3"])
    assert plain.exit_code != 0 and "AA" not in plain.output
