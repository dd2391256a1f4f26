"""The private Orthanc of the tests: the package's runner (mrrp_pacs.private_orthanc), plus
dcmtk's storescu to load it. A test that uses them declares
``@pytest.mark.needs_tool("Orthanc")`` (and ``"storescu"``): see tests/support/tools.py.

Orthanc 1.10 cannot choose its bind address (it listens on all interfaces), so ``make test``
runs pytest inside a private network namespace when it can; either way tests only connect to
127.0.0.1, HTTP access from other hosts is refused (RemoteAccessAllowed false) and no plugin
is loaded unless a test names one (the viewer test loads the DICOMweb plugin).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tools import tool

from mrrp_pacs import private_orthanc
from mrrp_pacs.private_orthanc import DICOMWEB_PLUGIN, LOOPBACK, Orthanc, free_port

__all__ = ["DICOMWEB_PLUGIN", "LOOPBACK", "Orthanc", "free_port", "running_orthanc", "storescu"]


@contextmanager
def running_orthanc(workdir: Path, aet: str = "ORTHANC",
                    modalities: dict[str, list[object]] | None = None,
                    plugins: list[Path] | None = None,
                    ports: tuple[int, int] | None = None,
                    extra: dict[str, object] | None = None) -> Iterator[Orthanc]:
    """:func:`mrrp_pacs.private_orthanc.running_orthanc`, once the test has declared Orthanc
    (and each plugin it loads) and they are installed; ``extra``: further configuration
    keys (e.g. ``LuaScripts``)."""
    tool("Orthanc")
    for plugin in plugins or []:
        tool(plugin.name)
    with private_orthanc.running_orthanc(workdir, aet, modalities, plugins, extra=extra,
                                         ports=ports) as server:
        yield server


def storescu(server: Orthanc, folder: Path) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu over every file under ``folder``.

    ``-R`` proposes only the SOP classes found; ``-xy`` offers JPEG baseline in its own
    presentation context so compressed tiles are not sent to be transcoded.
    """
    return subprocess.run(
        [tool("storescu"), "-R", "-xy", "-aet", "MRRPTEST", "-aec", server.aet, "+sd", "+r",
         LOOPBACK, str(server.dicom_port), str(folder)],
        capture_output=True, text=True, timeout=300)
