"""The result sender and the PACS puller against a PACS that speaks DICOM over TLS only: the
private Orthanc with DicomTlsEnabled and a client certificate required, moving studies to our
storage SCP's TLS port (its modality entry has UseDicomTls). Certificates: tests/support/certs.py
(Orthanc presents the server certificate, which also carries clientAuth, when it connects)."""

from datetime import datetime

import pytest
from builders import Patient, encode, us_image
from orthanc import LOOPBACK, free_port, running_orthanc

from exporters.dicom_sender import DicomSender
from listeners.dicom_scp import StorageScp, intake_opener
from listeners.pacs_puller import PacsPuller, RemotePacs
from mrrp_pacs.config import TlsConfig
from mrrp_pacs.errors import SendError
from mrrp_pacs.tls import client_context, server_context

pytestmark = pytest.mark.needs_tool("Orthanc", "openssl")
NOW = datetime(2030, 1, 1, 12, 0)


def test_sender_and_puller_over_tls_with_orthanc(config, store, certs, tmp_path):
    our_tls_port = free_port()
    orthanc_tls = {
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(certs.server_cert),
        "DicomTlsPrivateKey": str(certs.server_key),
        "DicomTlsTrustedCertificates": str(certs.ca),
        "DicomTlsRemoteCertificateRequired": True,
    }
    us_mrrp = {"AET": "MRRP", "Host": LOOPBACK, "Port": our_tls_port, "UseDicomTls": True}
    client = client_context(TlsConfig(cert_file=certs.client_cert, key_file=certs.client_key,
                                      ca_file=certs.ca))
    with running_orthanc(tmp_path / "orthanc", "PACS", {"MRRP": us_mrrp},
                         extra=orthanc_tls) as pacs:
        image = encode(us_image(Patient()))
        sender = DicomSender(LOOPBACK, pacs.dicom_port, "PACS", "MRRP", timeout_s=30,
                             ssl_context=client)
        sender.send(image)
        assert pacs.statistics()["CountInstances"] == 1
        # without our certificate, or without TLS, the PACS refuses us; retried later
        bare = DicomSender(LOOPBACK, pacs.dicom_port, "PACS", "MRRP", timeout_s=10,
                           ssl_context=client_context(TlsConfig(ca_file=certs.ca)))
        with pytest.raises(SendError) as refused:
            bare.send(image)
        assert refused.value.transient
        plain = DicomSender(LOOPBACK, pacs.dicom_port, "PACS", "MRRP", timeout_s=10)
        with pytest.raises(SendError):
            plain.send(image)
        # a sender that does not trust the PACS's CA does not send
        distrust = DicomSender(LOOPBACK, pacs.dicom_port, "PACS", "MRRP", timeout_s=10,
                               ssl_context=client_context(TlsConfig(
                                   ca_file=certs.other_ca, cert_file=certs.client_cert,
                                   key_file=certs.client_key)))
        with pytest.raises(SendError, match="TLS handshake failed"):
            distrust.send(image)

        # the puller: C-FIND and C-MOVE over TLS, the PACS moving to our SCP's TLS port
        ours = server_context(TlsConfig(cert_file=certs.server_cert, key_file=certs.server_key,
                                        ca_file=certs.ca, require_client_cert=True))
        remote = RemotePacs(LOOPBACK, pacs.dicom_port, "PACS")
        with StorageScp(intake_opener(config), "MRRP", None, allowed_aes={"PACS"},
                        tls_port=our_tls_port, ssl_context=ours):
            summary = PacsPuller(store, remote, "MRRP", our_port=our_tls_port, window_days=None,
                                 ssl_context=client).poll(NOW)
            assert summary.errors == [] and (summary.found, summary.retrieved) == (1, 1)
            unencrypted = PacsPuller(store, remote, "MRRP", window_days=None).poll(NOW)
            assert unencrypted.errors and "cannot associate" in unencrypted.errors[0]
    rows = store.conn.execute("SELECT count(*) FROM instances").fetchone()[0]
    assert rows == 1
