"""DICOM C-STORE SCU: sends stored result objects (SR, Encapsulated PDF) to a PACS.

Each object is offered in a presentation context of its own SOP class. A compressed object is
offered in exactly its own transfer syntax (pynetdicom does not transcode pixel data); an
uncompressed one (Explicit or Implicit VR Little Endian) is offered in its own first and in the
other second, and sent in whichever the peer accepted (pynetdicom re-encodes between the two),
so a PACS that takes Implicit VR Little Endian only still gets our Explicit VR SRs and PDFs.
A session keeps one association open for a batch and re-associates only when an object needs a
context not yet negotiated, or after the peer aborted.

Failures are :class:`~exporters.outbox.SendError`, classed by pynetdicom's status categories
(:func:`pynetdicom.status.code_to_category`). Transient (worth retrying): connection refused
or timed out, association rejected-transient or aborted, no response, failure statuses "out of
resources" (A7xx), "processing failure" (0110), "resource limitation" (0213) and "cannot
understand" (C000–CFFF). PS3.4 B.2.3 gives Cxxx to a data set the SCP cannot understand, but
PACSs answer it for their own failures too (Orthanc 1.10 answers 0xC000 to a C-FIND or C-MOVE
it cannot serve), and our objects are ones this PACS accepts when well: a PACS in trouble
answering Cxxx for hours must cost time, not results, so the row is retried for the outbox's
time budget (72 h) before it is dead. Permanent: the bytes are not a DICOM file, an association
rejected-permanent (e.g. called AE title not recognised: retrying cannot help until the PACS or
our configuration changes), the peer accepts no context for the object, and any other failure,
cancel or unknown status: a refusal of the object itself (A9xx the data set does not match its
SOP class, 0122 SOP class not supported, 0124 not authorized). Every Warning status (B000–BFFF,
0001, 0107, 0116) is a delivery, logged as a warning.
"""

from __future__ import annotations

import io
import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.status import (
    STATUS_FAILURE,
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from mrrp_pacs.errors import SendError

LOGGER = logging.getLogger(__name__)

DEFAULT_CALLING_AE = "MRRP"  # the default [dicom] ae_title
DEFAULT_TIMEOUT_S = 30.0
MAX_CONTEXTS = 128  # PS3.8: presentation context ids are odd numbers 1..255
TRANSIENT_STATUSES = frozenset({0x0110, 0x0213, *range(0xA700, 0xA800),
                                *range(0xC000, 0xD000)})
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)  # offered for one another
REJECTED_PERMANENT = 0x01  # A-ASSOCIATE-RJ result (PS3.8 9.3.4); 0x02 is rejected-transient
MAX_PDU_BYTES = 1 << 20  # the largest PDU we receive (pynetdicom's default is 16 KiB)


