import os

from builders import Patient, encode, mllp, pathology_result, us_image, us_report, write

from listeners.file_drop import find_files, ingest_paths


def _drop_folder(root):
    patient = Patient()
    write(us_image(patient), root / "us" / "IMG0001")              # no extension
    write(us_image(patient), root / "us" / "report.txt")           # misleading extension
    (root / "hl7").mkdir()
    (root / "hl7" / "us.hl7").write_bytes(us_report(patient, end="\n"))
    (root / "hl7" / "batch.mllp").write_bytes(
        mllp(pathology_result(patient, "B1")) + mllp(pathology_result(Patient("X2"), "B2")))
    data = encode(us_image(patient))
    (root / "bad").mkdir()
    (root / "bad" / "truncated.dcm").write_bytes(data[: len(data) // 3])
    (root / "bad" / "random.bin").write_bytes(os.urandom(4096))
    (root / "bad" / "empty.dcm").write_bytes(b"")
    (root / "bad" / "notes.txt").write_text("not a message\n")
    (root / "bad" / "broken.hl7").write_bytes(b"MSH|^~\\&|A|B|C|D|2026||ORU^R01||P|2.5\r")
    (root / ".hidden").write_bytes(data)


def test_ingest_walks_folders_and_is_idempotent(intake, store, tmp_path):
    root = tmp_path / "drop"
    _drop_folder(root)
    first = ingest_paths(intake, [root])
    assert first.new == 5 and first.duplicate == 0
    assert first.new_by_kind == {"dicom": 2, "hl7": 3}
    reasons = {os.path.basename(r.path): r.reason for r in first.rejected}
    assert set(reasons) == {"truncated.dcm", "random.bin", "empty.dcm", "notes.txt", "broken.hl7"}
    assert "truncated" in reasons["truncated.dcm"]
    assert "neither DICOM" in reasons["random.bin"]
    assert reasons["empty.dcm"] == "is empty"
    assert "MSH-10" in reasons["broken.hl7"]

    tables = ("instances", "hl7_messages", "observations", "reports", "clinical_values", "rois")
    counts = {t: store.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}
    second = ingest_paths(intake, [root])
    assert (second.new, second.duplicate, len(second.rejected)) == (0, 5, 5)
    assert counts == {t: store.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                      for t in tables}


def test_find_files_is_sorted_and_skips_hidden(tmp_path):
    for name in ("b/2", "b/1", "a", ".x/y", "c/.z"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_files([tmp_path])]
    assert found == ["a", "b/1", "b/2"]
