"""DICOM storage SCP: receive objects over the network and persist them through ``Intake``.

Modelled on pynetdicom's ``storescp`` app, with the differences this daemon needs:

* the object is persisted (bytes in the object store, rows committed) *before* the C-STORE
  response is sent, and only ``NEW`` or ``DUPLICATE`` is answered with success;
* the bytes stored are the data set exactly as received (preamble, file meta made from the
  request, then the raw encoded data set): nothing is decoded and re-encoded;
* only the SOP classes the pipeline reads are offered, and compressed transfer syntaxes are
  accepted as they are so that JPEG tiles of a slide are never transcoded;
* calling AE titles outside the allow-list and a called AE title other than ours are refused
  at association (A-ASSOCIATE-RJ, reasons "calling/called AE title not recognised"), and so is
  a calling AE title pinned to source addresses (``ae_addresses``) calling from another one;
* it may listen on a plain port, a TLS port (``ssl_context``: mutual TLS when the context
  requires client certificates), or both. The TLS handshake is made in the connection's own
  thread, within the deadline of the association request, not in the thread accepting
  connections (pynetdicom's own server would let one silent peer stall every other).

Each C-STORE opens its own :class:`~mrrp_pacs.intake.Intake` through an *opener* (a
callable returning a context manager), because pynetdicom serves every association in its
own thread and a :class:`~mrrp_pacs.store.Store` is meant for one thread.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import sqlite3
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
)
from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from mrrp_pacs.clinical_schema import ClinicalSchema, load_schema
from mrrp_pacs.clock import Clock, system_clock
from mrrp_pacs.config import Config
from mrrp_pacs.intake import Intake, Outcome
from mrrp_pacs.intake.dicom import (
    COLOR_PRESENTATION_STATE,
    COMPREHENSIVE_3D_SR,
    COMPREHENSIVE_SR,
    ENHANCED_SR,
    GRAYSCALE_PRESENTATION_STATE,
    MICROSCOPY_BULK_ANNOTATIONS,
    SEGMENTATION,
    ULTRASOUND_IMAGE,
    ULTRASOUND_MULTIFRAME,
    VL_WHOLE_SLIDE_MICROSCOPY,
)
from mrrp_pacs.store import Store
from mrrp_pacs.store.groupcommit import GroupCommitter
from mrrp_pacs.tls import Network, address_allowed

LOGGER = logging.getLogger(__name__)

IntakeOpener = Callable[[], AbstractContextManager[Intake]]

# Images may arrive compressed; SR and annotation objects have no pixel data to compress.
IMAGE_SOP_CLASSES = (VL_WHOLE_SLIDE_MICROSCOPY, ULTRASOUND_IMAGE, ULTRASOUND_MULTIFRAME)
DOCUMENT_SOP_CLASSES = (COMPREHENSIVE_SR, COMPREHENSIVE_3D_SR, ENHANCED_SR,
                        MICROSCOPY_BULK_ANNOTATIONS,
                        # lesion outlines drawn on an ultrasound image (features/us_roi.py)
                        GRAYSCALE_PRESENTATION_STATE, COLOR_PRESENTATION_STATE, SEGMENTATION)
STORAGE_SOP_CLASSES = IMAGE_SOP_CLASSES + DOCUMENT_SOP_CLASSES

UNCOMPRESSED_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# Lossless before lossy: when a sender offers several syntaxes in one presentation context we
# pick the first of ours that it offers, and choosing a lossy one could make the sender
# compress an uncompressed image. Senders keep compressed data unchanged by offering its own
# syntax in a context of its own (dcmtk storescu, Orthanc), which is then accepted as is.
COMPRESSED_TRANSFER_SYNTAXES = (JPEGLSLossless, JPEG2000Lossless, JPEGBaseline8Bit, JPEG2000,
                                JPEGLSNearLossless)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3: storage failure, the sender may retry later
STATUS_CANNOT_UNDERSTAND = 0xC000  # PS3.4 B.2.3: the object itself is unusable
ERROR_COMMENT_CHARS = 64  # (0000,0902) Error Comment is LO

DEFAULT_MAX_PDU = 1 << 20  # bytes; the largest P-DATA PDU we accept
DEFAULT_NETWORK_TIMEOUT_S = 60.0  # idle association is aborted after this
DEFAULT_ACSE_TIMEOUT_S = 30.0
DEFAULT_DIMSE_TIMEOUT_S = 30.0
DEFAULT_MAX_ASSOCIATIONS = 10
DEFAULT_STOP_GRACE_S = 10.0
# Limits against peers that never associate (docs/operator-guide.md "[dicom]"): a connection
# must have sent its whole A-ASSOCIATE-RQ this soon after connecting, and may hold at most
# this many such connections per address; until then it does not count against
# max_associations, so port scans and half-open connections cannot lock real senders out.
DEFAULT_ASSOCIATION_REQUEST_TIMEOUT_S = 5.0
DEFAULT_MAX_UNASSOCIATED_PER_ADDRESS = 8
# Each PDU must arrive whole within this many seconds of its first byte (a peer trickling a
# byte a minute is cut off; the network timeout only bounds the gap between reads).
DEFAULT_PDU_TIMEOUT_S = 60.0
# Declared PDU lengths are checked before any body is read: an A-ASSOCIATE-RQ larger than this
# (a real one is a few KiB: ~100 presentation contexts) or any other PDU before association,
# and, once associated, a PDU larger than our maximum PDU, close the connection unread.
MAX_ASSOCIATE_RQ_BYTES = 64 * 1024
PDU_HEADER_BYTES = 6
_ASSOCIATE_RQ = 0x01
_RECV_CHUNK = 64 * 1024
# pynetdicom 3.0 serves each association with two threads that poll: the DUL thread sleeps
# 1 ms between looks at an idle socket, the association's reactor 1 ms between looks at its
# queue of received DIMSE messages. Each wake-up takes the GIL; 20 idle associations cost the
# SCP process about half a core (docs/daemon.md "Load"). The DUL thread sleeps this long
# instead (a busy association does not sleep: it reads again at once after each PDU)...
DUL_IDLE_POLL_S = 0.005
# ... and the reactor, after its own 1 ms sleep, waits up to this long on the message queue
# rather than looking once: a message that arrives is served at once, an idle association
# wakes 1 / (1 ms + this) times a second, and a release or abort is noticed this much later.
REACTOR_WAIT_S = 0.02


_SPOOLS: weakref.WeakKeyDictionary[Association, Path] = weakref.WeakKeyDictionary()


def spool_into(assoc: Association, folder: Path) -> None:
    """Have the data sets ``assoc`` receives written into ``folder`` (:func:`receive_to_disk`)."""
    _SPOOLS[assoc] = folder


def _spooled_temporary_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's ``NamedTemporaryFile``, in the spool folder of the receiving association.

    Called by the association's DUL thread (``DULServiceProvider``, whose ``assoc`` it is) as
    a C-STORE request's first data set fragment arrives; without a spool folder, the system's
    temporary folder.
    """
    assoc = getattr(threading.current_thread(), "assoc", None)
    folder = _SPOOLS.get(assoc) if isinstance(assoc, Association) else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("dir", folder)
        kwargs.setdefault("prefix", "dicom-rx-")
    return NamedTemporaryFile(*args, **kwargs)


