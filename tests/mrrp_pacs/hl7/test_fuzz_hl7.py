"""Fuzz tests of what an HL7 peer controls: MLLP framing, the parser, the reading of results,
and unescaping; plus the limits that keep a hostile message linear and small.

Run bounded in ``make test``; ``make soak`` draws ≥ 100,000 inputs per test
(tests/support/fuzzing.py). Each input must finish within 1 s (hypothesis' deadline).
"""

from __future__ import annotations

import re

import pytest
from builders import Patient, pathology_result, us_report
from fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from mrrp_pacs.clinical_schema import load_schema
from mrrp_pacs.config import Config
from mrrp_pacs.errors import Hl7Error
from mrrp_pacs.hl7.message import MAX_SEGMENTS, parse_message, unescape
from mrrp_pacs.hl7.mllp import MLLP_END, MLLP_START, MllpFramer
from mrrp_pacs.intake.records import read_result

CONFIG = Config()
SCHEMA = load_schema()
SEEDS = [pathology_result(Patient()), us_report(Patient()),
         pathology_result(Patient(patient_id="P2", name="Zoë^Müller"), control_id="PA-0002")]


def reference_unescape(value: str, separator: str, encoding: str, charset: str) -> str:
    """The character loop the project used before (the test's oracle)."""
    chars = (encoding + "^~\\&")[:4]
    esc = chars[2]
    simple = {"F": separator, "S": chars[0], "T": chars[3], "R": chars[1], "E": esc,
              ".br": "\n", "H": "", "N": ""}
    out, i = [], 0
    while i < len(value):
        if value[i] == esc:
            end = value.find(esc, i + 1)
            if end > i:
                code = value[i + 1 : end]
                if code in simple:
                    out.append(simple[code])
                    i = end + 1
                    continue
                if re.match(r"^X([0-9A-Fa-f]{2})+$", code):
                    out.append(bytes.fromhex(code[1:]).decode(charset, "replace"))
                    i = end + 1
                    continue
        out.append(value[i])
        i += 1
    return "".join(out)


ESCAPY = st.text(alphabet=st.sampled_from(list("\\#FSTREHNX.br0aA9f|^~&\n é")), max_size=60)


@pytest.mark.fuzz
@fuzz_settings(ci_examples=2000)
@given(value=ESCAPY, encoding=st.sampled_from(["^~\\&", "^~#&", "$%\\&"]))
def test_fuzz_unescape_equals_the_character_loop(value, encoding):
    assert unescape(value, "|", encoding, "utf-8") == reference_unescape(
        value, "|", encoding, "utf-8")


def test_a_narrative_result_of_many_lines_reads_as_line_by_line():
    """OBX-5 of a TX result is unescaped once as a whole: the same text as line by line."""
    lines = ["first \\T\\ line", "a \\R\\ b", "\\X41\\\\.br\\c", "un\\terminated", ""]
    raw = pathology_result(Patient()).replace(b"OBX|1|", b"OBX|9|TX|REPORT^Report^L||"
                                              + "~".join(lines).encode() + b"|||||F\rOBX|1|",
                                              1)
    message = parse_message(raw)
    content = read_result(message, CONFIG.ingest, CONFIG.identity, SCHEMA)
    text = next(o.value for order in content.orders for o in order.observations
                if o.code == "REPORT")
    assert text == "\n".join(message.unescape(line) for line in lines)
    assert text.splitlines()[0] == "first & line" and "a ~ b" in text


def test_orders_are_numbered_in_linear_time_and_the_segment_cap_refuses_early():
    patient = Patient()
    head = pathology_result(patient).split(b"\rOBR", 1)[0]
    many = head + b"\r" + b"OBR|\r" * (MAX_SEGMENTS - 10)
    content = read_result(parse_message(many), CONFIG.ingest, CONFIG.identity, SCHEMA)
    assert [o.index for o in content.orders] == list(range(1, MAX_SEGMENTS - 9))
    # a 4 MiB frame of empty segments: refused by counting line ends, before splitting
    with pytest.raises(Hl7Error, match=r"838\d{3} lines, more than the 5000 segments"):
        parse_message(head + b"\r" + b"OBR|\r" * (4 * 1024 * 1024 // 5 - 100))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "dup", "delims"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(max_size=16) | st.sampled_from(
                [b"\r", b"|", b"^", b"~", b"\\", b"&", b"\\X", b"\\.br\\", b"OBR|", b"OBX|1|TX|",
                 b"\x0b", b"\x1c", b"\xff\xfe", b"MSH|^~\\&|"]))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 32))]
        elif kind == "dup":
            piece = bytes(data[at : at + draw(st.integers(1, 200))])
            data[at:at] = piece * draw(st.integers(1, 50))
        else:
            data[3:8] = draw(st.binary(min_size=5, max_size=5))
    return bytes(data)


@pytest.mark.fuzz
@fuzz_settings(ci_examples=1000)
@given(raw=mutated())
def test_fuzz_a_mutated_message_is_read_or_refused_never_crashes(raw):
    try:
        message = parse_message(raw)
        content = read_result(message, CONFIG.ingest, CONFIG.identity, SCHEMA)
    except Hl7Error as refusal:
        assert str(refusal)
        return
    assert content.control_id == message.component(message.segments[0], 10)
    assert all(order.index >= 0 for order in content.orders)


@pytest.mark.fuzz
@fuzz_settings(ci_examples=500)
@given(stream=st.lists(st.one_of(
    st.binary(max_size=40).map(lambda b: MLLP_START + b + MLLP_END),
    st.binary(max_size=40), st.sampled_from([MLLP_START, MLLP_END, b"\r", MLLP_END + b"\r"])),
    max_size=12).map(b"".join),
    cuts=st.lists(st.integers(0, 600), max_size=10), limit=st.integers(1, 64))
def test_fuzz_mllp_framing_is_the_same_however_the_stream_is_cut(stream, cuts, limit):
    whole = MllpFramer(limit)
    expected = whole.feed(stream)
    chunked, got, start = MllpFramer(limit), [], 0
    for cut in [*sorted({c for c in cuts if c < len(stream)}), len(stream)]:
        got += chunked.feed(stream[start:cut])
        start = cut
        assert len(chunked._buffer) <= limit  # memory bounded by the limit at every step
    assert got == expected
    assert chunked.partial_bytes == whole.partial_bytes
    for frame in got:
        assert len(frame.data) <= limit and frame.size_bytes >= len(frame.data)
        assert MLLP_START not in frame.data and MLLP_END not in frame.data
