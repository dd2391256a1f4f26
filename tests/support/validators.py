"""dicom3tools' dciodvfy, the independent judge of every DICOM object we write."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

# dciodvfy knows only the standard coding scheme designators; ours is declared in the object
PRIVATE_SCHEME_WARNING = ("Warning - Unrecognized defined term <99MRRP> for value 1 of "
                          "attribute <Coding Scheme Designator>")


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) dciodvfy prints for ``path``."""
    assert shutil.which("dciodvfy"), "dciodvfy (Debian package dicom3tools) is not installed"
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return ([line for line in lines if line.startswith("Error")],
            [line for line in lines if line.startswith("Warning")])
