"""A pynetdicom storage SCP for sender tests: records what arrives, answers chosen statuses."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from orthanc import LOOPBACK, free_port
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"


@dataclass
class Peer:
    """What the SCP saw, and the statuses it answers with in turn (then 0x0000)."""

    port: int
    statuses: list[int]
    received: list[str] = field(default_factory=list)  # SOP Instance UIDs
    associations: int = 0
    datasets: list[Dataset] = field(default_factory=list)  # as decoded by the SCP
    syntaxes: list[str] = field(default_factory=list)  # transfer syntax each arrived in
    server: Any = None  # pynetdicom's AssociationServer

    def wait_idle(self, timeout_s: float = 10) -> None:
        """Until the SCP holds no association: a released one is still counted (and a new
        one rejected under ``max_associations``) until its thread has ended."""
        deadline = time.monotonic() + timeout_s
        while self.server.active_associations:
            assert time.monotonic() < deadline, "the peer still holds an association"
            time.sleep(0.01)


@contextmanager
def storage_scp(statuses: list[int] | None = None,
                transfer_syntaxes: Sequence[str] = ALL_TRANSFER_SYNTAXES,
                max_associations: int = 10) -> Iterator[Peer]:
    """Listen on a free loopback port for SR, Encapsulated PDF and US images, accepting
    ``transfer_syntaxes`` and at most ``max_associations`` at once (more are rejected
    transient, "local limit exceeded")."""
    peer = Peer(free_port(), list(statuses or []))

    def on_store(event: evt.Event) -> int:
        peer.received.append(str(event.dataset.SOPInstanceUID))
        peer.datasets.append(event.dataset)
        peer.syntaxes.append(str(event.context.transfer_syntax))
        return peer.statuses.pop(0) if peer.statuses else 0x0000

    def on_established(event: evt.Event) -> None:
        peer.associations += 1

    ae = AE(ae_title="TESTSCP")
    ae.maximum_associations = max_associations
    for sop_class in (ENCAPSULATED_PDF, COMPREHENSIVE_SR, US_IMAGE):
        ae.add_supported_context(sop_class, list(transfer_syntaxes))
    server = ae.start_server((LOOPBACK, peer.port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, on_store), (evt.EVT_ESTABLISHED, on_established)])
    assert server is not None
    peer.server = server
    try:
        yield peer
    finally:
        server.shutdown()
