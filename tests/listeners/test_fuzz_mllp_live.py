"""Fuzzing MLLP framing over a live listener: random bytes, frames, junk and partial frames
sent over a real socket on 127.0.0.1 to one listener shared by every input.

For each input: every connection is answered and closed within the deadlines, each answer is
an acknowledgement, the listener never fails out of its loop (its thread lives, the
connection count returns to zero) and memory stays bounded. Bounded in ``make test``;
``make soak`` (``MRRP_SOAK=1``) draws ≥ 100,000 inputs (tests/support/fuzzing.py).
"""

from __future__ import annotations

import resource
import socket
import time

import pytest
from builders import Patient, pathology_result, us_report
from fuzzing import fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

from listeners.mllp import MllpServer
from mrrp_pacs.hl7.ack import acknowledgement_code, read_header
from mrrp_pacs.hl7.message import parse_message
from mrrp_pacs.hl7.mllp import MLLP_END, MLLP_START, MllpFramer
from mrrp_pacs.intake import Intake
from mrrp_pacs.store import Store

MAX_FRAME = 8192
FRAME_TIMEOUT_S = 0.5
VALID = [pathology_result(Patient(), "FZ-1"), us_report(Patient(), "FZ-2")]

PIECE = st.one_of(
    st.binary(max_size=200),  # junk
    st.sampled_from([MLLP_START, MLLP_END, b"\x1c", b"\r", b"MSH|^~\\&|", b"\x0b\x1c\r"]),
    st.builds(lambda m, n: MLLP_START + m[:n] + MLLP_END,  # a whole frame, maybe cut short
              st.sampled_from(VALID), st.integers(0, 2000)),
    st.builds(lambda m, n: MLLP_START + m[:n], st.sampled_from(VALID),  # a frame never ended
              st.integers(0, 500)),
    st.builds(lambda n: MLLP_START + b"MSH|^~\\&|" + b"x" * n + MLLP_END,  # over the limit
              st.integers(MAX_FRAME - 100, 3 * MAX_FRAME)),
)


@pytest.fixture
def listener(config):
    def make():
        return Intake(Store(config.paths.db_file, config.paths.objects_dir), config)

    handle = MllpServer(make, port=0, idle_timeout_s=5.0, frame_timeout_s=FRAME_TIMEOUT_S,
                        max_message_bytes=MAX_FRAME, workers=2).run_in_thread(grace_s=2.0)
    yield handle
    handle.stop()


def _expected_answers(stream: bytes) -> int:
    """Frames the listener must answer: those it cuts, less those whose mode asks none."""
    count = 0
    for frame in MllpFramer(MAX_FRAME).feed(stream):
        header = read_header(frame.data)
        # the code does not matter for original mode; enhanced mode answers AE unless NE
        codes = {acknowledgement_code(header, code) for code in ("AA", "AE")}
        count += codes != {None}
    return count


@pytest.mark.fuzz
@fuzz_settings(ci_examples=120)
@given(pieces=st.lists(PIECE, max_size=8), split=st.integers(1, 64))
def test_every_connection_is_answered_or_closed_in_time(listener, pieces, split):
    # shared listener: each input reads only its own connection's answers
    stream = b"".join(pieces)
    sock = socket.create_connection(("127.0.0.1", listener.port), timeout=2)
    try:
        for start in range(0, len(stream), max(split, len(stream) // 16 or 1)):
            sock.sendall(stream[start:start + max(split, len(stream) // 16 or 1)])
        sock.shutdown(socket.SHUT_WR)  # no more: the listener answers what it has, then closes
        received = bytearray()
        started = time.monotonic()
        sock.settimeout(2)
        while chunk := sock.recv(65536):
            received += chunk
        assert time.monotonic() - started < 2.0
    finally:
        sock.close()
    acks = MllpFramer(1 << 20).feed(bytes(received))
    # every frame sent whole is answered once (its mode permitting), with an acknowledgement
    assert len(acks) == _expected_answers(stream)
    for ack in acks:
        message = parse_message(ack.data)
        assert message.get("MSA-1") in {"AA", "AE", "AR", "CA", "CE", "CR"}
    assert listener.thread.is_alive()


@pytest.mark.fuzz
def test_after_fuzzing_the_listener_is_idle_and_small(listener):
    """A burst of hostile connections at once; then none is left open and memory is bounded."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    socks = []
    for n in range(20):
        sock = socket.create_connection(("127.0.0.1", listener.port), timeout=2,
                                        source_address=(f"127.0.0.{2 + n % 5}", 0))
        sock.sendall(MLLP_START + b"MSH|^~\\&|" + b"y" * (MAX_FRAME * 8))  # never ended
        socks.append(sock)
    deadline = time.monotonic() + FRAME_TIMEOUT_S + 3
    for sock in socks:  # each cut at the frame deadline
        sock.settimeout(max(deadline - time.monotonic(), 0.1))
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        sock.close()
    while listener.server.stats().connections_open and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = listener.server.stats()
    assert stats.connections_open == 0 and stats.frame_timeouts == 20
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024  # 20 × 64 KiB frames buffer at most MAX_FRAME each
