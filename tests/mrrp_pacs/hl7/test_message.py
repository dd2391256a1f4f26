"""HL7 v2 messages: splitting, decoding, reading, and the one escaping rule."""

import random

import pytest
from builders import Patient, mllp, pathology_result, us_report
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message as hl7apy_parse

from mrrp_pacs.errors import Hl7Error
from mrrp_pacs.hl7.message import (
    escape,
    looks_like_hl7,
    parse_message,
    split_messages,
    unescape,
)


@pytest.mark.parametrize("end", ["\r", "\n", "\r\n"])
def test_any_segment_ending_parses_the_same(end):
    message = parse_message(us_report(Patient(), end=end))
    assert [s.name for s in message.segments] == ["MSH", "PID", "OBR", "OBX", "OBX", "OBX"]
    assert message.get("MSH-10") == "US-0001"
    assert message.get("OBR-3") == "US-MRN001"
    assert message.get("MSH-9.2") == "R01"


def test_utf8_text_is_decoded_by_msh18():
    patient = Patient(name="Müller^Zoë")
    raw = us_report(patient, text=("Läsion 12 mm, unscharf begrenzt — BI-RADS 4B",))
    message = parse_message(raw)
    assert message.charset == "utf-8"
    assert message.component(message.segment("PID"), 5, 1) == "Müller"
    assert "Läsion" in message.text and "—" in message.text


def test_latin1_declared_charset():
    raw = us_report(Patient()).replace(b"UNICODE UTF-8", b"8859/1").replace(
        b"irregular", "irrégulière".encode("latin-1"))
    message = parse_message(raw)
    assert message.charset == "latin-1"
    assert "irrégulière" in message.text


def test_undeclared_non_utf8_falls_back_to_cp1252():
    raw = us_report(Patient()).replace(b"UNICODE UTF-8", b"").replace(
        b"irregular", "irrégulière".encode("cp1252"))
    assert "irrégulière" in parse_message(raw).text


def test_declared_charset_that_does_not_decode_is_an_error():
    raw = us_report(Patient()).replace(b"irregular", b"\xff\xfe")
    with pytest.raises(Hl7Error, match="not valid UNICODE UTF-8"):
        parse_message(raw)


def test_escape_sequences_are_decoded():
    raw = us_report(Patient(), text=(r"size 18 \T\ margin \F\ spiculated\.br\BI-RADS \X34\C",))
    message = parse_message(raw)
    obx = message.segments[3]
    assert message.unescape(message.field(obx, 5)) == "size 18 & margin | spiculated\nBI-RADS 4C"


def test_unknown_segments_are_kept():
    raw = us_report(Patient(), extra=("ZDS|1.2.3^MRRP^Application^DICOM", "ZZZ|x"))
    message = parse_message(raw)
    assert [s.name for s in message.segments][3:5] == ["ZDS", "ZZZ"]


@pytest.mark.parametrize(("raw", "reason"), [
    (b"PID|1||x\r", "does not start with an MSH"),
    (b"MSH|^~\\&|A|B|C|D|20260101||ORU^R01||P|2.5\r", "MSH-10"),
    (b"MSH|^~\\&|A|B|C|D|20260101||||P|2.5\r", "MSH-9"),
    (b"MSH|^~\\&|A|B|C|D|20260101||ORU^R01|1|P|2.5\rthis is not a segment\r", "line 2"),
    (b"MSH|^~|A|B|C|D|20260101||ORU^R01|1|P|2.5\r", "MSH-2"),
])
def test_malformed_messages_say_why(raw, reason):
    with pytest.raises(Hl7Error, match=reason):
        parse_message(raw)


def test_split_mllp_frames_and_plain_concatenation():
    one, two = us_report(Patient(), "A1"), pathology_result(Patient(), "A2")
    assert split_messages(mllp(one) + mllp(two)) == [one, two]
    assert split_messages(one + two) == [one, two]
    lf = us_report(Patient(), "A3", end="\n") + pathology_result(Patient(), "A4", end="\n")
    assert [parse_message(m).get("MSH-10") for m in split_messages(lf)] == ["A3", "A4"]


def test_truncated_mllp_frame_is_an_error():
    with pytest.raises(Hl7Error, match="end block"):
        split_messages(mllp(us_report(Patient()))[:-2])


def test_sniffing():
    assert looks_like_hl7(us_report(Patient())[:132])
    assert looks_like_hl7(mllp(us_report(Patient()))[:132])
    assert looks_like_hl7(b"\xef\xbb\xbf" + us_report(Patient())[:132])
    assert not looks_like_hl7(b"MSHALL be text")
    assert not looks_like_hl7(b"\0" * 132)


def test_hl7apy_reads_the_same_fields():
    """Cross-check against hl7apy (tolerant, flat segments: its ORU group parsing is unreliable)."""
    raw = pathology_result(Patient())
    ours = parse_message(raw)
    theirs = hl7apy_parse(raw.decode(), validation_level=VALIDATION_LEVEL.TOLERANT,
                          find_groups=False)
    assert theirs.msh.msh_10.value == ours.get("MSH-10")
    assert theirs.pid.pid_3.pid_3_1.value == ours.get("PID-3")
    values = [obx.obx_5.to_er7() for obx in theirs.obx]
    assert values == [ours.field(s, 5) for s in ours.segments if s.name == "OBX"]


# -- escaping: one rule, both ways -----------------------------------------------------------

ESCAPED = [
    ("a|b^c&d~e\\f", "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"),
    ("line one\nline two", "line one\\.br\\line two"),
    ("Größe 2,1 cm; \\E\\ literally", "Größe 2,1 cm; \\E\\E\\E\\ literally"),
    ("", ""),
]


@pytest.mark.parametrize(("text", "wire"), ESCAPED)
def test_escape_gives_the_wire_form_and_unescape_takes_it_back(text, wire):
    assert escape(text) == wire
    assert unescape(wire) == text


def test_every_line_break_becomes_one_br_and_comes_back_as_lf():
    assert escape("a\r\nb\rc\nd") == "a\\.br\\b\\.br\\c\\.br\\d"
    assert unescape(escape("a\r\nb\rc\nd")) == "a\nb\nc\nd"


def test_escape_follows_the_messages_own_delimiters():
    # MSH|^~\& is not the only encoding: a site may send MSH#$*@! (field #, escape @)
    assert escape("a#b$c@d", separator="#", encoding="$*@!") == "a@F@b@S@c@E@d"
    assert unescape("a@F@b@S@c@E@d", separator="#", encoding="$*@!") == "a#b$c@d"


def test_round_trip_on_random_text_both_ways():
    rng = random.Random(7)
    alphabet = "ab |^~\\&\r\n.XE0"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        canonical = text.replace("\r\n", "\n").replace("\r", "\n")
        assert unescape(escape(text)) == canonical
        assert escape(unescape(escape(text))) == escape(text)


def test_a_parsed_message_unescapes_what_escape_wrote():
    note = "margins: <1 mm | re-excision^advised\nsee report"
    raw = (b"MSH|^~\\&|LIS|H|MRRP|H|20260105120000||ORU^R01|E1|P|2.5\r"
           b"PID|1||P1^^^HOSP\r"
           + f"NTE|1||{escape(note)}\r".encode())
    message = parse_message(raw)
    assert message.component(message.segment("NTE"), 3) == note