class DicomSender:
    """C-STORE to one peer AE.

    Parameters
    ----------
    host, port
        The peer's address and DICOM port.
    called_ae
        The peer's AE title.
    calling_ae
        Our AE title, as the peer knows it.
    timeout_s
        Limit in seconds for connecting, association negotiation, each network read and
        each C-STORE response.
    ssl_context
        Associate over TLS with this client context (:func:`mrrp_pacs.tls.client_context`);
        ``port`` is then the peer's DICOM-TLS port.

    Raises
    ------
    ValueError
        An AE title that is empty, longer than 16 characters or has a backslash or control
        characters; a port outside 1–65535; a timeout that is not positive.
    """

    def __init__(self, host: str, port: int, called_ae: str,
                 calling_ae: str = DEFAULT_CALLING_AE,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        for label, title in (("called AE title", called_ae), ("calling AE title", calling_ae)):
            if not 0 < len(title.strip()) <= 16 or "\\" in title or not title.isprintable():
                raise ValueError(f"{label} {title!r} must be 1-16 printable characters "
                                 "without a backslash")
        if not 0 < port < 65536:
            raise ValueError(f"DICOM port {port} is not in 1-65535")
        if not host:
            raise ValueError("DICOM destination needs a host")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.host = host
        self.port = port
        self.called_ae = called_ae
        self.calling_ae = calling_ae
        self.timeout_s = timeout_s
        self.ssl_context = ssl_context

    @property
    def peer(self) -> str:
        return f"{self.called_ae}@{self.host}:{self.port}"

    def send(self, data: bytes) -> None:
        """Send one DICOM file (Part 10 bytes) on an association of its own.

        Raises
        ------
        SendError
            The peer did not store it (see the module docstring for which are transient).
        """
        with self.session() as session:
            session.send(data)

    @contextmanager
    def session(self) -> Iterator[DicomSession]:
        """A batch of C-STOREs on one association (opened at the first send, released on exit)."""
        session = DicomSession(self)
        try:
            yield session
        finally:
            session.close()


class DicomSession:
    """One association (at a time) to a :class:`DicomSender`'s peer; see :meth:`send`."""

    def __init__(self, sender: DicomSender) -> None:
        self._sender = sender
        self._assoc: Association | None = None
        self._contexts: list[tuple[str, str]] = []
        self._message_id = 0
        # once the peer cannot be reached, the rest of the batch fails fast with the same error
        # instead of waiting out a connection timeout per object
        self._unreachable: SendError | None = None

    def send(self, data: bytes) -> None:
        """C-STORE one DICOM file (Part 10 bytes) on this session's association.

        Raises
        ------
        SendError
            The peer did not store it.
        """
        dataset = _parse(data)
        key = (str(dataset.SOPClassUID), str(dataset.file_meta.TransferSyntaxUID))
        if self._unreachable is not None:
            raise self._unreachable
        assoc = self._association_for(key)
        self._message_id = self._message_id % 0xFFFF + 1
        try:
            status = assoc.send_c_store(dataset, msg_id=self._message_id)
        except ValueError as exc:  # pynetdicom could not encode the dataset
            raise SendError(f"C-STORE to {self._sender.peer} not sent: the object could not be "
                            f"encoded ({type(exc).__name__})", transient=False) from None
        _check_status(status, self._sender.peer)

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._assoc = None

    def _association_for(self, key: tuple[str, str]) -> Association:
        assoc = self._assoc
        if assoc is not None and assoc.is_established and key in self._contexts:
            return assoc
        self.close()
        if key not in self._contexts:
            self._contexts = [*self._contexts, key][-MAX_CONTEXTS:]
        try:
            assoc = self._associate()
        except SendError:
            self._contexts = [k for k in self._contexts if k != key]
            raise
        self._assoc = assoc
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                    for cx in assoc.accepted_contexts}
        self._contexts = [k for k in self._contexts
                          if any((k[0], syntax) in accepted for syntax in _offered(k[1]))]
        if key not in self._contexts:
            raise SendError(f"{self._sender.peer} does not accept SOP class {key[0]} with "
                            f"transfer syntax {UID(key[1]).name}", transient=False)
        return assoc

    def _associate(self) -> Association:
        sender = self._sender
        ae = AE(ae_title=sender.calling_ae)
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.acse_timeout = ae.dimse_timeout = sender.timeout_s
        ae.network_timeout = ae.connection_timeout = sender.timeout_s
        contexts = [build_context(sop_class, _offered(syntax))
                    for sop_class, syntax in self._contexts]
        tls = None if sender.ssl_context is None else (sender.ssl_context, sender.host)
        assoc = ae.associate(sender.host, sender.port, contexts=contexts,
                             ae_title=sender.called_ae, tls_args=tls)
        if assoc.is_established:
            return assoc
        reply = assoc.acceptor.primitive
        if assoc.is_rejected and reply is not None:
            # rejected-permanent (e.g. our calling AE or its called AE not known there) will
            # not change by trying again; rejected-transient (e.g. too many associations) may
            error = SendError(
                f"association rejected by {sender.peer}: {reply.reason_str} "
                f"({reply.result_str}, from {reply.source_str}; calling AE "
                f"{sender.calling_ae})", transient=reply.result != REJECTED_PERMANENT)
        elif reply is not None and reply.result == 0:
            # it accepted the association but none of our contexts; pynetdicom then aborts
            raise SendError(f"{sender.peer} accepts none of the offered presentation contexts "
                            f"({', '.join(f'{c} {UID(t).name}' for c, t in self._contexts)})",
                            transient=False)
        else:
            how = ("connection refused, timed out, aborted or TLS handshake failed (certificate "
                   "not trusted, name not matching, ours refused)" if tls is not None else
                   "connection refused, timed out or aborted")
            error = SendError(f"no association with {sender.peer}: {how} (timeout "
                              f"{sender.timeout_s:g} s)", transient=True)
        self._unreachable = error
        raise error


def _parse(data: bytes) -> Dataset:
    try:
        dataset = dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many kinds on malformed bytes
        raise SendError(f"not a DICOM file ({type(exc).__name__})", transient=False) from None
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID") if k not in dataset]
    if "TransferSyntaxUID" not in dataset.file_meta:
        missing.append("TransferSyntaxUID")
    if missing:
        raise SendError(f"DICOM object lacks {', '.join(missing)}", transient=False)
    return dataset


def _offered(syntax: str) -> list[str]:
    """Transfer syntaxes offered for an object in ``syntax``: its own first, then, for an
    uncompressed one, the other uncompressed one (pynetdicom converts between them)."""
    if syntax in UNCOMPRESSED:
        return [syntax, *(other for other in UNCOMPRESSED if other != syntax)]
    return [syntax]


def _check_status(status: Dataset, peer: str) -> None:
    if "Status" not in status:
        raise SendError(f"no C-STORE response from {peer} (association aborted or timed out)",
                        transient=True)
    code = int(status.Status)
    category = code_to_category(code)
    if category == STATUS_SUCCESS:
        return
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", f"{category.lower()} status"))[1]
    if category == STATUS_WARNING:
        LOGGER.warning("C-STORE to %s stored with warning 0x%04X (%s)", peer, code, meaning)
        return
    raise SendError(f"C-STORE refused by {peer}: status 0x{code:04X} ({meaning})",
                    transient=category == STATUS_FAILURE and code in TRANSIENT_STATUSES)
