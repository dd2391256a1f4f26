"""Feature extraction in a worker process: a patient that crashes it costs that patient only.

Extraction decodes slides and runs torch models on every core; in the daemon it would share a
process with the listeners that answer C-STORE and MLLP. :class:`ExtractionWorker` runs it in
a child process instead (``spawn``: a fresh interpreter, nothing inherited from the daemon's
threads), one patient at a time, with

- a **memory limit**: the parent reads the child's resident set (``/proc/PID/status``) while it
  waits and kills it with SIGKILL above ``memory_mb`` (an allocation spike the kernel's
  out-of-memory killer catches first ends the same way: the child dies, the daemon lives);
- **bounded threads**: ``torch.set_num_threads`` and the OpenMP/BLAS variables in the child;
- a **time limit** per patient.

A child that dies, runs over a limit, or raises raises :class:`WorkerFailed` in the parent; the
next patient starts a fresh child. :class:`~mrrp_pacs.errors.ModelUnavailable` (a missing
encoder: every patient would fail the same way) comes back as itself, and a child that cannot
start raises :class:`WorkerUnavailable`, so that the run stops instead of failing everyone.

:class:`InlineWorker` is the same interface in the calling process (``[scoring] isolation =
"inline"``), for debugging.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Protocol

from mrrp_pacs.cases import CaseInputs
from mrrp_pacs.config import Config
from mrrp_pacs.errors import ModelUnavailable, MrrpError
from mrrp_pacs.features.pipeline import FamilyOutcome

LOGGER = logging.getLogger(__name__)

POLL_S = 0.05  # how often the parent looks at the child's memory while it waits
START_TIMEOUT_S = 300.0  # importing torch and loading the encoders


class WorkerFailed(MrrpError):
    """One patient's extraction failed in a way that is not a feature error: the worker
    raised, died (killed, out of memory), or ran over its memory or time limit."""


class WorkerUnavailable(MrrpError):
    """The extraction worker cannot start (its store or encoders cannot be loaded, or loading
    them goes over the limits): every patient would fail alike, so the run stops."""


@dataclass(frozen=True)
class WorkerLimits:
    """``memory_mb`` resident memory of the worker (0 = no limit); ``threads`` for torch and
    the math libraries (0 = the machine's cores less one, at least one); ``timeout_s`` for one
    patient (0 = none)."""

    memory_mb: int = 8192
    threads: int = 0
    timeout_s: float = 3600.0

    def thread_count(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 2) - 1)

    @classmethod
    def from_config(cls, config: Config) -> WorkerLimits:
        scoring = config.scoring
        return cls(scoring.worker_memory_mb, scoring.worker_threads,
                   float(scoring.worker_timeout_s))


class Worker(Protocol):
    def extract(self, inputs: CaseInputs, families: tuple[str, ...]) -> list[FamilyOutcome]:
        """Extract ``families`` of one patient (cached ones are reused)."""

    def close(self) -> None: ...


class InlineWorker:
    """Extraction in the calling process (no isolation)."""

    def __init__(self, config: Config, store_factory: Callable[[], object]) -> None:
        from mrrp_pacs.features.pipeline import Extractor

        self._extractor = Extractor(store_factory(), config)  # type: ignore[arg-type]

    def extract(self, inputs: CaseInputs, families: tuple[str, ...]) -> list[FamilyOutcome]:
        from mrrp_pacs.faults import fault_point

        fault_point("extract", inputs.patient_key)
        try:
            return self._extractor.run(inputs, families, force=False)
        except (ModelUnavailable, WorkerFailed):
            raise
        except Exception as exc:  # the same contract as the process worker
            raise WorkerFailed(f"extraction raised {type(exc).__name__}") from exc

    def close(self) -> None:
        pass


class ExtractionWorker:
    """A child process that extracts one patient at a time; restarted after a failure."""

    def __init__(self, config: Config, db_path: Path, objects_dir: Path,
                 limits: WorkerLimits) -> None:
        self.config = config
        self.db_path = db_path
        self.objects_dir = objects_dir
        self.limits = limits
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self.started = 0  # children started (a restart after each failure)

    # -- lifecycle ---------------------------------------------------------------------------
    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(
            target=_serve, name="mrrp-extraction",
            args=(child, self.config, self.db_path, self.objects_dir,
                  self.limits.thread_count()), daemon=True)
        process.start()
        child.close()
        self._process, self._conn = process, parent
        self.started += 1
        reply = self._wait(START_TIMEOUT_S, "starting")
        if reply != ("ready",):
            self._kill()
            raise WorkerUnavailable(f"the extraction worker did not start: {reply[-1]}")
        LOGGER.info("extraction worker started (pid %s, %d thread(s), memory limit %s)",
                    process.pid, self.limits.thread_count(),
                    f"{self.limits.memory_mb} MiB" if self.limits.memory_mb else "none")

    def close(self) -> None:
        """Stop the child (it finishes nothing: call between patients)."""
        if self._conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self._conn.send(("stop",))
        if self._process is not None:
            self._process.join(5)
        self._kill()

    def abort(self) -> None:
        """SIGKILL the child now; safe from another thread (the waiting one notices)."""
        process = self._process
        if process is not None and process.pid is not None and process.is_alive():
            os.kill(process.pid, signal.SIGKILL)

    def _kill(self) -> None:
        if self._process is not None and self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn = None, None

    # -- one patient ---------------------------------------------------------------------------
    def extract(self, inputs: CaseInputs, families: tuple[str, ...]) -> list[FamilyOutcome]:
        """Extract one patient in the child.

        Raises
        ------
        WorkerFailed
            The child raised, died or ran over a limit (it is replaced for the next patient).
        WorkerUnavailable
            A fresh child could not start.
        ModelUnavailable
            An encoder or model the families need is missing (every patient would fail).
        """
        if self._process is None or not self._process.is_alive():
            self._kill()
            self._start()
        assert self._conn is not None
        self._conn.send(("extract", inputs, families))
        reply = self._wait(self.limits.timeout_s or None, "extracting")
        kind = reply[0]
        if kind == "done":
            return reply[1]  # type: ignore[return-value]
        if kind == "unavailable":
            raise ModelUnavailable(str(reply[1]))
        self._kill()  # a child that raised may hold half-loaded state: start afresh
        raise WorkerFailed(str(reply[1]))

    def _wait(self, timeout_s: float | None, doing: str) -> tuple[object, ...]:
        """The child's next reply, watching its memory and the time; a failure reply when it
        dies or runs over a limit (after killing it)."""
        assert self._process is not None and self._conn is not None
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        limit_kib = self.limits.memory_mb * 1024
        peak = 0
        while True:
            if self._conn.poll(POLL_S):
                try:
                    reply: tuple[object, ...] = self._conn.recv()
                except (EOFError, OSError):
                    reply = ()
                if reply:
                    return reply
            if not self._process.is_alive():
                self._process.join(1)
                code = self._process.exitcode
                self._kill()
                if code is not None and code < 0:
                    name = signal.Signals(-code).name
                    why = (f"the worker was killed by {name} while {doing}"
                           + (" (out of memory?)" if name == "SIGKILL" else ""))
                else:
                    why = f"the worker exited with status {code} while {doing}"
                return ("failed", why)
            rss = resident_kib(self._process.pid)
            peak = max(peak, rss)
            if limit_kib and rss > limit_kib:
                self._kill()
                return ("failed", f"the worker went over its memory limit of "
                                  f"{self.limits.memory_mb} MiB while {doing} "
                                  f"({rss // 1024} MiB resident)")
            if deadline is not None and time.monotonic() > deadline:
                self._kill()
                return ("failed", f"the worker ran over its time limit of {timeout_s:.0f} s "
                                  f"while {doing}")


def resident_kib(pid: int | None) -> int:
    """Resident memory of process ``pid`` in KiB (0 when it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _serve(conn: Connection, config: Config, db_path: Path, objects_dir: Path,
           threads: int) -> None:
    """The child: bound threads, load the extractor, answer requests until told to stop."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon stops us, not the terminal
    _die_with_parent()
    import torch

    from mrrp_pacs.faults import fault_point
    from mrrp_pacs.features.pipeline import Extractor
    from mrrp_pacs.store import Store

    torch.set_num_threads(threads)
    try:
        extractor = Extractor(Store(db_path, objects_dir, migrate=False), config)
    except Exception as exc:  # reported to the parent, which logs it
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready",))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if request[0] != "extract":
            return
        _, inputs, families = request
        try:
            fault_point("extract", inputs.patient_key)
            conn.send(("done", extractor.run(inputs, families, force=False)))
        except ModelUnavailable as exc:
            conn.send(("unavailable", str(exc)))
        except Exception as exc:  # one patient's failure; the message may quote a patient id
            conn.send(("failed", f"extraction raised {type(exc).__name__}: {exc}"))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the daemon dies (a SIGKILLed daemon cannot stop
    its worker; without this the worker would finish its patient as an orphan)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pipe's EOF ends it after its patient
        LOGGER.debug("no parent-death signal on this system")
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)
