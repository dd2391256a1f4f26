"""The storage SCP over TLS (mutual TLS with a CA), and calling AE titles pinned to addresses.

Real sockets on 127.0.0.1 (127.0.0.2 as the "other" source address: all of 127/8 is loopback
on Linux); dcmtk's storescu/echoscu with ``+tls`` and pynetdicom clients with ``tls_args``.
Certificates are made by openssl (tests/support/certs.py).
"""

import logging
import socket
import ssl
import subprocess
import time

import pytest
from builders import Patient, us_image, write
from orthanc import LOOPBACK
from pynetdicom import AE
from pynetdicom.sop_class import UltrasoundImageStorage, Verification
from tools import tool

from listeners.dicom_scp import StorageScp, intake_opener
from mrrp_pacs.config import TlsConfig
from mrrp_pacs.tls import client_context, parse_networks, server_context

pytestmark = pytest.mark.needs_tool("openssl")


def _server_tls(certs, require_client_cert=True):
    return server_context(TlsConfig(cert_file=certs.server_cert, key_file=certs.server_key,
                                    ca_file=certs.ca, require_client_cert=require_client_cert))


def _client_tls(certs, cert=None, key=None):
    cert = certs.client_cert if cert is None else cert
    key = certs.client_key if key is None else key
    return client_context(TlsConfig(cert_file=cert, key_file=key, ca_file=certs.ca))


@pytest.fixture
def tls_scp(config, store, certs):
    scp = StorageScp(intake_opener(config), "MRRP", 0, allowed_aes={"MRRPTEST", "PINNED"},
                     tls_port=0, ssl_context=_server_tls(certs),
                     association_request_timeout_s=2.0,
                     ae_addresses={"PINNED": parse_networks(["127.0.0.1/32"], "test")})
    scp.start()
    yield scp
    scp.stop()


def _dcmtk(name, port, *options, calling="MRRPTEST", files=()):
    command = [tool(name), *options, "-aet", calling, "-aec", "MRRP", LOOPBACK, str(port),
               *map(str, files)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def _count(store):
    return store.conn.execute("SELECT count(*) FROM instances").fetchone()[0]


def _echo(port, context=None, calling="MRRPTEST", bind=None):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = ae.connection_timeout = 10
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, port, ae_title="MRRP", bind_address=bind,
                         tls_args=(context, LOOPBACK) if context is not None else None)
    try:
        if not assoc.is_established:
            return assoc
        assert assoc.send_c_echo().Status == 0x0000
        return assoc
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.needs_tool("storescu")
@pytest.mark.needs_tool("echoscu")
def test_storescu_over_mutual_tls_is_stored(tls_scp, store, certs, tmp_path):
    path = write(us_image(Patient()), tmp_path / "one" / "us.dcm")
    tls = ["+tls", str(certs.client_key), str(certs.client_cert), "+cf", str(certs.ca)]
    sent = _dcmtk("storescu", tls_scp.tls_port, *tls, files=[path])
    assert sent.returncode == 0, sent.stderr
    assert _count(store) == 1
    echo = _dcmtk("echoscu", tls_scp.tls_port, *tls)
    assert echo.returncode == 0, echo.stderr


@pytest.mark.needs_tool("storescu")
def test_clients_without_a_certificate_of_our_ca_or_without_tls_are_refused(
        tls_scp, store, certs, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="listeners.dicom_scp")
    path = write(us_image(Patient()), tmp_path / "one" / "us.dcm")
    anonymous = _dcmtk("storescu", tls_scp.tls_port, "+tla", "+cf", str(certs.ca),
                       files=[path])
    assert anonymous.returncode != 0
    stranger = _dcmtk("storescu", tls_scp.tls_port, "+tls", str(certs.stranger_key),
                      str(certs.stranger_cert), "+cf", str(certs.ca), files=[path])
    assert stranger.returncode != 0
    plain = _dcmtk("storescu", tls_scp.tls_port, files=[path])
    assert plain.returncode != 0
    assert _count(store) == 0
    refused = [r.getMessage() for r in caplog.records if "TLS handshake failed" in r.getMessage()]
    assert len(refused) == 3, caplog.text
    assert any("CERTIFICATE" in line for line in refused), refused
    # pynetdicom too: no certificate at all, and one from the other CA
    no_cert = client_context(TlsConfig(ca_file=certs.ca))
    assert not _echo(tls_scp.tls_port, no_cert).is_established
    other = _client_tls(certs, certs.stranger_cert, certs.stranger_key)
    assert not _echo(tls_scp.tls_port, other).is_established
    # and the server is verified by the client: a client trusting only the other CA refuses it
    distrust = client_context(TlsConfig(ca_file=certs.other_ca, cert_file=certs.client_cert,
                                        key_file=certs.client_key))
    assert not _echo(tls_scp.tls_port, distrust).is_established
    assert _echo(tls_scp.tls_port, _client_tls(certs)).is_released


