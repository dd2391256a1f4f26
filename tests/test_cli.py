import json
import subprocess
import sys
from pathlib import Path

from builders import Patient, pathology_result, us_image, us_report, write
from click.testing import CliRunner

from mrrp_pacs.cli import main
from mrrp_pacs.store.migrations import available_migrations

SCRIPT = Path(sys.executable).parent / "mrrp-pacs"


def _drop(root: Path) -> None:
    patient = Patient("C1")
    write(us_image(patient), root / "img.dcm")
    (root / "report.hl7").write_bytes(us_report(patient))
    (root / "path.hl7").write_bytes(pathology_result(patient))
    (root / "junk.bin").write_bytes(b"\x00\x01" * 100)


def test_console_script_lists_every_subcommand():
    result = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, check=True)
    commands = result.stdout.split("Commands:")[1].strip().splitlines()
    names = [line.split()[0] for line in commands]
    assert names == sorted(main.commands)
    assert all(len(line.split(maxsplit=1)) == 2 for line in commands)  # each has its one line


def test_ingest_json_then_cases_json(tmp_path):
    _drop(tmp_path / "drop")
    db = tmp_path / "state" / "m.sqlite3"
    runner = CliRunner()
    first = runner.invoke(main, ["ingest", str(tmp_path / "drop"), "--db", str(db), "--json"])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["new"] == 3 and summary["duplicate"] == 0
    assert [r["path"].endswith("junk.bin") for r in summary["rejected"]] == [True]
    second = json.loads(runner.invoke(
        main, ["ingest", str(tmp_path / "drop"), "--db", str(db), "--json"]).stdout)
    assert (second["new"], second["duplicate"]) == (0, 3)
    assert (tmp_path / "state" / "objects").is_dir()

    cases = json.loads(runner.invoke(main, ["cases", "--db", str(db), "--json"]).stdout)
    assert cases == [{
        "patient_key": "C1^^^HOSP", "patient_id": "C1", "issuer": "HOSP",
        "modalities": ["us_image", "us_report", "clinical"],
        "clinical_variables": sorted(cases[0]["clinical_variables"]),
        "ready": True, "missing": ["wsi", "wsi_roi", "us_roi"],
        "features": [], "flags": [],  # nothing extracted yet
    }]
    table = runner.invoke(main, ["cases", "--db", str(db)]).output
    assert "C1^^^HOSP" in table and "READY" in table and "9/9" in table


def test_text_summary_names_rejections(tmp_path):
    _drop(tmp_path / "drop")
    result = CliRunner().invoke(main, ["ingest", str(tmp_path / "drop"), "--db",
                                       str(tmp_path / "m.sqlite3")])
    assert result.exit_code == 0
    assert "4 files: 3 new (1 DICOM, 2 HL7), 0 duplicate, 1 rejected" in result.output
    assert "junk.bin: is neither DICOM Part 10, an HL7 v2 message nor a region sidecar" \
        in result.output


def test_bad_config_is_reported_with_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[identity]\nmatch = "soundex"\n')
    result = CliRunner().invoke(main, ["--config", str(bad), "cases"])
    assert result.exit_code == 1
    assert "identity.match = 'soundex' is invalid" in result.output


def test_unusable_database_paths_are_reported(tmp_path):
    (tmp_path / "afile").write_text("x")
    runner = CliRunner()
    result = runner.invoke(main, ["cases", "--db", str(tmp_path / "afile" / "m.sqlite3")])
    assert result.exit_code == 1
    assert f"{tmp_path / 'afile'}: is not a folder" in result.output
    (tmp_path / "garbage.sqlite3").write_text("not a database")
    result = runner.invoke(main, ["cases", "--db", str(tmp_path / "garbage.sqlite3")])
    assert result.exit_code == 1
    assert "database cannot be used (file is not a database)" in result.output


def test_migrate_and_config_commands(tmp_path):
    db = tmp_path / "m.sqlite3"
    runner = CliRunner()
    migrated = runner.invoke(main, ["migrate", "--db", str(db)])
    assert migrated.exit_code == 0
    assert f"schema version {len(available_migrations())}" in migrated.output
    shown = runner.invoke(main, ["config", "--db", str(db)])
    assert shown.exit_code == 0 and f"# database: {db}" in shown.output
    assert 'match = "id+issuer"' in shown.output


def test_demo_replaces_its_own_output_folder(tmp_path):
    from mrrp_pacs.demo import DEMO_MARKER, _prepare

    out = tmp_path / "demo"
    _prepare(out)
    (out / "old-result.txt").write_text("from the last run")
    _prepare(out)
    assert sorted(p.name for p in out.iterdir()) == [DEMO_MARKER]


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["demo", "--patients", "16", "--out", str(tmp_path)])
    assert result.exit_code == 1 and "was not made by the demo" in result.output
    assert (tmp_path / "precious.txt").read_text() == "keep me"
