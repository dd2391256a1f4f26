"""A raw MLLP sender for listener tests: the test controls every byte and every TCP write."""

from __future__ import annotations

import socket

from exporters.mllp_client import FrameReader
from mrrp_pacs.hl7.message import parse_message

OPEN_PEERS: list[socket.socket] = []
"""Sockets of every :class:`Peer` made; a test module's fixture closes them at teardown
(:func:`close_open_peers`)."""


class Peer:
    """One connection to ``port`` on 127.0.0.1, from the loopback address ``source``."""

    def __init__(self, port, source="127.0.0.1"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5,
                                             source_address=(source, 0))
        OPEN_PEERS.append(self.sock)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = FrameReader(self.sock, 5.0, max_frame_bytes=1 << 20)

    def send(self, data):
        self.sock.sendall(data)

    def frame(self, timeout=5.0):
        """The next acknowledgement's bytes, or None when none comes within ``timeout``."""
        self.reader.timeout_s = timeout
        try:
            return self.reader.next_frame()
        except ConnectionError:
            raise AssertionError("the listener closed the connection") from None

    def ack(self, timeout=5.0):
        """The next acknowledgement, parsed."""
        data = self.frame(timeout)
        assert data is not None, f"no acknowledgement within {timeout} s"
        return parse_message(data)

    def closed_by_server(self, timeout=5.0):
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()  # closing twice (again at teardown) is harmless


def msa(ack):
    """(MSA-1, MSA-2) of a parsed acknowledgement: its code and the control id answered."""
    return ack.get("MSA-1"), ack.field(ack.segment("MSA"), 2)


def close_open_peers():
    while OPEN_PEERS:
        OPEN_PEERS.pop().close()
