"""DICOM intake against mutated phantom objects (issue 18): byte flips, truncations, nested
sequences inserted anywhere, bogus lengths. Every input is stored or refused with a
``DicomError``-type refusal, never another exception, and each within the 1 s deadline of
:func:`fuzzing.fuzz_settings` (a bounded run here, ≥ 100,000 inputs under ``MRRP_SOAK=1``)."""

from __future__ import annotations

import struct
import warnings

import pytest
from builders import Patient, encode, us_image, us_roi_sr, wsi_image
from fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from mrrp_pacs.errors import DicomError
from mrrp_pacs.intake import Outcome
from mrrp_pacs.intake.dicom import read_meta

_PATIENT = Patient(patient_id="FUZZ-1")
_IMAGE = us_image(_PATIENT, rows=16, columns=16)
SEEDS = [encode(_IMAGE), encode(wsi_image(_PATIENT, size=8)),
         encode(us_roi_sr(_PATIENT, _IMAGE, (1, 1, 8, 8)))]


def _nested(depth: int, defined: bool) -> bytes:
    head = struct.pack("<HH", 0x0040, 0xA730) + b"SQ\0\0"  # ContentSequence
    if not defined:
        return ((head + b"\xff\xff\xff\xff" + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF))
                * depth + (struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
                           + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)) * depth)
    body = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
        body = head + struct.pack("<I", len(item)) + item
    return body


@st.composite
def mutated_objects(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "nest", "length", "splice"]))
        # mostly after the preamble, where the parser is
        at = draw(st.integers(128, max(128, len(data) - 1)))
        if kind == "flip":
            for offset in draw(st.lists(st.integers(0, 15), min_size=1, max_size=4)):
                if at + offset < len(data):
                    data[at + offset] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "nest":
            data[at:at] = _nested(draw(st.integers(1, 3000)), draw(st.booleans()))
        elif kind == "length":
            value = draw(st.sampled_from([0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0, 1, 0xFFFF,
                                          len(data), len(data) - at]))
            data[at:at + 4] = struct.pack("<I", value & 0xFFFFFFFF)
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        if len(data) <= 132:
            break
    return bytes(data)


def test_an_unknown_vr_in_the_sop_class_uid_is_refused():
    """Found by make soak: a VR of 00 49 on (0008,0016) escaped read_meta as
    NotImplementedError while it picked the header-only path."""
    data = SEEDS[1]
    at = data.index(struct.pack("<HH", 0x0008, 0x0016) + b"UI")
    mangled = data[:at + 4] + b"\x00I" + data[at + 6:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DicomError):
            read_meta(mangled)


@pytest.mark.fuzz
@fuzz_settings(ci_examples=1500)
@given(mutated_objects())
def test_read_meta_reads_or_refuses_every_mutated_object(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about what it repairs
        try:
            meta = read_meta(data)
        except DicomError:
            return
    assert meta.sop_instance_uid and meta.study_instance_uid


@pytest.mark.fuzz
@fuzz_settings(ci_examples=300, soak_examples=100_000)
@given(mutated_objects())
def test_intake_stores_or_refuses_every_mutated_object(intake, store, data):
    """Shares one store across inputs: each input is checked by the rows it added."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = store.conn.execute("SELECT count(*) FROM instances").fetchone()[0]
        result = intake.receive_dicom(data, origin="fuzz")
    after = store.conn.execute("SELECT count(*) FROM instances").fetchone()[0]
    if result.outcome is Outcome.REJECTED:
        assert result.reason and result.reason.startswith(("DICOM object", "is "))
        assert after == before
    elif result.outcome is Outcome.NEW:
        assert after == before + 1
    else:
        assert after == before
