"""The external programs later tests rely on are installed (``make test`` installs them).

These fail, never skip, when a tool is missing: a missing tool is a broken set-up. Like every
test that runs a program, they are left out of the quick tier (tests/support/tools.py).
"""

import subprocess

import pytest
from builders import Patient, us_image, write
from tools import tool
from validators import dciodvfy_report


@pytest.mark.parametrize(("program", "args"), [
    pytest.param("storescu", ["--version"], marks=pytest.mark.needs_tool("storescu")),  # dcmtk
    pytest.param("dsrdump", ["--version"], marks=pytest.mark.needs_tool("dsrdump")),  # dcmtk
    pytest.param("Rscript", ["--version"], marks=pytest.mark.needs_tool("Rscript")),
])
def test_program_runs(program, args):
    subprocess.run([tool(program), *args], capture_output=True, timeout=60)


@pytest.mark.needs_tool("dciodvfy")
def test_dciodvfy_checks_a_file(tmp_path):
    """dicom3tools' validator runs and reads the attributes of a real object."""
    path = write(us_image(Patient()), tmp_path / "us.dcm")
    assert "USImage" in dciodvfy_report(path)  # it names the IOD it checked against


@pytest.mark.needs_tool("Orthanc")
def test_orthanc_is_installed():
    result = subprocess.run([tool("Orthanc"), "--version"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "1." in result.stdout


@pytest.mark.needs_tool("Rscript")
def test_r_survival_package_loads():
    result = subprocess.run(
        [tool("Rscript"), "-e", "suppressMessages(library(survival)); cat(as.character("
         "packageVersion('survival')))"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()[0].isdigit()


@pytest.mark.needs_tool("Rscript", "riskRegression", "pec")
def test_r_risk_score_packages_load():
    """The packages of tests/reference/ipcw_scores.R (found where Debian installs them by
    tools.py, and loadable by Rscript)."""
    assert tool("riskRegression") and tool("pec")
    result = subprocess.run(
        [tool("Rscript"), "-e", "suppressMessages({library(riskRegression); library(pec)}); "
         "cat(format(packageVersion('riskRegression')), format(packageVersion('pec')))"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(version[0].isdigit() for version in result.stdout.split())
