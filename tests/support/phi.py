"""Patient identifiers of a phantom, and the log lines that quote any of them.

Logs and metrics must never hold a patient's name, ID, accession number or birth date
(docs/operator-guide.md "Logs"). :func:`phantom_identifiers` reads them from a phantom's
DICOM headers and HL7 messages as they are sent; :func:`leaks` finds the lines quoting any,
in the forms they take there: IDs and accession numbers as written, names as written
(``family^given``) and each part, birth dates as ``YYYYMMDD`` and ISO ``YYYY-MM-DD``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pydicom

from mrrp_pacs.hl7.message import parse_message, split_messages

# name parts this short, or the phantom's issuer (its family name), are words, not names
MIN_NAME_PART = 4
TAGS = ["PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber", "PatientBirthDate"]


def phantom_identifiers(phantom: Path, issuer: str = "PHANTOM") -> dict[str, str]:
    """Each identifier of the phantom's patients → what it is (for the failure message)."""
    found: dict[str, str] = {}
    for path in sorted((phantom / "dicom").rglob("*")):
        if not path.is_file():
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=TAGS)
        for key in ("PatientID", "AccessionNumber"):
            _add(found, str(ds.get(key, "")), key)
        _name(found, str(ds.get("PatientName", "")), issuer)
        _date(found, str(ds.get("PatientBirthDate", "")))
    for path in sorted((phantom / "hl7").glob("*.hl7")):
        for raw in split_messages(path.read_bytes()):
            message = parse_message(raw)
            pid = message.segment("PID")
            for repetition in message.field(pid, 3).split("~"):
                _add(found, repetition.split("^")[0], "PID-3")
            _name(found, message.field(pid, 5).split("~")[0], issuer)
            _date(found, message.field(pid, 7)[:8])
            for obr in (s for s in message.segments if s.name == "OBR"):
                for number in (2, 3, 18):
                    _add(found, message.field(obr, number).split("^")[0], f"OBR-{number}")
    return found


def leaks(text: str, identifiers: dict[str, str]) -> list[str]:
    """The lines of ``text`` that quote an identifier, each with what it quotes."""
    patterns = {value: re.compile(
        (r"(?<!\d)" if value[0].isdigit() else r"(?<![A-Za-z0-9])") + re.escape(value)
        + (r"(?!\d)" if value[-1].isdigit() else r"(?![A-Za-z0-9])"))
        for value in identifiers}
    found = []
    for line in text.splitlines():
        hits = [f"{identifiers[v]} {v!r}" for v, p in patterns.items() if p.search(line)]
        if hits:
            found.append(f"{', '.join(hits)}: {line}")
    return found


def _add(found: dict[str, str], value: str, what: str) -> None:
    value = value.strip()
    if value:
        found.setdefault(value, what)


def _name(found: dict[str, str], name: str, issuer: str) -> None:
    if not name.strip("^ "):
        return
    _add(found, name, "patient name")
    _add(found, " ".join(p for p in name.split("^") if p), "patient name")
    for part in re.split(r"[\^ ]", name):
        if len(part) >= MIN_NAME_PART and part != issuer:
            _add(found, part, "patient name part")


def _date(found: dict[str, str], value: str) -> None:
    if re.fullmatch(r"\d{8}", value):
        _add(found, value, "birth date")
        _add(found, f"{value[:4]}-{value[4:6]}-{value[6:]}", "birth date (ISO)")
