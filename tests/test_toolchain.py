"""The external programs later tests rely on are installed (``make test`` installs them).

These fail, never skip, when a tool is missing: a missing tool is a broken set-up.
"""

import shutil
import subprocess

import pytest
from builders import Patient, us_image, write


@pytest.mark.parametrize(("program", "args"), [
    ("storescu", ["--version"]),      # dcmtk
    ("dsrdump", ["--version"]),       # dcmtk
    ("Rscript", ["--version"]),
])
def test_program_runs(program, args):
    path = shutil.which(program)
    assert path, f"{program} is not installed: run `make test` (it installs test tools)"
    subprocess.run([path, *args], capture_output=True, timeout=60)


def test_dciodvfy_checks_a_file(tmp_path):
    """dicom3tools' validator runs and reads the attributes of a real object."""
    path = write(us_image(Patient()), tmp_path / "us.dcm")
    assert shutil.which("dciodvfy"), "dciodvfy (dicom3tools) is not installed"
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    assert "USImage" in result.stdout + result.stderr  # it names the IOD it checked against


def test_orthanc_is_installed():
    path = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "1." in result.stdout


def test_r_survival_package_loads():
    result = subprocess.run(
        ["Rscript", "-e", "suppressMessages(library(survival)); cat(as.character("
         "packageVersion('survival')))"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()[0].isdigit()