def receive_to_disk() -> None:
    """Make pynetdicom write every received C-STORE data set to a file as it arrives.

    Without it, an object is held whole in memory (its P-DATA fragments, then their join, then
    the Part 10 bytes: about 3x its size) until stored. The switch is global to pynetdicom, so
    the puller's C-GET sub-operations are received to disk too; :func:`persist_c_store` takes
    either form. The storage SCP puts the files in the object store's staging folder (same
    disk as the objects, not a ``/tmp`` in memory) through :func:`spool_into`.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _spooled_temporary_file  # type: ignore[attr-defined]


receive_to_disk()


def transfer_syntaxes_for(sop_class_uid: str) -> tuple[str, ...]:
    """Transfer syntaxes accepted for one storage SOP class, in order of preference."""
    if sop_class_uid in IMAGE_SOP_CLASSES:
        return UNCOMPRESSED_TRANSFER_SYNTAXES + COMPRESSED_TRANSFER_SYNTAXES
    return UNCOMPRESSED_TRANSFER_SYNTAXES


def intake_opener(config: Config, schema: ClinicalSchema | None = None,
                  clock: Clock = system_clock,
                  committer: GroupCommitter | None = None) -> IntakeOpener:
    """An opener lending each call a :class:`Store` connection of its own, kept for reuse.

    Opening a connection costs about 1.4 ms (more than the rows of a small object), so a
    connection returned after use is lent to the next call rather than closed; at most as
    many stay open as calls ever ran at once (one per concurrent association). With a
    ``committer`` the rows are written through it (group commit), the connection serving the
    reads before the write. The clinical schema is loaded once here rather than at every
    object. The database must already be migrated (the daemon opens its own :class:`Store`
    first), so calls skip the migration check.
    """
    loaded = schema if schema is not None else load_schema(config.clinical.schema_file)
    idle: list[Store] = []
    lock = threading.Lock()

    @contextmanager
    def open_intake() -> Iterator[Intake]:
        with lock:
            store = idle.pop() if idle else None
        if store is None:
            store = Store(config.paths.db_file, config.paths.objects_dir, migrate=False,
                          clock=clock)
        try:
            yield Intake(store, config, loaded, committer)
        except BaseException:
            store.close()  # a connection in an unknown state is not lent again
            raise
        with lock:
            idle.append(store)

    return open_intake


@dataclass(frozen=True)
class StoreAnswer:
    """What a received C-STORE came to: the response status and the intake outcome."""

    status: int
    outcome: str  # new | duplicate | rejected | failed
    comment: str | None = None

    def as_dataset(self) -> Dataset:
        answer = Dataset()
        answer.Status = self.status
        if self.comment:
            text = self.comment.encode("ascii", "replace").decode("ascii")
            answer.ErrorComment = text[:ERROR_COMMENT_CHARS]
        return answer


def persist_c_store(event: Event, open_intake: IntakeOpener, origin: str) -> StoreAnswer:
    """Persist the data set of a C-STORE request, then say what to answer.

    Used by the storage SCP and by the PACS puller's C-GET, whose C-STORE sub-operations
    arrive on its own association. Any exception (disk full, database locked, a bug) is a
    retryable ``0xA700``: nothing was recorded, so success must not be claimed.
    """
    request = event.request
    received = getattr(request, "_dataset_path", None)
    try:
        source: Path | bytes
        if isinstance(received, Path):  # receive_to_disk(): the data set is in this file
            spooled = getattr(request, "_dataset_file", None)
            if spooled is not None:
                spooled.close()
            source = received
        else:
            source = event.encoded_dataset(include_meta=True)
        with open_intake() as intake:
            result = intake.receive_dicom(source, origin=origin)
    except (OSError, sqlite3.Error, MemoryError) as exc:
        LOGGER.error("could not persist an object from %s (%s: %s); answered 0x%04X",
                     origin, type(exc).__name__, exc, STATUS_OUT_OF_RESOURCES)
        return StoreAnswer(STATUS_OUT_OF_RESOURCES, "failed",
                           "receiver cannot store now; retry later")
    except Exception:
        LOGGER.exception("unexpected error persisting an object from %s; answered 0x%04X",
                         origin, STATUS_OUT_OF_RESOURCES)
        return StoreAnswer(STATUS_OUT_OF_RESOURCES, "failed",
                           "receiver cannot store now; retry later")
    finally:
        if isinstance(received, Path):
            # pynetdicom removes it after a storage SCP's handler, not after a C-GET's
            received.unlink(missing_ok=True)
    if result.outcome is Outcome.REJECTED:
        # the reason may quote content: it goes back to the sender, not into our log
        LOGGER.warning("rejected an object from %s; answered 0x%04X", origin,
                       STATUS_CANNOT_UNDERSTAND)
        return StoreAnswer(STATUS_CANNOT_UNDERSTAND, "rejected", result.reason or "rejected")
    return StoreAnswer(STATUS_SUCCESS, str(result.outcome))


def _waiting_get_msg(dimse: DIMSEServiceProvider, wait_s: float) -> Callable[..., Any]:
    """``dimse.get_msg`` whose non-blocking call (the acceptor reactor's poll, pynetdicom 3.0
    ``Association._run_reactor``) waits up to ``wait_s`` for a message instead."""
    original = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if block:
            return original(block=True)
        try:
            return dimse.msg_queue.get(block=True, timeout=wait_s)
        except queue.Empty:
            return None, None

    return get_msg


class _GuardedSocket:
    """Reads of one association's socket with the limits that bind a peer before it is trusted.

    pynetdicom 3.0's DUL reads a PDU as ``recv(6)`` (type, reserved byte, length) then
    ``recv(length)`` (``DULServiceProvider._read_pdu_data``), after ``select`` found data
    waiting. Standing in for ``AssociationSocket.recv``, this checks the declared length before
    the body is read, and gives each PDU a deadline. A refused PDU makes ``recv(6)`` return
    nothing: the DUL then treats the connection as closed (without reading or allocating).
    """

    def __init__(self, scp: StorageScp, assoc: Association, opened: float) -> None:
        self.scp = scp
        self.assoc = assoc
        self.request_deadline = opened + scp.association_request_timeout_s
        self.body_deadline = 0.0
        self.in_body = False
        self.refused = False
        # the A-ASSOCIATE-RQ has been read: what follows is judged as in an association.
        # pynetdicom sets ``is_established`` only after sending the A-ASSOCIATE-AC and running
        # the EVT_ACCEPTED handlers; a sender's first P-DATA can arrive before that (under
        # load it did: bench_load_ceiling.py lost whole senders), and the DUL state machine,
        # not this guard, answers a PDU the association's state does not allow
        self.request_read = False

    @property
    def raw(self) -> socket.socket:
        return self.assoc.dul.socket.socket  # type: ignore[union-attr, return-value]

    def refuse(self, why: str) -> bytearray:
        """Log ``why`` (no patient data: the peer's address and numbers), close, read nothing."""
        if not self.refused:
            self.refused = True
            LOGGER.warning("DICOM connection from %s closed: %s", self.scp.peer(self.assoc), why)
            with contextlib.suppress(OSError):  # already gone
                self.raw.shutdown(socket.SHUT_RDWR)
        return bytearray()

    def recv(self, nr_bytes: int) -> bytearray:
        if self.refused:
            return bytearray()
        clock = self.scp.monotonic
        if self.in_body:
            self.in_body = False
            return self._read(nr_bytes, self.body_deadline, "a PDU")
        associated = self.request_read or self.assoc.is_established
        deadline = clock() + self.scp.pdu_timeout_s
        if not associated and not self.assoc.requestor.primitive:
            deadline = min(deadline, self.request_deadline)
        header = self._read(nr_bytes, deadline, "a PDU header")
        if nr_bytes != PDU_HEADER_BYTES or len(header) < PDU_HEADER_BYTES or self.refused:
            return header
        pdu_type, _, length = struct.unpack(">BBL", header)
        if not associated:
            if pdu_type != _ASSOCIATE_RQ and not self.assoc.requestor.primitive:
                return self.refuse(f"PDU type 0x{pdu_type:02X} of {length} bytes before an "
                                   "A-ASSOCIATE-RQ")
            if length > MAX_ASSOCIATE_RQ_BYTES:
                return self.refuse(f"PDU type 0x{pdu_type:02X} declares {length} bytes before "
                                   f"association (at most {MAX_ASSOCIATE_RQ_BYTES})")
            self.request_read = pdu_type == _ASSOCIATE_RQ
        elif self.scp.max_pdu and length > self.scp.max_pdu + PDU_HEADER_BYTES:
            return self.refuse(f"PDU type 0x{pdu_type:02X} declares {length} bytes, more than "
                               f"our maximum PDU ({self.scp.max_pdu})")
        self.in_body, self.body_deadline = True, deadline
        return header

    def _read(self, nr_bytes: int, deadline: float, what: str) -> bytearray:
        """``AssociationSocket.recv`` with a deadline for the whole read."""
        raw = self.raw
        data = bytearray()
        network_timeout = self.assoc.network_timeout
        try:
            while len(data) < nr_bytes:
                left = deadline - self.scp.monotonic()
                if left <= 0:
                    return self.refuse(f"{what} did not arrive whole in time ({len(data)} of "
                                       f"{nr_bytes} bytes)")
                raw.settimeout(left if network_timeout is None else min(left, network_timeout))
                try:
                    chunk = raw.recv(min(_RECV_CHUNK, nr_bytes - len(data)))
                except TimeoutError:
                    if self.scp.monotonic() < deadline:
                        raise  # the network timeout, as pynetdicom would have raised it
                    continue
                if not chunk:
                    return data
                data += chunk
        finally:
            if not self.refused:
                raw.settimeout(network_timeout)
        return data


class _DeferredTlsServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, but a TLS connection is only wrapped when accepted; its
    handshake is made by :meth:`StorageScp._on_connection` in the connection's own thread."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address


def tls_handshake(sock: ssl.SSLSocket, deadline: float,
                  monotonic: Callable[[], float] = time.monotonic) -> str | None:
    """Make the server side of ``sock``'s handshake by ``deadline``; None, or why it failed.

    Non-blocking steps with a wait for each, so that the deadline bounds the whole handshake
    (a blocking ``do_handshake`` restarts its timeout at every byte a slow peer sends).
    """
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            left = deadline - monotonic()
            if left <= 0:
                return "TLS handshake not complete in time"
            try:
                sock.do_handshake()
                return None
            except ssl.SSLWantReadError:
                select.select([sock], [], [], left)
            except ssl.SSLWantWriteError:
                select.select([], [sock], [], left)
    except ssl.SSLError as exc:
        return f"TLS handshake failed ({exc.reason or type(exc).__name__})"
    except OSError as exc:
        return f"TLS handshake failed ({type(exc).__name__})"
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(timeout)


def printable_ae(title: str) -> str:
    """An AE title as received, safe to log and to store in a ``source`` column."""
    return "".join(c for c in title if " " <= c <= "~").strip() or "?"


class StorageScp:
    """A storage SCP for the SOP classes the pipeline reads, persisting through ``Intake``.

    Parameters
    ----------
    open_intake
        Returns a context manager giving an :class:`Intake`; called once per received object,
        from pynetdicom's association threads (see :func:`intake_opener`).
    ae_title
        Our AE title; associations calling another title are refused.
    port
        TCP port to listen on; 0 picks a free one (read :attr:`port` after :meth:`start`);
        ``None``: no plain listener (``tls_port`` then).
    host
        Address to bind. The default, 127.0.0.1, accepts only local peers; a PACS on another
        machine needs the address of the interface it reaches, or the wildcard address.
    allowed_aes
        Calling AE titles accepted; ``None`` accepts any (not for production).
    max_pdu
        Largest PDU we receive, in bytes (0 = unlimited, not advised).
    max_associations
        Concurrent associations; more are refused (A-ASSOCIATE-RJ, local limit exceeded).
    network_timeout_s, acse_timeout_s, dimse_timeout_s
        Seconds an association may be idle, wait in negotiation, wait for a DIMSE message.
    association_request_timeout_s
        Seconds a new connection has to send its whole A-ASSOCIATE-RQ; until it has, it does
        not count against ``max_associations``.
    max_unassociated_per_address
        Connections from one address that have not yet associated; more are closed at once.
    pdu_timeout_s
        Seconds a PDU has, from its first byte, to arrive whole.
    spool_dir
        Folder the received data sets are written to while they arrive (on the data disk:
        the object store's staging folder); ``None``: the system's temporary folder.
    tls_port, ssl_context
        A TLS listener on ``tls_port`` (0 picks a free one, read :attr:`tls_port`) with this
        server context (:func:`mrrp_pacs.tls.server_context`).
    ae_addresses
        Calling AE title -> networks it may associate from; from elsewhere it is rejected
        (calling AE title not recognised). Titles not listed are not pinned.
    monotonic
        The clock of those deadlines (seconds).
    """

    def __init__(self, open_intake: IntakeOpener, ae_title: str, port: int | None, *,
                 host: str = "127.0.0.1", allowed_aes: set[str] | None = None,
                 max_pdu: int = DEFAULT_MAX_PDU,
                 max_associations: int = DEFAULT_MAX_ASSOCIATIONS,
                 network_timeout_s: float = DEFAULT_NETWORK_TIMEOUT_S,
                 acse_timeout_s: float = DEFAULT_ACSE_TIMEOUT_S,
                 dimse_timeout_s: float = DEFAULT_DIMSE_TIMEOUT_S,
                 association_request_timeout_s: float = DEFAULT_ASSOCIATION_REQUEST_TIMEOUT_S,
                 max_unassociated_per_address: int = DEFAULT_MAX_UNASSOCIATED_PER_ADDRESS,
                 pdu_timeout_s: float = DEFAULT_PDU_TIMEOUT_S,
                 spool_dir: Path | None = None,
                 tls_port: int | None = None, ssl_context: ssl.SSLContext | None = None,
                 ae_addresses: Mapping[str, Iterable[Network]] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if allowed_aes is not None and not allowed_aes:
            raise ValueError("allowed_aes is empty, so no sender could connect; list the "
                             "calling AE titles to accept, or pass None to accept any")
        if port is None and tls_port is None:
            raise ValueError("no listener: give a port, a tls_port, or both")
        if (tls_port is None) != (ssl_context is None):
            raise ValueError("tls_port and ssl_context go together")
        for number in (port, tls_port):
            if number is not None and not 0 <= number <= 65535:
                raise ValueError(f"port must be between 0 and 65535, got {number}")
        self.open_intake = open_intake
        self.host = host
        self.port = port
        self.tls_port = tls_port
        self.ssl_context = ssl_context
        self.ae_addresses = {title.strip(): tuple(networks)
                             for title, networks in (ae_addresses or {}).items()}
        self.allowed_aes = None if allowed_aes is None else frozenset(allowed_aes)
        self.ae = AE(ae_title=ae_title)  # raises ValueError naming a bad title
        if max_associations < 1 or max_unassociated_per_address < 1:
            raise ValueError("max_associations and max_unassociated_per_address must be at "
                             "least 1")
        self.ae.maximum_pdu_size = max_pdu
        self.max_pdu = max_pdu
        # pynetdicom counts every connection, associated or not, against its own limit; ours
        # (in _on_requested) counts associations only, and unassociated connections have theirs
        self.max_associations = max_associations
        self.ae.maximum_associations = 1 << 30
        self.max_unassociated_per_address = max_unassociated_per_address
        self.association_request_timeout_s = association_request_timeout_s
        self.pdu_timeout_s = pdu_timeout_s
        self.acse_timeout_s = acse_timeout_s
        self.monotonic = monotonic
        self.spool_dir = spool_dir
        self.ae.network_timeout = network_timeout_s
        self.ae.acse_timeout = acse_timeout_s
        self.ae.dimse_timeout = dimse_timeout_s
        self.ae.require_called_aet = True
        if self.allowed_aes is not None:
            self.ae.require_calling_aet = sorted(self.allowed_aes)
        for sop_class in STORAGE_SOP_CLASSES:
            self.ae.add_supported_context(sop_class, list(transfer_syntaxes_for(sop_class)))
        self.ae.add_supported_context(Verification)  # so an operator can check with echoscu
        self._servers: list[tuple[ThreadedAssociationServer, threading.Thread]] = []
        self._lock = threading.Lock()
        self._counts: weakref.WeakKeyDictionary[Association, dict[str, int]] = (
            weakref.WeakKeyDictionary())
        # connections not yet associated (address each) and associations admitted
        self._unassociated: weakref.WeakKeyDictionary[Association, str] = (
            weakref.WeakKeyDictionary())
        self._admitted: weakref.WeakSet[Association] = weakref.WeakSet()

    @property
    def ae_title(self) -> str:
        return str(self.ae.ae_title)

    @property
    def running(self) -> bool:
        """Started, and the thread accepting associations is alive (``/healthz``)."""
        return bool(self._servers) and all(thread.is_alive() for _, thread in self._servers)

    def start(self) -> None:
        """Listen in background threads; returns once the port is bound."""
        if self._servers:
            raise RuntimeError("the storage SCP is already running")
        handlers: list[EventHandlerType] = [
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended),
            (evt.EVT_ABORTED, self._on_ended),
        ]
        listening = []
        try:
            if self.port is not None:
                self.port = self._serve(self.port, None, handlers)
                listening.append(f"{self.host}:{self.port}")
            if self.tls_port is not None:
                self.tls_port = self._serve(self.tls_port, self.ssl_context, handlers)
                verify = self.ssl_context.verify_mode if self.ssl_context else ssl.CERT_NONE
                listening.append(f"{self.host}:{self.tls_port} (TLS, client certificate "
                                 + {ssl.CERT_REQUIRED: "required", ssl.CERT_OPTIONAL:
                                    "verified when sent"}.get(verify, "not asked") + ")")
        except BaseException:
            self.stop(grace_s=0)
            raise
        LOGGER.info("DICOM storage SCP %s listening on %s (%s%s)", self.ae_title,
                    " and ".join(listening), "any calling AE" if self.allowed_aes is None else
                    "calling AEs allowed: " + ", ".join(sorted(self.allowed_aes)),
                    "; pinned to addresses: " + ", ".join(sorted(self.ae_addresses))
                    if self.ae_addresses else "")

    def _serve(self, port: int, context: ssl.SSLContext | None,
               handlers: list[EventHandlerType]) -> int:
        """One listener; returns its bound port."""
        # AE.start_server(block=False) without hiding the acceptor thread, so that `running`
        # can tell a thread that died from one that serves (pynetdicom 3.0's own steps)
        server = self.ae.make_server((self.host, port), evt_handlers=handlers,
                                     ssl_context=context, server_class=_DeferredTlsServer)
        thread = threading.Thread(target=make_target(server.serve_forever),
                                  name=f"dicom-scp-{self.ae_title}-{port}", daemon=True)
        thread.start()
        self.ae._servers.append(server)  # what AE.shutdown() and server.shutdown() expect
        self._servers.append((server, thread))
        return int(server.server_address[1])

    def stop(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
        """Stop listening, let running associations finish for ``grace_s`` seconds, abort the rest.

        An aborted transfer loses nothing: an object is acknowledged only once persisted, and
        the sender sends it again.
        """
        if not self._servers:
            return
        servers, self._servers = self._servers, []
        for server, _ in servers:
            server.shutdown()
        for _, thread in servers:
            thread.join(timeout=10)
        deadline = time.monotonic() + grace_s
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = len(self.ae.active_associations)
        if remaining:
            LOGGER.warning("aborting %d DICOM associations still open after %.0f s",
                           remaining, grace_s)
        self.ae.shutdown()
        LOGGER.info("DICOM storage SCP %s stopped", self.ae_title)

    def __enter__(self) -> StorageScp:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- event handlers (run in pynetdicom's association threads) ----------------------------

    def _on_c_store(self, event: Event) -> Dataset:
        calling = printable_ae(event.assoc.requestor.ae_title)
        # the source of an object: a replacement from another one is refused (intake)
        origin = f"dicom:{calling}@{self.peer(event.assoc)}"
        answer = persist_c_store(event, self.open_intake, origin=origin)
        with self._lock:
            counts = self._counts.setdefault(event.assoc, {})
            counts[answer.outcome] = counts.get(answer.outcome, 0) + 1
        return answer.as_dataset()

    @staticmethod
    def peer(assoc: Association) -> str:
        """The peer's IP address (a network address, not patient data)."""
        try:
            return str(assoc.dul.socket.socket.getpeername()[0])  # type: ignore[union-attr]
        except (OSError, AttributeError):
            return str(getattr(assoc.requestor, "address", "?"))

    def _on_connection(self, event: Event) -> None:
        # before the association's threads start (pynetdicom 3.0 RequestHandler.handle)
        assoc = event.assoc
        assoc.dul._run_loop_delay = DUL_IDLE_POLL_S
        assoc.dimse.get_msg = _waiting_get_msg(assoc.dimse, REACTOR_WAIT_S)  # type: ignore[method-assign]
        # the reactor waits this long for the A-ASSOCIATE-RQ, then closes the connection
        assoc.acse_timeout = self.association_request_timeout_s
        if self.spool_dir is not None:
            spool_into(assoc, self.spool_dir)
        guard = _GuardedSocket(self, assoc, self.monotonic())
        assoc.dul.socket.recv = guard.recv  # type: ignore[union-attr, method-assign]
        address = self.peer(assoc)
        with self._lock:
            waiting = sum(1 for other, where in self._unassociated.items()
                          if where == address and (other.ident is None or other.is_alive()))
            self._unassociated[assoc] = address
        if waiting >= self.max_unassociated_per_address:
            guard.refuse(f"{waiting} connections from this address have not associated yet "
                         f"(at most {self.max_unassociated_per_address})")
            return
        raw = assoc.dul.socket.socket  # type: ignore[union-attr]
        if isinstance(raw, ssl.SSLSocket):
            failed = tls_handshake(raw, guard.request_deadline, self.monotonic)
            if failed is not None:
                guard.refuse(failed)

    def _on_requested(self, event: Event) -> None:
        """A whole A-ASSOCIATE-RQ arrived: count the connection as an association, or refuse."""
        assoc = event.assoc
        assoc.acse_timeout = self.acse_timeout_s
        # requestor.ae_title is set only by the negotiation, after this event
        calling = str(getattr(assoc.requestor.primitive, "calling_ae_title", "")).strip()
        pinned = self.ae_addresses.get(calling)
        address = self.peer(assoc)
        if pinned is not None and not address_allowed(address, pinned):
            with self._lock:
                self._unassociated.pop(assoc, None)
            LOGGER.warning("association rejected (calling AE title not recognised: pinned to "
                           "other addresses): %s -> %s from %s", printable_ae(calling),
                           self.ae_title, address)
            assoc.acse.send_reject(0x01, 0x01, 0x03)  # permanent, service user, calling AE
            assoc.kill()
            return
        with self._lock:
            self._unassociated.pop(assoc, None)
            serving = sum(1 for other in self._admitted
                          if other.is_alive() and not (other.is_released or other.is_aborted
                                                       or other.is_rejected))
            if serving < self.max_associations:
                self._admitted.add(assoc)
                return
        LOGGER.warning("association rejected (too many associations: %d of %d): %s -> %s "
                       "from %s", serving, self.max_associations,
                       printable_ae(calling), self.ae_title, address)
        assoc.acse.send_reject(0x02, 0x03, 0x02)  # transient, local limit exceeded
        assoc.kill()  # as pynetdicom's own rejection does: the DUL sends the A-ASSOCIATE-RJ

    def _on_accepted(self, event: Event) -> None:
        assoc = event.assoc
        LOGGER.info("association accepted: %s -> %s from %s, %d presentation contexts accepted,"
                    " %d refused", printable_ae(assoc.requestor.ae_title), self.ae_title,
                    assoc.requestor.address, len(assoc.accepted_contexts),
                    len(assoc.rejected_contexts))

    def _on_rejected(self, event: Event) -> None:
        requestor = event.assoc.requestor
        calling = requestor.ae_title
        called = getattr(requestor.primitive, "called_ae_title", "")
        if self.allowed_aes is not None and calling.strip() not in self.allowed_aes:
            reason = "calling AE title not recognised"
        elif str(called).strip() != self.ae_title:
            reason = "called AE title not recognised"
        else:
            reason = "too many associations"
        LOGGER.warning("association rejected (%s): %s -> %s from %s", reason,
                       printable_ae(calling), printable_ae(str(called)), requestor.address)

    def _on_ended(self, event: Event) -> None:
        with self._lock:
            counts = self._counts.pop(event.assoc, {})
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        LOGGER.info("association %s: %s, %d new, %d duplicate, %d rejected, %d failed", how,
                    printable_ae(event.assoc.requestor.ae_title), counts.get("new", 0),
                    counts.get("duplicate", 0), counts.get("rejected", 0),
                    counts.get("failed", 0))
