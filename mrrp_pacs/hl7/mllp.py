"""MLLP, the HL7 v2 transport: ``<VT> message <FS><CR>`` frames on a TCP stream.

:class:`MllpFramer` cuts a byte stream into frames with bounded memory (the listener feeds it
from asyncio, :class:`FrameReader` from a blocking socket); :func:`framed` wraps one message.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from dataclasses import dataclass

MLLP_START = b"\x0b"
MLLP_END = b"\x1c\x0d"
VT = MLLP_START[0]
FS = MLLP_END[0]
CR = MLLP_END[1]
MAX_ACK_BYTES = 1024 * 1024


def framed(message: bytes) -> bytes:
    """``message`` (segments ended by CR) inside MLLP's start and end blocks."""
    return MLLP_START + message + MLLP_END


@dataclass(frozen=True)
class Frame:
    """One MLLP frame: its content (framing removed) and its size as received.

    ``data`` holds at most the framer's limit; ``size_bytes`` counts every byte of the frame,
    so a frame that was too large has ``truncated`` set and only its first bytes in ``data``.
    """

    data: bytes
    size_bytes: int

    @property
    def truncated(self) -> bool:
        return self.size_bytes > len(self.data)


class MllpFramer:
    """Cuts a byte stream into MLLP frames with bounded memory (at most ``max_frame_bytes``).

    Bytes outside a frame are dropped and counted in ``junk_bytes``. A start block inside a
    frame abandons the unfinished frame (its bytes count as junk: the sender started over). The
    CR after the end block is expected but not required.
    """

    def __init__(self, max_frame_bytes: int) -> None:
        if max_frame_bytes < 1:
            raise ValueError(f"max_frame_bytes must be at least 1, not {max_frame_bytes}")
        self.max_frame_bytes = max_frame_bytes
        self.junk_bytes = 0
        self._buffer = bytearray()
        self._size = 0
        self._in_frame = False
        self._skip_cr = False

    @property
    def in_frame(self) -> bool:
        """Whether a frame has started (its start block seen) and not yet ended."""
        return self._in_frame

    @property
    def partial_bytes(self) -> int:
        """Bytes of a frame started but not finished (0 between frames)."""
        return self._size if self._in_frame else 0

    def feed(self, data: bytes) -> list[Frame]:
        """Take the next bytes of the stream; return the frames they complete, in order."""
        frames: list[Frame] = []
        pos = 0
        if self._skip_cr and data:
            self._skip_cr = False
            if data[0] == CR:
                pos = 1
        while pos < len(data):
            if not self._in_frame:
                start = data.find(VT, pos)
                if start < 0:
                    self.junk_bytes += len(data) - pos
                    break
                self.junk_bytes += start - pos
                self._begin()
                pos = start + 1
                continue
            end = data.find(FS, pos)
            stop = len(data) if end < 0 else end
            restart = data.find(VT, pos, stop)
            if restart >= 0:
                self.junk_bytes += self._size + restart - pos
                self._begin()
                pos = restart + 1
                continue
            room = self.max_frame_bytes - len(self._buffer)
            if room > 0:
                self._buffer += data[pos : min(stop, pos + room)]
            self._size += stop - pos
            if end < 0:
                break
            frames.append(Frame(bytes(self._buffer), self._size))
            self._in_frame = False
            self._buffer.clear()
            self._size = 0
            pos = end + 1
            if pos == len(data):
                self._skip_cr = True
            elif data[pos] == CR:
                pos += 1
        return frames

    def _begin(self) -> None:
        self._in_frame = True
        self._buffer.clear()
        self._size = 0


class FrameReader:
    """MLLP frames arriving on ``sock``, read with a deadline (``timeout_s``, adjustable)."""

    def __init__(self, sock: socket.socket, timeout_s: float,
                 max_frame_bytes: int = MAX_ACK_BYTES) -> None:
        self.sock = sock
        self.timeout_s = timeout_s
        self.framer = MllpFramer(max_frame_bytes)
        self.frames: deque[bytes] = deque()

    def next_frame(self) -> bytes | None:
        """The next frame within the timeout; None on timeout. Raises ConnectionError on EOF."""
        deadline = time.monotonic() + self.timeout_s
        while not self.frames:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise ConnectionError("the listener closed the connection")
            self.frames.extend(f.data for f in self.framer.feed(chunk))
        return self.frames.popleft()
