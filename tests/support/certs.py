"""Test certificates, made by the ``openssl`` command line (declare ``needs_tool("openssl")``).

:func:`make_certs` writes, into one folder: a CA; a server certificate for 127.0.0.1 (IP and
DNS ``localhost`` subject alternative names) and a client certificate, both signed by it; and a
second CA with a client certificate of its own (a stranger to the first CA). RSA 2048 and
SHA-256, valid ten years from the real clock (OpenSSL in the test process and in dcmtk checks
dates against the real clock too, also in the clock-ahead pass). Keys are not encrypted.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from tools import tool

DAYS = "3650"


@dataclass(frozen=True)
class Certs:
    folder: Path
    ca: Path  # the CA (certificate) our listeners and clients trust
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA nobody trusts
    stranger_cert: Path  # signed by other_ca
    stranger_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run([tool("openssl"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", DAYS,
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN=mrrp test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)


def _leaf(folder: Path, name: str, ca: str, usage: str) -> None:
    (folder / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN=mrrp test {name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-sha256", "-days", DAYS, "-extfile", f"{name}.ext",
             "-out", f"{name}.pem", cwd=folder)


def make_certs(folder: Path) -> Certs:
    folder.mkdir(parents=True, exist_ok=True)
    _ca(folder, "ca")
    _ca(folder, "other-ca")
    _leaf(folder, "server", "ca", "serverAuth,clientAuth")
    _leaf(folder, "client", "ca", "clientAuth,serverAuth")
    _leaf(folder, "stranger", "other-ca", "clientAuth,serverAuth")
    return Certs(folder, folder / "ca.pem", folder / "server.pem", folder / "server.key",
                 folder / "client.pem", folder / "client.key", folder / "other-ca.pem",
                 folder / "stranger.pem", folder / "stranger.key")
