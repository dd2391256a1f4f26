"""A private Orthanc PACS for tests: own storage, free ports, talked to on 127.0.0.1 only.

Orthanc 1.10 cannot choose its bind address (it listens on all interfaces), so ``make test``
runs pytest inside a private network namespace when it can; either way tests only connect to
127.0.0.1, HTTP access from other hosts is refused (RemoteAccessAllowed false) and no plugin
is loaded.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int
    aet: str
    workdir: Path

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.http_port}{path}", timeout=30) as r:
            return json.load(r)

    def statistics(self) -> dict[str, Any]:
        return self.get("/statistics")


@contextmanager
def running_orthanc(workdir: Path, aet: str = "ORTHANC",
                    modalities: dict[str, list[object]] | None = None) -> Iterator[Orthanc]:
    """Start Orthanc with storage in ``workdir``; stop it (and wait) on exit."""
    assert Path(ORTHANC).exists(), "Orthanc is not installed: run `make test` (it installs it)"
    workdir.mkdir(parents=True, exist_ok=True)
    server = Orthanc(free_port(), free_port(), aet, workdir)
    config = {
        "Name": "mrrp-pacs-test",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "HttpPort": server.http_port,
        "DicomPort": server.dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomCheckCalledAet": True,
        "DicomModalities": modalities or {},
        "StableAge": 1,
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = (workdir / "orthanc.log").open("wb")
    process = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                server.get("/system")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Orthanc did not start; see "
                                       f"{workdir / 'orthanc.log'}") from None
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def storescu(server: Orthanc, folder: Path) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu over every file under ``folder``.

    ``-R`` proposes only the SOP classes found; ``-xy`` offers JPEG baseline in its own
    presentation context so compressed tiles are not sent to be transcoded.
    """
    return subprocess.run(
        ["storescu", "-R", "-xy", "-aet", "MRRPTEST", "-aec", server.aet, "+sd", "+r",
         LOOPBACK, str(server.dicom_port), str(folder)],
        capture_output=True, text=True, timeout=300)
