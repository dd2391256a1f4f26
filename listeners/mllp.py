"""HL7 v2 over MLLP: an asyncio listener that persists every message before acknowledging it.

Framing is ``<VT> message <FS><CR>``; a connection carries any number of messages, answered in
order. Every frame goes through :meth:`mrrp_pacs.intake.Intake.receive_hl7` in a worker thread
(so the event loop keeps serving other connections), and only then is the acknowledgement
written. Decisions, for the interface engineer on the other side:

- ``AA``: the message is stored. A message already stored, or one repeating the control id of
  an earlier one from the same sender, is ``AA`` too: it is kept but not processed twice.
- ``AE``: the content cannot be used (no MSH, bad encoding, empty MSH-10, larger than
  ``max_message_bytes``); sending it again will not help. Bytes between frames are discarded
  and counted. A frame larger than ``max_message_bytes`` is not buffered past that size: the
  rest is read and dropped up to its end block, then answered ``AE`` (MSA-2 from its MSH when
  the MSH fits), and the connection goes on.
- ``AR``: a transient failure (database locked, disk full, any unexpected error); nothing was
  recorded and the sender must send the message again.
- Acknowledgement modes: with MSH-15 and MSH-16 both empty (original mode) every message is
  answered. Otherwise (enhanced mode) NE never, ER on error, SU on success, AL (or a value we
  do not know) always. Storing and processing are one step here, so at most one
  acknowledgement is sent: an application one (AA/AE/AR) when MSH-16 asks for it, else a
  commit one (CA/CE/CR) when MSH-15 asks for it.
- The acknowledgement swaps sender and receiver, answers ``ACK^<trigger>^ACK`` with a new
  control id, echoes MSH-11/12, the encoding characters and MSH-18, and is written in the
  message's character set (an MSH-18 we cannot decode is not echoed: the header's bytes are
  then returned as they came, with MSH-18 empty; delimiters that are not five distinct ASCII
  punctuation marks are replaced by the standard ones, echoed values escaped). ``AE``/``AR``
  carry an ERR segment (HL7 table 0357 code) and the reason in MSA-3, without patient data.
  Echoed header fields are cut at ``MAX_ECHO_CHARS`` so a hostile header cannot make a large
  answer.

Limits against hostile peers: a frame must be complete within ``frame_timeout_s`` of its first
byte (a sender trickling bytes cannot hold a connection; between frames ``idle_timeout_s``
applies), and one address holds at most ``max_connections_per_address`` connections (more are
closed at once, other senders still get in); with ``allowed_addresses`` a peer from another
address is closed at once. A message answered AE for its content is kept
(:mod:`mrrp_pacs.intake.refused`, ``mrrp-pacs quarantine``), so that nothing refused is lost.

TLS: a listener on ``tls_port`` (beside the plain one on ``port``, or alone) upgrades each
connection with ``ssl_context`` once the address checks and connection limits have admitted it,
so a peer that never completes its handshake holds one counted connection for at most
``handshake_timeout_s``; a failed handshake (no client certificate where one is required, one
of another CA, a plain client) closes the connection with one warning.

Peer addresses, counts and a short digest of the control id (:func:`control_digest`) are
logged; message content, MSH-10 itself and exception texts (which can quote content) never
are. The protocol itself (framing, header, acknowledgements, escaping) is :mod:`mrrp_pacs.hl7`;
this module is the server around it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import sqlite3
import ssl
import threading
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mrrp_pacs.audit import control_digest
from mrrp_pacs.hl7.ack import (
    ERROR_DATA,
    ERROR_INTERNAL,
    ERROR_LOCKED,
    AckError,
    acknowledgement_code,
    build_ack,
    read_header,
)
from mrrp_pacs.hl7.mllp import Frame, MllpFramer, framed
from mrrp_pacs.intake import Intake, IntakeResult, Outcome
from mrrp_pacs.intake import refused as refused_input
from mrrp_pacs.tls import Network, address_allowed

LOGGER = logging.getLogger(__name__)

READ_CHUNK_BYTES = 64 * 1024

IntakeFactory = Callable[[], Intake]


# -- the server ------------------------------------------------------------------------------

@dataclass
class MllpStats:
    """Counters since start: for status pages and tests."""

    connections_open: int = 0
    connections_total: int = 0
    connections_refused: int = 0  # over max_connections, or arriving while stopping
    connections_refused_address: int = 0  # over max_connections_per_address (also counted above)
    connections_not_allowed: int = 0  # from an address outside allowed_addresses (also above)
    tls_handshake_failures: int = 0  # TLS connections closed: handshake failed or too slow
    frame_timeouts: int = 0  # connections closed: a frame not complete within frame_timeout_s
    refused_kept: int = 0  # messages answered AE for their content and kept in refused_input
    in_flight: int = 0  # messages being persisted now
    acknowledgements: dict[str, int] = field(default_factory=dict)  # code sent -> count
    unanswered: int = 0  # no acknowledgement asked for by the message's mode
    junk_bytes: int = 0  # bytes outside MLLP frames, dropped


@dataclass(frozen=True)
class _Reply:
    code: str  # AA, AE or AR: what happened
    ack: bytes | None  # what to send, framing excluded; None when the mode asks for none
    sent_code: str | None
    control_id: str
    detail: str  # for the log: outcome and row id, never content


class MllpServer:
    """An MLLP listener persisting through :class:`~mrrp_pacs.intake.Intake`.

    Parameters
    ----------
    intake_factory
        Makes an ``Intake`` with its own ``Store``; called once in each worker thread (a
        ``Store`` is used by one thread). The server closes those stores in :meth:`stop`.
    host, port
        Address to listen on; port 0 picks a free one (see :attr:`port` after start); port
        ``None``: no plain listener (``tls_port`` then).
    tls_port, ssl_context
        A TLS listener on ``tls_port`` (0 picks a free one: :attr:`tls_port`) with this server
        context (:func:`mrrp_pacs.tls.server_context`).
    handshake_timeout_s
        Seconds a TLS connection has to complete its handshake; default ``frame_timeout_s``.
    allowed_addresses
        Networks peers may connect from; others are closed at once. ``None``: any.
    max_message_bytes
        Largest frame content accepted (bytes); a larger one is answered AE.
    idle_timeout_s
        A connection that sends nothing for this long (seconds) is closed; also the limit on
        writing one acknowledgement to a peer that does not read.
    max_connections
        Connections served at once; more are closed as soon as accepted.
    frame_timeout_s
        A frame must be complete this long (seconds) after its first byte, else the connection
        is closed.
    max_connections_per_address
        Connections served at once from one peer address; more are closed as soon as accepted.
    keep_refused
        Keep messages answered AE for their content in ``refused_input`` (bounded by the
        intake configuration's ``ingest.refused_keep_bytes``).
    workers
        Threads persisting messages; SQLite serialises commits, but object writes overlap.
    application
        Our MSH-3 in acknowledgements when a message names no receiving application.
    """

    def __init__(self, intake_factory: IntakeFactory, *, host: str = "127.0.0.1",
                 port: int | None = 2575, max_message_bytes: int = 4 * 1024 * 1024,
                 idle_timeout_s: float = 600.0, max_connections: int = 32, workers: int = 2,
                 application: str = "MRRP", frame_timeout_s: float = 60.0,
                 max_connections_per_address: int = 8, keep_refused: bool = True,
                 tls_port: int | None = None, ssl_context: ssl.SSLContext | None = None,
                 handshake_timeout_s: float | None = None,
                 allowed_addresses: Iterable[Network] | None = None) -> None:
        if port is None and tls_port is None:
            raise ValueError("MLLP listener: no port; give port, tls_port or both")
        if (tls_port is None) != (ssl_context is None):
            raise ValueError("MLLP listener: tls_port and ssl_context go together")
        handshake_timeout_s = frame_timeout_s if handshake_timeout_s is None \
            else handshake_timeout_s
        for name, value in (("max_message_bytes", max_message_bytes),
                            ("handshake_timeout_s", handshake_timeout_s),
                            ("idle_timeout_s", idle_timeout_s),
                            ("frame_timeout_s", frame_timeout_s),
                            ("max_connections_per_address", max_connections_per_address),
                            ("max_connections", max_connections), ("workers", workers)):
            if value <= 0:
                raise ValueError(f"MLLP listener: {name} must be positive, not {value}")
        self.intake_factory = intake_factory
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self.workers = workers
        self.application = application
        self.frame_timeout_s = frame_timeout_s
        self.max_connections_per_address = max_connections_per_address
        self.keep_refused = keep_refused
        self.tls_port = tls_port
        self.ssl_context = ssl_context
        self.handshake_timeout_s = handshake_timeout_s
        self.allowed_addresses = None if allowed_addresses is None else tuple(allowed_addresses)
        self._per_address: dict[str, int] = {}
        self._stats = MllpStats()
        self._server: asyncio.Server | None = None  # the plain listener
        self._tls_server: asyncio.Server | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed: asyncio.Event | None = None
        self._stopping = False
        self._handlers: set[asyncio.Task[None]] = set()
        self._reading: set[asyncio.Task[None]] = set()
        self._local = threading.local()
        self._intakes: list[Intake] = []
        self._intakes_lock = threading.Lock()

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open one intake (so a store that cannot be opened fails here) and start listening.

        Raises
        ------
        OSError
            The address cannot be bound (port in use, address not local).
        """
        if self._server is not None or self._tls_server is not None:
            raise RuntimeError("MLLP listener already started")
        self._stopping = False
        self._stats = MllpStats()
        self._closed = asyncio.Event()
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="mllp-intake")
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._intake)
            if self.port is not None:
                self._server = await asyncio.start_server(
                    functools.partial(self._handle, tls=False), self.host, self.port)
                self.port = self._server.sockets[0].getsockname()[1]
            if self.tls_port is not None:
                self._tls_server = await asyncio.start_server(
                    functools.partial(self._handle, tls=True), self.host, self.tls_port)
                self.tls_port = self._tls_server.sockets[0].getsockname()[1]
        except BaseException:
            for server in (self._server, self._tls_server):
                if server is not None:
                    server.close()
            self._server = self._tls_server = None
            await self._release()
            raise
        where = [f"{self.host}:{self.port}"] if self.port is not None else []
        if self.tls_port is not None:
            where.append(f"{self.host}:{self.tls_port} (TLS)")
        LOGGER.info("MLLP listener on %s (max %d connections, %d bytes per message%s)",
                    " and ".join(where), self.max_connections, self.max_message_bytes,
                    "" if self.allowed_addresses is None else ", from "
                    + ", ".join(map(str, self.allowed_addresses)) + " only")

    async def serve_forever(self) -> None:
        """Start (unless started) and return once :meth:`stop` has finished."""
        if self._server is None and self._tls_server is None:
            await self.start()
        assert self._closed is not None
        await self._closed.wait()

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting, let messages already received be stored and answered, then close.

        Connections waiting for bytes are closed at once; a connection whose message is being
        persisted gets its acknowledgement first. After ``grace_s`` seconds whatever remains is
        cancelled (a message being stored then is stored, but not answered: the sender resends
        it and receives AA as for a duplicate).
        """
        servers = [server for server in (self._server, self._tls_server) if server is not None]
        if not servers:
            return
        self._stopping = True
        for server in servers:
            server.close()
        for task in list(self._reading):
            task.cancel()
        if self._handlers:
            _, pending = await asyncio.wait(set(self._handlers), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        for server in servers:
            await server.wait_closed()
        self._server = self._tls_server = None
        await self._release()
        LOGGER.info("MLLP listener on port %s stopped (%d connections served)",
                    self.port if self.port is not None else self.tls_port,
                    self._stats.connections_total)
        assert self._closed is not None
        self._closed.set()

    def run_in_thread(self, grace_s: float = 30.0) -> MllpServerThread:
        """Serve from a thread of its own with its own event loop (for the threaded daemon).

        Returns once listening; the handle's ``port`` is the bound port and ``stop()`` stops
        the server gracefully and joins the thread.

        Raises
        ------
        OSError
            The address cannot be bound.
        """
        ready = threading.Event()
        state: dict[str, object] = {}

        async def main() -> None:
            try:
                await self.start()
            except BaseException as exc:
                state["error"] = exc
                ready.set()
                return
            state["loop"] = asyncio.get_running_loop()
            ready.set()
            await self.serve_forever()

        thread = threading.Thread(target=asyncio.run, args=(main(),), name="mllp-listener",
                                  daemon=True)
        thread.start()
        ready.wait()
        error = state.get("error")
        if isinstance(error, BaseException):
            thread.join()
            raise error
        loop = state["loop"]
        assert isinstance(loop, asyncio.AbstractEventLoop)
        return MllpServerThread(self, loop, thread, grace_s)

    def stats(self) -> MllpStats:
        """A copy of the counters (safe to call from any thread)."""
        return dataclasses.replace(self._stats,
                                   acknowledgements=dict(self._stats.acknowledgements))

    async def _release(self) -> None:
        if self._executor is not None:
            # waits only for the frames being worked on: one queued behind busy workers was
            # cancelled with its connection's task (never answered: its sender resends it)
            await asyncio.to_thread(self._executor.shutdown, wait=True)
            self._executor = None
        with self._intakes_lock:
            intakes, self._intakes = self._intakes, []
        for intake in intakes:
            intake.store.close()

    # -- one connection ----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                      tls: bool = False) -> None:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if peer else "?"
        where = f"{host}:{peer[1]}" if peer else "?"
        if self.allowed_addresses is not None and not address_allowed(host,
                                                                      self.allowed_addresses):
            self._stats.connections_refused += 1
            self._stats.connections_not_allowed += 1
            LOGGER.warning("MLLP connection from %s refused: address not in hl7.allowed_addresses",
                           where)
            writer.close()
            return
        crowded = self._per_address.get(host, 0) >= self.max_connections_per_address
        if self._stopping or crowded or self._stats.connections_open >= self.max_connections:
            self._stats.connections_refused += 1
            if crowded and not self._stopping:
                self._stats.connections_refused_address += 1
            LOGGER.warning("MLLP connection from %s refused: %s", where,
                           "stopping" if self._stopping else
                           f"{self.max_connections_per_address} connections from {host} "
                           "already open" if crowded else
                           f"{self.max_connections} connections already open")
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._stats.connections_open += 1
        self._stats.connections_total += 1
        self._per_address[host] = self._per_address.get(host, 0) + 1
        framer = MllpFramer(self.max_message_bytes)
        answered = 0
        loop = asyncio.get_running_loop()
        frame_deadline: float | None = None  # loop time by which the current frame must end
        LOGGER.info("MLLP connection from %s opened (%d open%s)", where,
                    self._stats.connections_open, ", TLS" if tls else "")
        try:
            if tls and not await self._start_tls(writer, task, where):
                return
            while not self._stopping:
                self._reading.add(task)
                wait_s = self.idle_timeout_s
                if frame_deadline is not None:
                    wait_s = min(wait_s, frame_deadline - loop.time())
                try:
                    async with asyncio.timeout(max(wait_s, 0.0)):
                        chunk = await reader.read(READ_CHUNK_BYTES)
                except TimeoutError:
                    if frame_deadline is not None and loop.time() >= frame_deadline:
                        self._stats.frame_timeouts += 1
                        LOGGER.warning("MLLP connection from %s: frame not complete %g s after "
                                       "its first byte (%d bytes so far): closing", where,
                                       self.frame_timeout_s, framer.partial_bytes)
                    else:
                        LOGGER.info("MLLP connection from %s idle for %g s: closing", where,
                                    self.idle_timeout_s)
                    break
                finally:
                    self._reading.discard(task)
                if not chunk:
                    break
                junk_before = framer.junk_bytes
                frames = framer.feed(chunk)
                self._stats.junk_bytes += framer.junk_bytes - junk_before
                if not framer.in_frame:
                    frame_deadline = None
                elif frame_deadline is None or frames:
                    # a frame started in this chunk (one after those it completed, if any)
                    frame_deadline = loop.time() + self.frame_timeout_s
                # frames already received are answered even while stopping: the sender waits
                for frame in frames:
                    if not await self._answer(frame, writer, host, where):
                        return
                    answered += 1
        except asyncio.CancelledError:
            pass  # stop(): this connection was waiting for bytes, or ran past the grace period
        except ConnectionError as exc:
            LOGGER.info("MLLP connection from %s lost: %s", where, type(exc).__name__)
        except Exception as exc:
            # a bug of ours: drop this connection (the sender resends), keep the listener
            LOGGER.error("MLLP connection from %s failed with %s at\n%s", where,
                         type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)))
        finally:
            self._handlers.discard(task)
            self._stats.connections_open -= 1
            left = self._per_address.get(host, 0) - 1
            if left > 0:
                self._per_address[host] = left
            else:
                self._per_address.pop(host, None)
            if framer.junk_bytes or framer.partial_bytes:
                LOGGER.warning("MLLP connection from %s: %d bytes outside frames and %d bytes "
                               "of an unfinished frame discarded", where, framer.junk_bytes,
                               framer.partial_bytes)
            writer.close()
            LOGGER.info("MLLP connection from %s closed after %d messages", where, answered)

    async def _start_tls(self, writer: asyncio.StreamWriter, task: asyncio.Task[None],
                         where: str) -> bool:
        """The server side of the TLS handshake, within ``handshake_timeout_s``; False (and a
        warning) when it failed."""
        assert self.ssl_context is not None
        self._reading.add(task)  # stop() cancels a handshake as it cancels a read
        try:
            await writer.start_tls(self.ssl_context,
                                   ssl_handshake_timeout=self.handshake_timeout_s)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError and ConnectionError are OSErrors
            self._stats.tls_handshake_failures += 1
            reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else (
                f"not complete within {self.handshake_timeout_s:g} s"
                if "taking longer" in str(exc) or isinstance(exc, TimeoutError)
                else type(exc).__name__)
            LOGGER.warning("MLLP connection from %s: TLS handshake failed (%s): closing", where,
                           reason)
            return False
        finally:
            self._reading.discard(task)
        return True

    async def _answer(self, frame: Frame, writer: asyncio.StreamWriter, host: str,
                      where: str) -> bool:
        """Persist one frame and write its acknowledgement; False when the peer is gone."""
        assert self._executor is not None
        self._stats.in_flight += 1
        try:
            reply = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._persist, frame, host)
        finally:
            self._stats.in_flight -= 1
        if reply.ack is None or reply.sent_code is None:
            # the outcome (reply.code) was not sent: say so rather than name a code
            LOGGER.info("HL7 %s from %s: %s; no acknowledgement sent (MSH-15/16 ask for none)",
                        control_digest(reply.control_id), where, reply.detail)
            self._stats.unanswered += 1
            return True
        LOGGER.info("HL7 %s from %s: %s sent, %s", control_digest(reply.control_id), where,
                    reply.sent_code, reply.detail)
        counts = self._stats.acknowledgements
        counts[reply.sent_code] = counts.get(reply.sent_code, 0) + 1
        try:
            writer.write(framed(reply.ack))
            async with asyncio.timeout(self.idle_timeout_s):
                await writer.drain()
        except (ConnectionError, TimeoutError) as exc:
            LOGGER.warning("MLLP connection from %s: acknowledgement %s of %s not delivered "
                           "(%s); the sender will resend", where, reply.sent_code,
                           control_digest(reply.control_id), type(exc).__name__)
            return False
        return True

    # -- worker threads ----------------------------------------------------------------------

    def _intake(self) -> Intake:
        intake: Intake | None = getattr(self._local, "intake", None)
        if intake is None:
            intake = self.intake_factory()
            with self._intakes_lock:
                self._intakes.append(intake)
            self._local.intake = intake
        return intake

    def _persist(self, frame: Frame, host: str) -> _Reply:
        """Store the frame, decide the code and encode the acknowledgement (in a worker)."""
        header = read_header(frame.data)
        error: AckError | None = None
        if frame.truncated:
            code = "AE"
            detail = f"rejected: {frame.size_bytes} bytes"
            error = AckError(*ERROR_DATA, f"message is {frame.size_bytes} bytes, more than the "
                                          f"{self.max_message_bytes} this listener accepts")
            detail += self._keep_refused(frame, host, error.reason)
            try:
                self._intake().refuse("hl7", f"mllp:{host}", "-", error.reason)
            except (sqlite3.Error, OSError) as exc:
                # the answer stays AE (the frame is unusable); only the audit row is missing
                LOGGER.error("refused HL7 message from %s could not be audited (%s)", host,
                             type(exc).__name__)
        else:
            try:
                result = self._intake().receive_hl7(frame.data, origin=f"mllp:{host}")
            except sqlite3.OperationalError as exc:
                # SQLite's code, not its text (a trigger's or extension's text can quote data)
                name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
                code, detail = "AR", f"database unavailable ({name})"
                busy = "locked" in str(exc) or "busy" in str(exc)
                error = AckError(*(ERROR_LOCKED if busy else ERROR_INTERNAL),
                                 "database busy, send again" if busy else
                                 "database unavailable, send again")
            except OSError as exc:
                code, detail = "AR", f"storage failed ({type(exc).__name__}, errno {exc.errno})"
                error = AckError(*ERROR_INTERNAL, "storage unavailable, send again")
            except Exception as exc:
                # the exception's text may quote the message: log where it failed, not what
                code, detail = "AR", f"unexpected {type(exc).__name__}"
                LOGGER.error("HL7 intake failed with %s at\n%s", type(exc).__name__,
                             "".join(traceback.format_tb(exc.__traceback__)))
                error = AckError(*ERROR_INTERNAL, "internal error, send again")
            else:
                code, detail, error = self._judge(result)
                if result.outcome is Outcome.REJECTED and error is not None:
                    detail += self._keep_refused(frame, host, error.reason)
        sent_code = acknowledgement_code(header, code)
        ack = None if sent_code is None else build_ack(
            header, sent_code, error, application=self.application)
        return _Reply(code, ack, sent_code, header.control_id if header else "", detail)

    def _keep_refused(self, frame: Frame, host: str, reason: str) -> str:
        """Keep a frame refused for its content; what the log line adds (never content)."""
        if not self.keep_refused:
            return ""
        intake = self._intake()
        ingest = intake.config.ingest
        try:
            row_id = refused_input.keep(
                intake.store, kind="hl7", listener="mllp", peer=host, reason=reason,
                data=frame.data, size_bytes=frame.size_bytes, max_bytes=ingest.max_hl7_bytes,
                keep_bytes=ingest.refused_keep_bytes)
        except (sqlite3.Error, OSError) as exc:
            # the answer stays AE (the content is unusable); only the copy is missing
            LOGGER.error("refused HL7 message from %s could not be kept (%s)", host,
                         type(exc).__name__)
            return ", not kept (storage failed)"
        if row_id is None:
            return ", not kept (larger than ingest.refused_keep_bytes)"
        self._stats.refused_kept += 1
        return f", kept as refused input {row_id}"

    @staticmethod
    def _judge(result: IntakeResult) -> tuple[str, str, AckError | None]:
        if result.outcome is Outcome.NEW:
            return "AA", f"stored as row {result.row_id}", None
        if result.outcome is Outcome.DUPLICATE:
            where = f" row {result.row_id}" if result.row_id is not None else ""
            return "AA", f"duplicate, kept{where}, not processed again", None
        return "AE", "rejected", AckError(*ERROR_DATA, result.reason or "message rejected")


@dataclass
class MllpServerThread:
    """A running :class:`MllpServer` on a thread of its own."""

    server: MllpServer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    grace_s: float

    @property
    def port(self) -> int:
        """The plain listener's port; the TLS listener's when there is no plain one."""
        port = self.server.port if self.server.port is not None else self.server.tls_port
        assert port is not None  # one of them is set (checked in MllpServer.__init__)
        return port

    @property
    def tls_port(self) -> int | None:
        return self.server.tls_port

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop gracefully (see :meth:`MllpServer.stop`) and join the thread; idempotent."""
        if self.thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self.server.stop(self.grace_s), self.loop)
            future.result(timeout_s)
        self.thread.join(timeout_s)
