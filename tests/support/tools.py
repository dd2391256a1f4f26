"""The external programs (and the one plugin file) that tests run, the Debian package of each,
and the one way a test finds them.

A test that runs one says so: ``@pytest.mark.needs_tool("dciodvfy")`` (a module may set
``pytestmark``). Every such test is also ``e2e`` (tests/conftest.py adds the mark), so the quick
tier, ``pytest -m "not e2e"`` (``make test-quick``), runs on a machine without any of them, and
``make test`` installs them and runs every test. Nothing is skipped: a declared tool that is
missing fails the test with the apt-get command that installs it, and :func:`tool` fails a test
that runs a tool it did not declare, so the quick tier cannot come to need one unnoticed.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from mrrp_pacs.private_orthanc import DICOMWEB_PLUGIN, ORTHANC

APT = "apt-get install -y --no-install-recommends"
R_SITE_LIBRARY = Path("/usr/lib/R/site-library")


@dataclass(frozen=True)
class Tool:
    package: str
    """The Debian package that installs it (``make test-tools`` installs all but Node.js)."""
    path: Path | None = None
    """Where it must be when not looked up on PATH."""
    note: str = ""
    """What else to know when installing it."""

    def find(self, name: str) -> str | None:
        if self.path is not None:
            return str(self.path) if self.path.exists() else None
        return shutil.which(name)


TOOLS: dict[str, Tool] = {
    "Rscript": Tool("r-cran-survival"),  # the reference scripts load R's survival package
    # R packages (tests/reference/ipcw_scores.R): where Debian's packages install them
    "riskRegression": Tool("r-cran-riskregression", R_SITE_LIBRARY / "riskRegression"),
    "pec": Tool("r-cran-pec", R_SITE_LIBRARY / "pec"),
    "dciodvfy": Tool("dicom3tools"),
    "dsrdump": Tool("dcmtk"),
    "echoscu": Tool("dcmtk"),
    "storescu": Tool("dcmtk"),
    # the path the product starts (PATH, else Debian's /usr/sbin, which is not on every PATH)
    "Orthanc": Tool("orthanc", Path(ORTHANC)),
    "libOrthancDicomWeb.so": Tool("orthanc-dicomweb", DICOMWEB_PLUGIN),
    "OrthancWSIDicomizer": Tool("orthanc-wsi"),  # writes slides as another producer would
    "openssl": Tool("openssl"),  # makes the TLS tests' certificates (tests/support/certs.py)
    "pdftoppm": Tool("poppler-utils"),
    "pdftotext": Tool("poppler-utils"),
    "chromium": Tool("chromium"),
    "node": Tool("nodejs", note="Node.js 20 or newer with npm: Debian 12's is older "
                 "(docs/operator-guide.md, section 1)"),
}

_running: pytest.Item | None = None
"""The test being run (set by tests/conftest.py), whose ``needs_tool`` marks :func:`tool` reads."""


def declared(item: pytest.Item) -> list[str]:
    """The tools ``item``'s ``needs_tool`` marks name (its own, its class's, its module's)."""
    return [name for mark in item.iter_markers("needs_tool") for name in mark.args]


def unknown(names: list[str]) -> list[str]:
    return [name for name in names if name not in TOOLS]


def missing_message(names: list[str]) -> str | None:
    """What to install when some of ``names`` are missing; None when all are there."""
    absent = [name for name in names if TOOLS[name].find(name) is None]
    if not absent:
        return None
    packages = " ".join(dict.fromkeys(TOOLS[name].package for name in absent))
    notes = "".join(f"; {TOOLS[name].note}" for name in absent if TOOLS[name].note)
    return (f"{', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not installed: "
            f"{APT} {packages} (`make test` installs every test tool){notes}")


def running(item: pytest.Item | None) -> None:
    """Tell :func:`tool` which test runs now (None between tests)."""
    global _running
    _running = item


def tool(name: str) -> str:
    """Path of ``name``; fails the test when it is missing or the test did not declare it."""
    if name not in TOOLS:
        pytest.fail(f"{name} is not a known test tool: add it to TOOLS in {__file__}")
    if _running is not None and name not in declared(_running):
        pytest.fail(f"{_running.nodeid} runs {name} without @pytest.mark.needs_tool({name!r}): "
                    f"the quick tier (pytest -m 'not e2e') would run it where {name} is "
                    "not installed", pytrace=False)
    found = TOOLS[name].find(name)
    if found is None:
        pytest.fail(str(missing_message([name])), pytrace=False)
    return found
