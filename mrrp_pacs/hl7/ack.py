"""HL7 v2 acknowledgements: the MSH header they answer, the mode that decides whether one is
sent, how one is built (the listener) and how one is read (the client).

The rules, for the interface engineer on the other side, are in :mod:`listeners.mllp`.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime

from mrrp_pacs.errors import Hl7Error
from mrrp_pacs.hl7.message import (
    DEFAULT_ENCODING_CHARACTERS,
    UTF8_BOM,
    decode,
    escape,
    parse_message,
)

MAX_ECHO_CHARS = 256
MAX_REASON_CHARS = 200
ACCEPTED_CODES = ("AA", "CA")

# HL7 table 0357 (message error condition codes) used in ERR-3
ERROR_DATA = ("102", "Data type error")
ERROR_LOCKED = ("206", "Application record locked")
ERROR_INTERNAL = ("207", "Application internal error")


_FIRST_LINE = re.compile(rb"(?:[ \t]*(?:\r\n|\n|\r))*([^\r\n]*)")


@dataclass(frozen=True)
class MshHeader:
    """The MSH fields an acknowledgement needs, as sent (escaped), each cut at MAX_ECHO_CHARS."""

    field_separator: str
    encoding_characters: str  # MSH-2 as sent (4 characters, 5 from v2.7)
    sending_application: str  # MSH-3
    sending_facility: str  # MSH-4
    receiving_application: str  # MSH-5
    receiving_facility: str  # MSH-6
    trigger_event: str  # MSH-9.2
    control_id: str  # MSH-10
    processing_id: str  # MSH-11
    version: str  # MSH-12
    accept_ack_type: str  # MSH-15, upper case
    application_ack_type: str  # MSH-16, upper case
    charset: str  # MSH-18 as sent; '' when we cannot write it (unknown, or bytes not in it)
    codec: str  # Python codec that reproduces the header's bytes

    @property
    def enhanced_mode(self) -> bool:
        return bool(self.accept_ack_type or self.application_ack_type)


def read_header(data: bytes) -> MshHeader | None:
    """Read the MSH segment of a message (or of the first bytes of one); None without an MSH.

    Total: never raises. The header is decoded by MSH-18 when that works; else as Latin-1,
    which gives back the very bytes sent when the acknowledgement is encoded the same way, and
    ``charset`` is left empty: the answer must not claim a character set we cannot write.
    """
    body = data[len(UTF8_BOM) :] if data.startswith(UTF8_BOM) else data
    match = _FIRST_LINE.match(body)
    line = match[1] if match else b""
    if len(line) < 8 or not line.startswith(b"MSH"):
        return None
    try:
        text, codec = decode(line)
        charset_known = True
    except Hl7Error:
        text, codec, charset_known = line.decode("latin-1"), "latin-1", False
    if codec == "cp1252":  # undeclared and not UTF-8: Latin-1 gives back the very bytes
        text, codec = line.decode("latin-1"), "latin-1"
    separator = text[3]
    if separator.isalnum() or separator.isspace():
        return None
    fields = ["MSH", separator, *(f[:MAX_ECHO_CHARS] for f in text[4:].split(separator))]

    def get(n: int) -> str:
        return fields[n] if n < len(fields) else ""

    encoding = get(2)
    component_sep = (encoding + DEFAULT_ENCODING_CHARACTERS)[0]
    message_type = get(9).split(component_sep)
    return MshHeader(
        field_separator=separator,
        encoding_characters=encoding,
        sending_application=get(3),
        sending_facility=get(4),
        receiving_application=get(5),
        receiving_facility=get(6),
        trigger_event=message_type[1] if len(message_type) > 1 else "",
        control_id=get(10),
        processing_id=get(11),
        version=get(12),
        accept_ack_type=get(15).strip().upper(),
        application_ack_type=get(16).strip().upper(),
        charset=get(18) if charset_known else "",
        codec=codec,
    )


def _wanted(ack_type: str, success: bool) -> bool:
    """Whether an enhanced-mode condition (HL7 table 0155) asks for an acknowledgement."""
    if ack_type in ("", "NE"):
        return False
    if ack_type == "ER":
        return not success
    if ack_type == "SU":
        return success
    return True  # AL, and values we do not know: answering is safer than silence


def acknowledgement_code(header: MshHeader | None, code: str) -> str | None:
    """The code to send for outcome ``code`` (AA, AE or AR) under the message's mode; None = none.

    Original mode answers ``code``. Enhanced mode answers ``code`` when MSH-16 asks for it,
    else the commit code (CA, CE, CR) when MSH-15 asks for it, else nothing.
    """
    if header is None or not header.enhanced_mode:
        return code
    success = code == "AA"
    if _wanted(header.application_ack_type, success):
        return code
    if _wanted(header.accept_ack_type, success):
        return "C" + code[1]
    return None


@dataclass(frozen=True)
class AckError:
    """Why a message was not accepted: an HL7 table 0357 code and a reason without patient data."""

    code: str
    text: str
    reason: str


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", version.split("^")[0])
    return tuple(int(p) for p in parts[:3]) or (2, 5)


def build_ack(header: MshHeader | None, code: str, error: AckError | None = None,
              application: str = "MRRP", now: datetime | None = None) -> bytes:
    """Encode the acknowledgement of a message (without MLLP framing).

    Parameters
    ----------
    header
        The message's MSH, or None when it had none (a minimal v2.5 ACK then answers).
    code
        MSA-1: AA, AE, AR, CA, CE or CR.
    error
        For AE/AR/CE/CR: the ERR segment's code and the reason (also in MSA-3).
    application
        Our MSH-3 when the message named no receiving application.
    now
        MSH-7 (local time with offset); the current time by default.
    """
    if header is not None and _usable_delimiters(header):
        sep, encoding = header.field_separator, header.encoding_characters

        def echo(value: str) -> str:
            return value
    else:
        # no header, or delimiters an answer cannot reuse: standard ones, echoed values escaped
        sep, encoding = "|", DEFAULT_ENCODING_CHARACTERS

        def echo(value: str) -> str:
            return escape(value, sep, encoding)
    component, subcomponent = encoding[0], encoding[3]
    stamp = (now or datetime.now().astimezone()).strftime("%Y%m%d%H%M%S%z")
    trigger = echo(header.trigger_event) if header else ""
    message_type = component.join(["ACK", trigger, "ACK"]) if trigger else "ACK"
    msh = [
        "MSH", encoding,
        echo(header.receiving_application if header else "") or application,
        echo(header.receiving_facility if header else ""),
        echo(header.sending_application if header else ""),
        echo(header.sending_facility if header else ""),
        stamp, "", message_type, uuid.uuid4().hex[:20].upper(),
        echo(header.processing_id if header else "") or "P",
        echo(header.version if header else "") or "2.5",
    ]
    if header and header.charset:
        msh += ["", "", "", "", "", echo(header.charset)]
    msa = ["MSA", code, echo(header.control_id if header else "")]
    segments = [msh]
    if error is not None:
        reason = escape(error.reason[:MAX_REASON_CHARS], sep, encoding)
        msa.append(reason)
        if header and _version_tuple(header.version) < (2, 5):
            # v2.1-2.4 ERR-1 is an ELD whose 4th component is the coded condition
            segments += [msa, ["ERR", component * 3 + subcomponent.join(
                [error.code, error.text, "HL70357"])]]
        else:
            segments += [msa, ["ERR", "", "", component.join([error.code, error.text, "HL70357"]),
                               "E", "", "", "", reason]]
    else:
        segments.append(msa)
    # MSH-1 is the separator itself, so joining MSH's list by it gives "MSH|^~\\&|..."
    text = "".join(sep.join(segment) + "\r" for segment in segments)
    codec = header.codec if header else "ascii"
    return text.encode(codec, errors="replace")


def _usable_delimiters(header: MshHeader) -> bool:
    """Whether the message's five delimiters are distinct ASCII punctuation (else an answer
    written with them could not be read back)."""
    chars = header.field_separator + header.encoding_characters[:4]
    return (len(chars) == 5 and len(set(chars)) == 5
            and all(c.isascii() and c.isprintable() and not c.isalnum() and c != " "
                    for c in chars))


@dataclass(frozen=True)
class Ack:
    """The answer to one message sent.

    ``code`` is MSA-1 (AA, AE, AR, CA, CE, CR) or '' when no acknowledgement came (then
    ``error`` says why); ``acked_control_id`` is MSA-2 as received.
    """

    control_id: str  # MSH-10 of the message sent ('' when it has no MSH)
    code: str
    acked_control_id: str = ""
    error: str = ""

    @property
    def accepted(self) -> bool:
        """AA or CA naming the control id sent."""
        return self.code in ACCEPTED_CODES and self.acked_control_id == self.control_id


def read_ack(data: bytes, control_id: str) -> Ack:
    """Read an acknowledgement (framing removed) for the message with ``control_id``."""
    try:
        message = parse_message(data)
    except Hl7Error as exc:
        return Ack(control_id, "", error=f"unreadable acknowledgement: {exc}")
    msa = message.segment("MSA")
    if msa is None:
        return Ack(control_id, "", error="acknowledgement without an MSA segment")
    error = message.get("ERR-8") or message.get("ERR-3.2") or message.get("MSA-3")
    return Ack(control_id, message.component(msa, 1).upper(), message.field(msa, 2), error)


def wait_mode(header: MshHeader | None) -> str:
    """'always', 'maybe' (ER/SU: only on error or success) or 'never' (NE/NE)."""
    if header is None or not header.enhanced_mode:
        return "always"
    kinds = {header.accept_ack_type, header.application_ack_type} - {""}
    if kinds <= {"NE"}:
        return "never"
    if kinds <= {"NE", "ER", "SU"}:
        return "maybe"
    return "always"
