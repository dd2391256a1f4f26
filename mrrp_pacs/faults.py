"""Named fault points: where the reliability tests make the daemon fail on purpose.

A fault point is a call, ``fault_point("extract", key)``, at a place where a real failure can
happen (a worker that raises, dies or runs out of memory). It does nothing unless the
environment variable ``MRRP_FAULTS`` names it, as a comma-separated list of
``POINT[@KEY]=ACTION``:

=================  ==============================================================
``raise``          raise :class:`InjectedFault` (a RuntimeError)
``kill``           SIGKILL this process (a crash: nothing runs after it)
``alloc:MIB``      allocate and touch MIB mebibytes, then hold them 30 s (a memory hog)
``sleep:S``        sleep S seconds (a hang)
=================  ==============================================================

``@KEY`` limits the fault to calls with that key (e.g. one patient key); an action ending in
``#N`` acts only on the N-th matching call in this process (``intake.hl7.committed=kill#3``:
the third message stored kills the daemon). The variable is read at every call, so a test sets
it before it starts the process under test; a process started without it (the product) pays one
dictionary lookup per call.
"""

from __future__ import annotations

import os
import signal
import threading
import time

VARIABLE = "MRRP_FAULTS"
_calls: dict[str, int] = {}  # matching calls so far, per fault item (for ``#N``)
_lock = threading.Lock()


class InjectedFault(RuntimeError):
    """The failure a ``raise`` fault point throws."""


def fault_point(name: str, key: str | None = None) -> None:
    """Fail here as ``MRRP_FAULTS`` says, if it names this point (and key)."""
    spec = os.environ.get(VARIABLE)
    if not spec:
        return
    for item in spec.split(","):
        where, _, action = item.strip().partition("=")
        point, _, wanted = where.partition("@")
        if point != name or (wanted and wanted != key):
            continue
        action, _, nth = action.partition("#")
        if nth:
            with _lock:
                _calls[item] = count = _calls.get(item, 0) + 1
            if count != int(nth):
                continue
        verb, _, argument = action.partition(":")
        if verb == "raise":
            raise InjectedFault(f"fault injected at {name}")
        if verb == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if verb == "alloc":
            hog = bytearray(int(argument) * 1024 * 1024)
            for offset in range(0, len(hog), 4096):  # touch every page: resident, not reserved
                hog[offset] = 1
            time.sleep(30)
            del hog
        if verb == "sleep":
            time.sleep(float(argument))
