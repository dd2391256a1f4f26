"""dicom3tools' dciodvfy, the independent judge of every DICOM object we write (a test that
calls it declares ``@pytest.mark.needs_tool("dciodvfy")``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tools import tool

# dciodvfy knows only the standard coding scheme designators; ours is declared in the object
PRIVATE_SCHEME_WARNING = ("Warning - Unrecognized defined term <99MRRP> for value 1 of "
                          "attribute <Coding Scheme Designator>")


def dciodvfy_report(path: Path) -> str:
    """Everything dciodvfy prints for ``path`` (it names the IOD it checked against)."""
    run = subprocess.run([tool("dciodvfy"), str(path)], capture_output=True, text=True,
                         timeout=120)
    return run.stdout + run.stderr


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) dciodvfy prints for ``path``."""
    lines = dciodvfy_report(path).splitlines()
    return ([line for line in lines if line.startswith("Error")],
            [line for line in lines if line.startswith("Warning")])
