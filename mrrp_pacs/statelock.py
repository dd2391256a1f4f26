"""One daemon per state folder: ``mrrp.lock``, held with ``flock`` for a lifetime.

The daemon holds the lock from start to stop, and so do the batch scoring commands (``score``,
``rescore``) for their run: a second daemon on one database would mark the first one's running
jobs interrupted at start, and two scoring runs at once race on the same patient (a unique
constraint failing in one of them) and can both queue the results of a score that one of them
is still publishing. The other commands take no lock: intake (``ingest``) is safe beside the
listeners, ``export`` claims each outbox row before sending it, and reading is always safe.

``flock`` belongs to the open file, so the kernel releases it when the holder exits, however it
exits (SIGKILL, out of memory, power cut): a lock file left behind never blocks a restart, and
nothing has to guess whether a recorded pid is still alive. The holder's pid and what it runs
are written into the file only so that a refusal can name them.

A child process made by ``fork`` shares the open file and so the lock: a worker still running
after its parent was killed keeps the folder locked until it ends (which is what is wanted, as
it may still write). A process started with ``exec`` (``spawn``) does not inherit it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from mrrp_pacs.errors import StateLocked


class StateLock:
    """An exclusive lock on a state folder, held until :meth:`release` or the process ends.

    Parameters
    ----------
    path
        The lock file (``PathsConfig.lock_file``); its folder is created when missing.
    purpose
        What the holder runs (``serve``, ``rescore``…), written for whoever is refused.
    """

    def __init__(self, path: Path, purpose: str) -> None:
        self.path = path
        self.purpose = purpose
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> StateLock:
        """Take the lock without waiting; returns ``self``.

        Raises
        ------
        StateLocked
            Another process (or another holder in this one) has it; the message names its
            pid, what it runs and the lock file.
        """
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StateLocked(
                f"the state folder {self.path.parent} is in use by {holder}: it holds the "
                f"lock {self.path}. Only one daemon, or one score or rescore run, may use a "
                "database at a time: stop that process first (systemctl stop mrrp-pacs), or "
                "let the daemon do the work (it scores every [scoring] interval_s)",
                source=str(self.path)) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.purpose}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock back (the file stays: removing it would race the next holder)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        # a full or read-only disk may refuse: a stale pid is only ever read by a refusal
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> StateLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> str:
    """``pid N (serve)`` as the holder wrote it, or a plainer phrase when it has not yet."""
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").split()
    except OSError:
        text = []
    if text and text[0].isdigit():
        purpose = f" ({' '.join(text[1:])})" if len(text) > 1 else ""
        return f"pid {text[0]}{purpose}"
    return "another process (pid not yet written)"
