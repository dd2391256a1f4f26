"""Acknowledgements: which one a message's mode asks for, how ours read, reading theirs."""

import pytest
from builders import Patient, us_report, with_ack_modes
from hl7apy.parser import parse_message as hl7apy_parse

from mrrp_pacs.hl7.ack import AckError, acknowledgement_code, build_ack, read_ack, read_header


@pytest.mark.parametrize(("accept", "application", "outcome", "sent"), [
    ("", "", "AA", "AA"), ("", "", "AE", "AE"), ("", "", "AR", "AR"),
    ("NE", "NE", "AA", None), ("NE", "NE", "AE", None),
    ("AL", "NE", "AA", "CA"), ("AL", "NE", "AR", "CR"), ("NE", "AL", "AE", "AE"),
    ("ER", "ER", "AA", None), ("ER", "ER", "AE", "AE"), ("ER", "NE", "AR", "CR"),
    ("SU", "SU", "AA", "AA"), ("SU", "SU", "AE", None), ("AL", "SU", "AE", "CE"),
    ("", "AL", "AA", "AA"), ("XX", "", "AA", "CA"),
])
def test_acknowledgementwith_ack_modes(accept, application, outcome, sent):
    header = read_header(with_ack_modes(us_report(Patient()), accept, application))
    assert acknowledgement_code(header, outcome) == sent


def test_ack_of_a_v23_message_uses_the_v23_err_segment():
    header = read_header(us_report(Patient(), "OLD-1").replace(b"|2.5|", b"|2.3.1|"))
    raw = build_ack(header, "AR", AckError("206", "Application record locked", "busy | retry"))
    lines = raw.decode().split("\r")
    assert lines[1] == "MSA|AR|OLD-1|busy \\F\\ retry"
    assert lines[2] == "ERR|^^^206&Application record locked&HL70357"
    parsed = hl7apy_parse(raw.decode(), find_groups=False)
    assert parsed.validate() and parsed.msh.msh_12.value == "2.3.1"


def test_read_ack_of_garbage_is_total():
    assert read_ack(b"\x00\xff", "X").code == ""
    assert "MSA" in read_ack(b"MSH|^~\\&|A|B|C|D|2026||ACK|1|P|2.5\r", "X").error
