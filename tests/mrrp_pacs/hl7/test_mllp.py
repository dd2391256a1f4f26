"""MLLP framing: bounded, total, indifferent to how the stream is chunked."""

from builders import mllp

from mrrp_pacs.hl7.mllp import MllpFramer


def test_framer_cuts_frames_across_any_chunking_and_counts_junk():
    stream = b"noise\r\n" + mllp(b"MSH|one\r") + mllp(b"MSH|two\r") + b"\x1c\rtail"
    framer = MllpFramer(100)
    frames = [f.data for i in range(len(stream)) for f in framer.feed(stream[i : i + 1])]
    assert frames == [b"MSH|one\r", b"MSH|two\r"]
    assert framer.junk_bytes == len(b"noise\r\n") + len(b"\x1c\rtail")
    assert [f.data for f in MllpFramer(100).feed(stream)] == frames


def test_framer_bounds_a_large_frame_and_restarts_on_a_new_start_block():
    framer = MllpFramer(8)
    (big,) = framer.feed(b"\x0b" + b"x" * 1000 + b"\x1c\r")
    assert (big.data, big.size_bytes, big.truncated) == (b"x" * 8, 1000, True)
    assert framer.feed(b"\x0bhalf") == [] and framer.partial_bytes == 4
    (whole,) = framer.feed(b"\x0bwhole\x1c")  # sender restarted; CR after FS not required
    assert whole.data == b"whole" and framer.junk_bytes == 4
    assert framer.feed(b"\r") == [] and framer.junk_bytes == 4  # the late CR is not junk
