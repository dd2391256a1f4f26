"""Transport security: the TLS contexts of every listener and client, and source-address checks.

One ``[tls]`` section (:class:`~mrrp_pacs.config.TlsConfig`) holds our certificate and key, the
CA file peers are verified against, and two switches; each listener and each peer turns TLS on
for itself (``[dicom] tls``, ``[hl7] tls``, ``[pacs] tls``, ``[export] tls``, ``[export]
hl7_tls``). :func:`server_context` and :func:`client_context` build the contexts; the
configuration check builds them too, so a missing file, a key that does not match its
certificate or an unreadable CA file is reported by ``mrrp-pacs config`` and ``doctor``, not at
the first connection.

Both sides speak TLS 1.2 or newer. A server asks a client for its certificate when a CA file is
configured and, with ``require_client_cert``, refuses a client without one signed by that CA
(mutual TLS). A client always verifies the server against the CA file (else the system's
CAs) and checks its name unless ``check_hostname`` is off (hospital peers are often reached by
IP address, with certificates that do not name it); it presents our certificate when one is
configured.

The address checks (:func:`parse_networks`, :func:`address_allowed`) compare a peer's source
address with a list of addresses and CIDR networks (``10.1.2.3``, ``10.1.0.0/16``,
``fd00::/8``); an IPv4 peer seen through an IPv6 socket (``::ffff:10.1.2.3``) is compared as
IPv4.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from mrrp_pacs.errors import ConfigError

if TYPE_CHECKING:
    from mrrp_pacs.config import TlsConfig

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _need(path: Path | None, key: str, what: str) -> Path:
    if path is None:
        raise ConfigError(f"tls.{key} is empty; TLS needs {what}", key=f"tls.{key}")
    if not path.is_file():
        raise ConfigError(f"tls.{key} = {str(path)!r}: no such file ({what})",
                          key=f"tls.{key}")
    return path


def _load_chain(context: ssl.SSLContext, tls: TlsConfig) -> None:
    cert = _need(tls.cert_file, "cert_file", "our certificate (PEM)")
    key = _need(tls.key_file, "key_file", "the private key of our certificate (PEM)")
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls.cert_file = {str(cert)!r} with tls.key_file = {str(key)!r} "
                          f"cannot be loaded: {_reason(exc)} (PEM files, unencrypted key, the "
                          "key of that certificate)", key="tls.cert_file") from None


def _load_ca(context: ssl.SSLContext, tls: TlsConfig) -> None:
    ca = _need(tls.ca_file, "ca_file", "the CA certificates that sign our peers' (PEM)")
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"tls.ca_file = {str(ca)!r} cannot be loaded: {_reason(exc)} (PEM "
                          "CA certificates)", key="tls.ca_file") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return str(getattr(exc, "strerror", None) or exc)


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """The context of our TLS listeners (DICOM SCP, MLLP).

    Raises
    ------
    ConfigError
        No certificate or key, a file missing or unreadable, a key not matching its
        certificate; ``require_client_cert`` without a CA file.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_chain(context, tls)
    if tls.require_client_cert and tls.ca_file is None:
        raise ConfigError("tls.require_client_cert = true needs tls.ca_file: the CA that signs "
                          "the certificates clients must present", key="tls.ca_file")
    if tls.ca_file is not None:
        _load_ca(context, tls)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(tls: TlsConfig) -> ssl.SSLContext:
    """The context of our TLS clients (PACS puller, result sender, MLLP result client, doctor).

    Raises
    ------
    ConfigError
        A configured file missing or unreadable, a key not matching its certificate, only one
        of ``cert_file`` and ``key_file``.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = MINIMUM_VERSION
    context.check_hostname = tls.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if tls.ca_file is not None:
        _load_ca(context, tls)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError("tls.cert_file and tls.key_file go together: set both (our "
                          "certificate, presented to peers that ask for one) or neither",
                          key="tls.cert_file")
    if tls.cert_file is not None:
        _load_chain(context, tls)
    return context


def parse_networks(values: Iterable[str], key: str) -> tuple[Network, ...]:
    """Addresses and CIDR networks (``10.1.2.3``, ``10.1.0.0/16``) as networks.

    Raises
    ------
    ConfigError
        A value that is neither, naming ``key``.
    """
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ConfigError(f"{key}: {value!r} is not an IP address or CIDR network such as "
                              "10.1.2.3 or 10.1.0.0/16", key=key) from None
    return tuple(networks)


def address_allowed(address: str, networks: Iterable[Network]) -> bool:
    """Whether the peer ``address`` lies in one of ``networks`` (False when it is no address)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)
