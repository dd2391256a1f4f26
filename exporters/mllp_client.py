"""A small MLLP client: send HL7 v2 messages over one connection and read their acknowledgements.

Used by the ORU result sender (:mod:`exporters.hl7_result`), the operator command ``mrrp-pacs
hl7 send`` and tests; the protocol is :mod:`mrrp_pacs.hl7`. One message is sent at a
time and its acknowledgement awaited before the next (HL7 order matters). A message whose
MSH-15/MSH-16 ask for no acknowledgement (NE) is not waited for; one that asks only on
error or only on success (ER, SU) is waited for up to the timeout.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path

from mrrp_pacs.errors import Hl7Error
from mrrp_pacs.hl7.ack import Ack, read_ack, read_header, wait_mode
from mrrp_pacs.hl7.message import split_messages
from mrrp_pacs.hl7.mllp import MLLP_END, MLLP_START, FrameReader, framed

MAX_FILE_BYTES = 64 * 1024 * 1024


def send_messages(host: str, port: int, messages: Iterable[bytes],
                  timeout_s: float = 30.0, ssl_context: ssl.SSLContext | None = None) -> list[Ack]:
    """Send ``messages`` (unframed HL7 v2) over one MLLP connection; one :class:`Ack` each.

    Parameters
    ----------
    host, port
        The MLLP listener.
    messages
        Messages without MLLP framing, segments ended by CR.
    timeout_s
        Seconds to connect, and to wait for each acknowledgement.
    ssl_context
        MLLP over TLS with this client context (:func:`mrrp_pacs.tls.client_context`): the
        listener's certificate is verified (its name against ``host`` when the context checks
        host names) before anything is sent.

    Returns
    -------
    list[Ack]
        In the order sent. After a lost connection or a missing acknowledgement the rest are
        not sent (their ``error`` says so), since the stream can no longer be trusted.

    Raises
    ------
    OSError
        The connection cannot be opened, or its TLS handshake failed (``ssl.SSLError``; nothing
        was sent).
    """
    pending = list(messages)
    acks: list[Ack] = []
    with ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection((host, port), timeout=timeout_s))
        if ssl_context is not None:
            sock = stack.enter_context(ssl_context.wrap_socket(sock, server_hostname=host))
        connection = FrameReader(sock, timeout_s)
        broken = ""
        for raw in pending:
            header = read_header(raw)
            control_id = header.control_id if header else ""
            if broken:
                acks.append(Ack(control_id, "", error=f"not sent: {broken}"))
                continue
            if MLLP_START in raw or MLLP_END[:1] in raw:
                acks.append(Ack(control_id, "", error="holds MLLP framing bytes (0x0B/0x1C); "
                                                      "not sent"))
                continue
            mode = wait_mode(header)
            try:
                sock.settimeout(timeout_s)
                sock.sendall(framed(raw))
                if mode == "never":
                    acks.append(Ack(control_id, "", error="no acknowledgement asked for "
                                                          "(MSH-15/MSH-16 NE)"))
                    continue
                answer = connection.next_frame()
            except OSError as exc:
                broken = f"connection lost ({exc})"
                acks.append(Ack(control_id, "", error=broken))
                continue
            if answer is None:
                if mode == "maybe":
                    acks.append(Ack(control_id, "", error=f"no acknowledgement within "
                                f"{timeout_s:g} s (MSH-15/MSH-16 ask for one only on error "
                                "or on success)"))
                    continue
                broken = f"no acknowledgement within {timeout_s:g} s"
                acks.append(Ack(control_id, "", error=broken))
                continue
            acks.append(read_ack(answer, control_id))
    return acks


def read_messages(path: Path, max_file_bytes: int = MAX_FILE_BYTES) -> list[bytes]:
    """The messages of an HL7 file: one message, several, MLLP-framed, or an FHS/BHS batch.

    Raises
    ------
    OSError
        The file cannot be read.
    Hl7Error
        Larger than ``max_file_bytes``, holds no message, or has content before its first MSH.
    """
    size = path.stat().st_size
    if size > max_file_bytes:
        raise Hl7Error(f"is {size} bytes, more than {max_file_bytes}")
    messages = split_messages(path.read_bytes())
    if not messages:
        raise Hl7Error("holds no HL7 message (no MSH segment)")
    return messages


def send_files(paths: Sequence[Path], host: str, port: int, timeout_s: float = 30.0,
               ssl_context: ssl.SSLContext | None = None) -> list[tuple[Path, Ack]]:
    """Send every message of every file over one connection, in order.

    A file that cannot be read or split yields one entry with an empty code and the reason;
    the other files are still sent. Returns (file, acknowledgement) per message.

    Raises
    ------
    OSError
        The connection cannot be opened.
    """
    entries: list[tuple[Path, bytes | Ack]] = []
    for path in paths:
        try:
            entries += [(path, raw) for raw in read_messages(path)]
        except (OSError, Hl7Error) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            entries.append((path, Ack("", "", error=f"{path}: {reason}")))
    to_send = [item for _, item in entries if isinstance(item, bytes)]
    acks = iter(send_messages(host, port, to_send, timeout_s, ssl_context) if to_send else [])
    return [(path, item if isinstance(item, Ack) else next(acks)) for path, item in entries]