def test_tls_only_scp_has_no_plain_listener(config, store, certs):
    scp = StorageScp(intake_opener(config), "MRRP", None, allowed_aes={"MRRPTEST"},
                     tls_port=0, ssl_context=_server_tls(certs))
    with scp:
        assert scp.port is None and scp.running
        assert len(scp.ae._servers) == 1
        assert _echo(scp.tls_port, _client_tls(certs)).is_released


def test_silent_tls_connection_is_cut_and_does_not_hold_up_others(tls_scp, certs, caplog):
    """The handshake runs in the connection's thread with the association request's deadline:
    a peer that connects and sends nothing neither blocks the acceptor nor stays."""
    caplog.set_level(logging.WARNING, logger="listeners.dicom_scp")
    with socket.create_connection((LOOPBACK, tls_scp.tls_port), timeout=10) as silent:
        started = time.monotonic()
        assert _echo(tls_scp.tls_port, _client_tls(certs)).is_released
        silent.setblocking(False)
        with pytest.raises(BlockingIOError):  # still open: the echo was served meanwhile
            silent.recv(1)
        silent.settimeout(10)
        assert silent.recv(1) == b""  # closed by us at the 2 s deadline
        waited = time.monotonic() - started
    assert 1.5 < waited < 5, waited
    assert "TLS handshake not complete in time" in caplog.text


def test_pdus_decrypted_ahead_of_the_read_are_served(tls_scp, store, certs):
    """A sender that writes many PDUs at once (one TLS record holds several): the PDUs after
    the first are decrypted and pending in the SSL buffer while the socket has nothing more to
    read; they must be served without waiting for more bytes."""
    tls_scp.ae.maximum_pdu_size = 4096  # the sender fragments to our maximum PDU
    ae = AE(ae_title="MRRPTEST")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    ae.add_requested_context(UltrasoundImageStorage)
    assoc = ae.associate(LOOPBACK, tls_scp.tls_port, ae_title="MRRP",
                         tls_args=(_client_tls(certs), LOOPBACK))
    assert assoc.is_established
    sock = assoc.dul.socket
    original, held = sock.send, bytearray()

    def send_coalesced(pdu):
        # P-DATA of the C-STORE: held until its last data set fragment, then written at once
        held.extend(pdu)
        if pdu[0] == 0x04 and pdu[11] & 0x03 == 0x00:
            return  # a data set fragment, not the last
        data = bytes(held)
        held.clear()
        original(data)

    sock.send = send_coalesced
    try:
        started = time.monotonic()
        status = assoc.send_c_store(us_image(Patient(), rows=256, columns=256))
        took = time.monotonic() - started
    finally:
        assoc.release()
    assert status.Status == 0x0000
    assert took < 5, took
    assert _count(store) == 1


def test_pinned_ae_is_accepted_from_its_address_only(tls_scp, store, caplog):
    caplog.set_level(logging.WARNING, logger="listeners.dicom_scp")
    elsewhere = _echo(tls_scp.port, calling="PINNED", bind=("127.0.0.2", 0))
    assert elsewhere.is_rejected
    reply = elsewhere.acceptor.primitive
    assert (reply.result, reply.result_source, reply.diagnostic) == (0x01, 0x01, 0x03)
    warnings = [r.getMessage() for r in caplog.records if "PINNED" in r.getMessage()]
    assert warnings == ["association rejected (calling AE title not recognised: pinned to other "
                        "addresses): PINNED -> MRRP from 127.0.0.2"]
    assert _echo(tls_scp.port, calling="PINNED", bind=("127.0.0.1", 0)).is_released
    # an AE that is not pinned may call from anywhere
    assert _echo(tls_scp.port, calling="MRRPTEST", bind=("127.0.0.2", 0)).is_released


def test_context_needs_what_it_names(certs, tmp_path):
    from mrrp_pacs.errors import ConfigError

    with pytest.raises(ConfigError, match=r"tls\.key_file"):
        server_context(TlsConfig(cert_file=certs.server_cert, key_file=tmp_path / "none.key"))
    with pytest.raises(ConfigError, match="cannot be loaded"):
        server_context(TlsConfig(cert_file=certs.server_cert, key_file=certs.client_key))
    with pytest.raises(ConfigError, match="require_client_cert"):
        server_context(TlsConfig(cert_file=certs.server_cert, key_file=certs.server_key,
                                 require_client_cert=True))
    context = client_context(TlsConfig(ca_file=certs.ca))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2 and context.check_hostname
