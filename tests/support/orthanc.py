"""The private Orthanc of the tests: the package's runner (mrrp_pacs.private_orthanc), plus
dcmtk's storescu to load it.

Orthanc 1.10 cannot choose its bind address (it listens on all interfaces), so ``make test``
runs pytest inside a private network namespace when it can; either way tests only connect to
127.0.0.1, HTTP access from other hosts is refused (RemoteAccessAllowed false) and no plugin
is loaded unless a test names one (the viewer test loads the DICOMweb plugin).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from mrrp_pacs.private_orthanc import (
    DICOMWEB_PLUGIN,
    LOOPBACK,
    Orthanc,
    free_port,
    running_orthanc,
)

__all__ = ["DICOMWEB_PLUGIN", "LOOPBACK", "Orthanc", "free_port", "running_orthanc", "storescu"]


def storescu(server: Orthanc, folder: Path) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu over every file under ``folder``.

    ``-R`` proposes only the SOP classes found; ``-xy`` offers JPEG baseline in its own
    presentation context so compressed tiles are not sent to be transcoded.
    """
    return subprocess.run(
        ["storescu", "-R", "-xy", "-aet", "MRRPTEST", "-aec", server.aet, "+sd", "+r",
         LOOPBACK, str(server.dicom_port), str(folder)],
        capture_output=True, text=True, timeout=300)
