import dataclasses
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from builders import Patient, pathology_result, us_image, us_report, write
from click.testing import CliRunner

from mrrp_pacs.cli import main
from mrrp_pacs.config import Config, load_config
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
        # an ultrasound image without a slide: scoring waits [scoring] wait_hours for it
        "ready": False, "readiness": "waiting", "reason": cases[0]["reason"],
        "missing": ["wsi", "wsi_roi", "us_roi"],
        "features": [], "flags": [],  # nothing extracted yet
    }]
    assert cases[0]["reason"].startswith("waiting for wsi until ")
    table = runner.invoke(main, ["cases", "--db", str(db)]).output
    assert "C1^^^HOSP" in table and "waiting" in table and "9/9" in table
    assert table.splitlines()[-1] == "1 patients: 0 ready, 1 waiting, 0 incomplete"


def _site(tmp_path, **scoring):
    """A config file with state under tmp_path (and [scoring] keys)."""
    path = tmp_path / "mrrp.toml"
    path.write_text(f'[paths]\ndata_dir = "{tmp_path / "state"}"\n[scoring]\n'
                    + "".join(f"{k} = {v}\n" for k, v in scoring.items()))
    return path


def test_cases_use_the_readiness_words_of_scoring(tmp_path):
    """ready / waiting / incomplete as scoring.readiness decides, wait window included."""
    drop = tmp_path / "drop"
    waiting, no_image, no_values = Patient("W1"), Patient("N1"), Patient("V1")
    write(us_image(waiting), drop / "w.dcm")
    (drop / "w.hl7").write_bytes(pathology_result(waiting, "PA-W1"))
    (drop / "n.hl7").write_bytes(pathology_result(no_image, "PA-N1"))
    write(us_image(no_values), drop / "v.dcm")
    config = _site(tmp_path)
    runner = CliRunner()
    assert runner.invoke(main, ["--config", str(config), "ingest", str(drop)]).exit_code == 0
    found = {c["patient_id"]: c for c in json.loads(runner.invoke(
        main, ["--config", str(config), "cases", "--json"]).stdout)}
    assert {k: (c["readiness"], c["ready"]) for k, c in found.items()} == {
        "W1": ("waiting", False), "N1": ("incomplete", False), "V1": ("incomplete", False)}
    assert found["N1"]["reason"] == "no slide and no ultrasound image"
    assert found["V1"]["reason"] == "no final clinical values"
    # once the wait window is over the case is ready (scored with the slide compensated)
    waited = _site(tmp_path, wait_hours=0)
    table = runner.invoke(main, ["--config", str(waited), "cases"]).output
    assert table.splitlines()[-1] == "3 patients: 1 ready, 0 waiting, 2 incomplete"
    assert "READY" in next(line for line in table.splitlines() if line.startswith("W1"))


def test_score_and_rescore_without_a_model_fail_clearly_and_are_recorded(tmp_path):
    drop = tmp_path / "drop"
    patient = Patient("S1")
    write(us_image(patient), drop / "s.dcm")
    (drop / "s.hl7").write_bytes(pathology_result(patient))
    config = _site(tmp_path, wait_hours=0)
    runner = CliRunner()
    assert runner.invoke(main, ["--config", str(config), "ingest", str(drop)]).exit_code == 0
    for command in ("score", "rescore"):
        result = runner.invoke(main, ["--config", str(config), command])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert "Traceback" not in result.output
        assert f"Error: no model mrrp in the model store {tmp_path / 'state' / 'models'} yet: " \
               "nothing was scored (1 ready, 0 waiting for a modality, 0 incomplete)" \
               in result.output
    result = runner.invoke(main, ["--config", str(config), "score", "--json"])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert (report["no_model"], report["due"], report["waiting"]) == (True, 1, 0)
    assert report["error"].startswith("no model mrrp")
    with sqlite3.connect(tmp_path / "state" / "mrrp.sqlite3") as conn:
        jobs = conn.execute("SELECT kind, state, error FROM jobs ORDER BY id").fetchall()
    assert [(kind, state) for kind, state, _ in jobs] == [
        ("process", "failed"), ("rescore", "failed"), ("process", "failed")]
    assert all(error.startswith("no model mrrp/mrrp in ") for _, _, error in jobs)


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


def test_config_output_loads_back_as_the_same_config_with_secrets_redacted(tmp_path):
    site = tmp_path / "etc"
    site.mkdir()
    source = site / "mrrp.toml"
    source.write_text(
        '[paths]\ndata_dir = "rel dir"\nmodel_store = "/srv/models"\n'
        '[features]\ntarget_mpp = 0.25\nus_default_mm_per_px = 2\nbf16 = true\n'
        'encoder_checkpoints = { uni = "/m/\\"q\\"\\\\x \u00b5m" }\n'
        'findings_patterns = ["Befund:\\\\s*(.*)", "tab\\there"]\n'
        '[scoring]\nwait_hours = 1.5\n[dicom]\nallowed_aes = ["PACS", "MOD 1"]\n'
        '[export]\nuid_secret = "hospital-secret-42"\n')
    loaded = load_config(source, environ={})
    printed = CliRunner().invoke(main, ["--config", str(source), "config"])
    assert printed.exit_code == 0, printed.output
    assert "hospital-secret-42" not in printed.output
    assert "# uid_secret = (set, not shown: secrets are redacted)" in printed.output
    assert "target_mpp = 0.25\n" in printed.output and "wait_hours = 1.5\n" in printed.output
    elsewhere = tmp_path / "copy" / "printed.toml"  # relative paths were resolved
    elsewhere.parent.mkdir()
    elsewhere.write_text(printed.output)
    again = load_config(elsewhere, environ={})
    assert again.features.target_mpp == 0.25 and again.paths.data_dir == site / "rel dir"
    assert again.export.uid_secret == Config().export.uid_secret  # redacted: the default
    assert dataclasses.replace(again, source="") == dataclasses.replace(
        loaded.replace("export", uid_secret=Config().export.uid_secret), source="")

    # a configuration still on the public default secret round-trips exactly, and says so
    printed = CliRunner().invoke(main, ["config"]).output
    assert 'uid_secret = "mrrp-pacs"  # the public default: set your own' in printed
    elsewhere.write_text(printed)
    defaults = load_config(None, environ={})
    defaults = defaults.replace("paths", data_dir=defaults.paths.data_dir.absolute())
    assert dataclasses.replace(load_config(elsewhere, environ={}), source="") == \
        dataclasses.replace(defaults, source="")


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


def test_serve_with_an_unusable_job_store_says_so_without_a_traceback(tmp_path):
    """The scheduler's job store is reached through SQLAlchemy, which wraps SQLite's errors
    (a daemon started on a full disk gave a traceback)."""
    import socket

    data = tmp_path / "site"
    data.mkdir()
    (data / "scheduler.sqlite3").write_text("not a database")
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    config = tmp_path / "mrrp.toml"
    config.write_text(f'[paths]\ndata_dir = "{data}"\n[export]\nenabled = false\n')
    result = CliRunner().invoke(main, ["--config", str(config), "serve", "--dicom-port",
                                       str(ports[0]), "--mllp-port", str(ports[1]),
                                       "--http-port", "0"])
    assert result.exit_code == 1, result.output
    assert "database cannot be used (file is not a database)" in result.output
    assert "Traceback" not in result.output
