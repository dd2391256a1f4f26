"""The check tests/test_daemon_e2e.py runs over the daemon's log and metrics (tests/support/
phi.py) finds every kind of identifier a phantom carries, and only those."""

from phi import leaks, phantom_identifiers

from mrrp_pacs.phantom.generator import PhantomSpec, generate


def test_every_kind_of_phantom_identifier_is_found_in_a_line_and_nothing_else(tmp_path):
    generate(PhantomSpec(patients=2, seed=5, slide_px=1024, missing_wsi=0.0, missing_us=0.0,
                         missing_report=0.0), tmp_path, workers=1)
    identifiers = phantom_identifiers(tmp_path)
    kinds = set(identifiers.values())
    assert {"PatientID", "AccessionNumber", "patient name", "birth date",
            "birth date (ISO)"} <= kinds
    by_kind = {what: value for value, what in identifiers.items()}
    mrn, accession = by_kind["PatientID"], by_kind["AccessionNumber"]
    born, born_iso = by_kind["birth date"], by_kind["birth date (ISO)"]
    clean = ("2031-03-09 09:30:00,123 INFO listeners.mllp: HL7 c:0123456789 from 127.0.0.1:5000:"
             " AA sent, stored as row 4\n"
             "mrrp_exports{state=\"sent\"} 48\n"
             f"stored DICOM instance row 1{born}7 (US, 1234 bytes)")  # digits around: no date
    assert leaks(clean, identifiers) == []
    planted = [f"DEBUG x: scoring patient {mrn}^^^PHANTOM", f"INFO y: accession {accession}",
               f"WARNING z: born {born}", f"born={born_iso}", f"name PHANTOM^{mrn}"]
    found = leaks("\n".join([clean, *planted]), identifiers)
    assert [line.split(": ", 1)[1] for line in found] == planted
