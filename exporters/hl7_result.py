"""The MRRP result as an HL7 v2.5.1 ORU^R01 message, and its delivery over MLLP.

The message carries one OBR (the MRRP assessment) and one OBX per value: risk (log relative
hazard, higher = worse), percentile, risk group, recurrence-free probability per horizon, the
model, and the modalities compensated. Codes are local (coding system ``L``); a site mapping
them to its own catalogue does so in its interface engine.

:class:`MllpSender` sends one message per connection (through the project's MLLP client) and
reads its acknowledgement: AA/CA naming our MSH-10 is a delivery; AE/CE and no answer are
transient failures, AR/CR permanent. The peer's error text is not kept (it may quote the message).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from exporters.mllp_client import send_messages
from mrrp_pacs.errors import SendError
from mrrp_pacs.hl7.message import escape
from mrrp_pacs.hl7.mllp import MLLP_END, MLLP_START
from mrrp_pacs.results import RiskResult

LOGGER = logging.getLogger(__name__)

CODING_SYSTEM = "L"
DEFAULT_TIMEOUT_S = 30.0
REJECTED_CODES = ("AR", "CR")


def build_oru_r01(result: RiskResult, *, control_id: str, message_time: datetime,
                  sending_application: str = "MRRP", sending_facility: str = "",
                  receiving_application: str = "", receiving_facility: str = "",
                  processing_id: str = "P") -> bytes:
    """Encode ``result`` as an ORU^R01 (HL7 v2.5.1, UTF-8, segments ended by CR).

    Parameters
    ----------
    result
        The score; ``patient_key`` (``<id>^^^<issuer>`` or a bare id) becomes PID-3.
    control_id
        MSH-10. Derive it from the score (e.g. ``MRRP<score id>``) so that a resend carries
        the same id and the receiver can recognise the duplicate.
    message_time
        MSH-7 (timezone-aware; written in UTC).
    sending_application, sending_facility, receiving_application, receiving_facility
        MSH-3 to MSH-6.
    processing_id
        MSH-11: ``P`` production, ``T`` training, ``D`` debugging.

    Raises
    ------
    ValueError
        An empty control id or patient key, a naive ``message_time``, or a ``scored_at`` that
        is not ISO 8601.
    """
    if not control_id.strip() or len(control_id) > 199:
        raise ValueError(f"MSH-10 control id must be 1-199 characters, got {control_id!r}")
    if not result.patient_key.strip():
        raise ValueError("the result has no patient key for PID-3")
    if message_time.tzinfo is None:
        raise ValueError("message_time must be timezone-aware")
    patient_id, _, issuer = result.patient_key.partition("^^^")
    observed = _hl7_time(result.scored_at) if result.scored_at else ""
    header = [
        "MSH", "^~\\&", escape(sending_application), escape(sending_facility),
        escape(receiving_application), escape(receiving_facility),
        message_time.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000"), "", "ORU^R01^ORU_R01",
        escape(control_id), processing_id, "2.5.1", "", "", "", "", "", "UNICODE UTF-8",
    ]
    pid = ["PID", "1", "",
           f"{escape(patient_id)}^^^{escape(issuer)}" if issuer else escape(patient_id)]
    obr = ["OBR", "1", "", escape(f"MRRP-{control_id}"),
           _code("MRRP", "Recurrence risk assessment (MRRP)"), "", "", observed,
           *[""] * 14, observed, "", "OTH", "F"]
    values: list[tuple[str, str, str, str, str]] = [
        ("NM", "MRRP-RISK", "Recurrence risk, log relative hazard (higher = worse)",
         f"{result.risk:.4f}", ""),
        ("NM", "MRRP-PCT", "Risk percentile in the training cohort", f"{result.percentile:.1f}",
         "%"),
        ("ST", "MRRP-GROUP", "Risk group", result.group, ""),
    ]
    for horizon, probability in sorted(result.rfs_probability.items(), key=lambda h: int(h[0])):
        values.append(("NM", f"MRRP-RFS-{int(horizon)}",
                       f"Recurrence-free probability at {int(horizon)} months",
                       f"{probability:.4f}", ""))
    values.append(("ST", "MRRP-MODEL", "Model", result.model_label, ""))
    if result.compensated:
        values.append(("ST", "MRRP-COMP", "Modalities missing, compensated by the model",
                       ", ".join(result.compensated), ""))
    obxs = [["OBX", str(n), value_type, _code(code, text), "", escape(value), escape(units),
             "", "", "", "", "F", "", "", observed]
            for n, (value_type, code, text, value, units) in enumerate(values, start=1)]
    segments = [header, pid, obr, *obxs]
    return "".join("|".join(s) + "\r" for s in segments).encode("utf-8")


class MllpSender:
    """Sends HL7 messages to one MLLP listener, one connection per message.

    Parameters
    ----------
    host, port
        The listener.
    timeout_s
        Seconds to connect, and to wait for the acknowledgement.
    ssl_context
        MLLP over TLS with this client context (:func:`mrrp_pacs.tls.client_context`).
    """

    def __init__(self, host: str, port: int, timeout_s: float = DEFAULT_TIMEOUT_S,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if not host:
            raise ValueError("MLLP destination needs a host")
        if not 0 < port < 65536:
            raise ValueError(f"MLLP port {port} is not in 1-65535")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.ssl_context = ssl_context

    @property
    def peer(self) -> str:
        return f"mllp{'s' if self.ssl_context is not None else ''}://{self.host}:{self.port}"

    def send(self, data: bytes) -> None:
        """Send one unframed message and check its acknowledgement.

        Raises
        ------
        SendError
            No connection or acknowledgement (transient), AE/CE (transient), AR/CR or an
            object that cannot be framed (permanent).
        """
        if MLLP_START in data or MLLP_END[:1] in data:
            raise SendError("the message holds MLLP framing bytes (0x0B/0x1C)", transient=False)
        try:
            (ack,) = send_messages(self.host, self.port, [data], self.timeout_s,
                                   self.ssl_context)
        except OSError as exc:
            # a TLS failure (certificate not trusted, name mismatch) is retried too: the
            # outbox's time budget lets an operator fix either side
            why = f": {exc.reason}" if isinstance(exc, ssl.SSLError) and exc.reason else ""
            raise SendError(f"no MLLP connection to {self.peer} ({type(exc).__name__}{why})",
                            transient=True) from None
        if ack.accepted:
            return
        if not ack.code:
            raise SendError(f"no acknowledgement from {self.peer} within {self.timeout_s:g} s "
                            "or the connection was lost", transient=True)
        if ack.acked_control_id != ack.control_id:
            raise SendError(f"{self.peer} acknowledged another message ({ack.code}, MSA-2 does "
                            "not match MSH-10)", transient=True)
        raise SendError(f"{self.peer} answered {ack.code}",
                        transient=ack.code not in REJECTED_CODES)

    @contextmanager
    def session(self) -> Iterator[MllpSender]:
        """Sends need no shared state: each opens its own connection."""
        yield self


def _code(code: str, text: str) -> str:
    return f"{escape(code)}^{escape(text)}^{CODING_SYSTEM}"


def _hl7_time(iso: str) -> str:
    """ISO 8601 (``2026-01-06T12:00:00Z``) → HL7 TS in UTC (``20260106120000+0000``)."""
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")
