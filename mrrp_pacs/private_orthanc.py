"""A private Orthanc PACS (Debian package ``orthanc``) for the demo and the tests.

Its own storage folder, free loopback ports, no plugin unless asked for. Orthanc 1.10 cannot
choose its bind address (it listens on every interface), so it is configured to refuse HTTP
from other hosts and DICOM from unknown AEs, and ``make demo`` / ``make test`` run it in a
private network namespace when they can. Callers connect to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mrrp_pacs.errors import OrthancUnavailable

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
"""Debian package orthanc-dicomweb (``dpkg -L orthanc-dicomweb``)."""
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 30


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def installed() -> bool:
    return Path(ORTHANC).exists()


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    aet: str
    workdir: Path
    pid: int = 0  # of the Orthanc process (a test pauses it with SIGSTOP to make it hang)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def get(self, path: str) -> Any:
        """GET a REST resource (JSON)."""
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as answer:  # noqa: S310
            return json.load(answer)

    def statistics(self) -> dict[str, Any]:
        return dict(self.get("/statistics"))


@contextmanager
def running_orthanc(workdir: Path, aet: str = "ORTHANC",
                    modalities: dict[str, list[object]] | None = None,
                    plugins: list[Path] | None = None,
                    extra: dict[str, Any] | None = None,
                    ports: tuple[int, int] | None = None) -> Iterator[Orthanc]:
    """Start Orthanc with its storage in ``workdir``; stop it (and wait) on exit.

    Parameters
    ----------
    workdir
        Its configuration, log, storage and index; a relative folder is taken against the
        current directory (Orthanc itself would take the paths in its configuration against
        the configuration file's folder, so every path it is given is absolute).
    modalities
        ``DicomModalities``: AEs allowed to query/store and the C-MOVE destinations,
        e.g. ``{"MRRP": ["MRRP", "127.0.0.1", 11112]}``.
    plugins
        Plugin shared libraries to load (none by default; Orthanc otherwise loads every
        plugin of the system folder).
    extra
        Further configuration keys.
    ports
        (HTTP, DICOM) ports; free ones by default. Given, an Orthanc started again on the
        same ``workdir`` comes back where its peers knew it (a PACS restarted).

    Raises
    ------
    OrthancUnavailable
        Not installed, or not answering within 30 s (see ``workdir/orthanc.log``).
    """
    if not installed():
        raise OrthancUnavailable("Orthanc is not installed: `apt-get install orthanc` (make test "
                                 "and make demo do it when run as root)")
    for plugin in plugins or []:
        if not plugin.is_file():
            raise OrthancUnavailable(f"Orthanc plugin {plugin} is not installed (the DICOMweb "
                                     "plugin: apt-get install orthanc-dicomweb)")
    workdir = workdir.expanduser().absolute()
    plugins = [plugin.expanduser().absolute() for plugin in plugins or []]
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = ports or (free_port(), free_port())
    server = Orthanc(http_port, dicom_port, aet, workdir)
    config = {
        "Name": "mrrp-pacs-private",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpPort": server.http_port,
        "DicomPort": server.dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [str(plugin) for plugin in plugins],
        "DicomCheckCalledAet": True,
        "DicomModalities": modalities or {},
        "StableAge": 1,
        **(extra or {}),
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    with (workdir / "orthanc.log").open("wb") as log:
        process = subprocess.Popen([ORTHANC, str(config_path)], stdout=log,
                                   stderr=subprocess.STDOUT)
        server.pid = process.pid
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    server.get("/system")
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise OrthancUnavailable(
                            f"Orthanc did not start; see {workdir / 'orthanc.log'}") from None
                    time.sleep(0.2)
            yield server
        finally:
            process.send_signal(signal.SIGCONT)  # a paused Orthanc cannot act on SIGTERM
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
