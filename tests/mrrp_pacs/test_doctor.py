"""`mrrp-pacs doctor`: each broken precondition fails clearly, a sound one passes."""

import socket

import pytest
from click.testing import CliRunner
from orthanc import free_port, running_orthanc

from model_store import ModelStore
from mrrp_pacs.cli import main
from mrrp_pacs.config import load_config
from mrrp_pacs.doctor import run_checks
from mrrp_pacs.store import Store


@pytest.fixture
def site(tmp_path):
    """A configuration on free loopback ports, its database not yet created."""
    config = load_config(None, environ={})
    config = config.replace("paths", data_dir=tmp_path / "data",
                            model_store=tmp_path / "models")
    config = config.replace("dicom", port=free_port()).replace("hl7", port=free_port())
    return config.replace("http", port=free_port())


def _by_name(checks):
    return {check.name: check for check in checks}


def _save_model(root, kind, name):
    return ModelStore(root).save(kind, name, {"weights.safetensors": b"weights"},
                                 {"note": "test"})


def test_missing_database_and_models_fail_with_what_to_do(site):
    checks = _by_name(run_checks(site, min_free_bytes=0))
    assert not checks["database"].ok and "migrate" in checks["database"].fix
    model = checks["model mrrp/mrrp"]
    assert not model.ok and "mrrp-pacs train" in model.fix
    assert not checks["model us-encoder/usresnet-small"].ok
    assert checks["configuration"].ok and checks["disk space"].ok
    assert checks["DICOM port"].ok and checks["MLLP port"].ok and checks["HTTP port"].ok
    assert checks["tile encoder"].ok and checks["text encoder"].ok
    assert checks["PACS"].ok  # none configured: push-only


def test_a_sound_site_passes_every_check(site):
    with Store(site.paths.db_file, site.paths.objects_dir):
        pass
    _save_model(site.paths.model_store_dir, "mrrp", "mrrp")
    _save_model(site.paths.model_store_dir, "us-encoder", "usresnet-small")
    checks = run_checks(site, min_free_bytes=0)
    assert [c.name for c in checks if not c.ok] == []
    assert "verified" in _by_name(checks)["model mrrp/mrrp"].detail


def test_altered_model_newer_database_busy_port_and_low_disk_fail(site):
    with Store(site.paths.db_file, site.paths.objects_dir) as store:
        store.conn.execute("PRAGMA user_version = 99")
    saved = _save_model(site.paths.model_store_dir, "mrrp", "mrrp")
    (saved.path / "weights.safetensors").write_bytes(b"tampered")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", site.dicom.port))
        busy.listen()
        checks = _by_name(run_checks(site, min_free_bytes=10**18))
    assert not checks["database"].ok and "upgrade mrrp-pacs" in checks["database"].fix
    assert not checks["model mrrp/mrrp"].ok
    assert "weights.safetensors" in checks["model mrrp/mrrp"].detail
    assert not checks["DICOM port"].ok and "[dicom] port" in checks["DICOM port"].fix
    assert checks["MLLP port"].ok
    assert not checks["disk space"].ok


def test_encoder_weights_must_exist_where_configured(site, tmp_path):
    uni = site.replace("features", wsi_encoder="uni")
    check = _by_name(run_checks(uni, min_free_bytes=0))["tile encoder weights"]
    assert not check.ok and "encoder_checkpoints.uni" in check.fix
    missing = uni.replace("features", encoder_checkpoints={"uni": str(tmp_path / "no.bin")})
    check = _by_name(run_checks(missing, min_free_bytes=0))["tile encoder weights"]
    assert not check.ok and "missing" in check.detail
    (tmp_path / "uni.bin").write_bytes(b"x")
    present = uni.replace("features", encoder_checkpoints={"uni": str(tmp_path / "uni.bin")})
    assert _by_name(run_checks(present, min_free_bytes=0))["tile encoder weights"].ok


@pytest.mark.e2e
def test_pacs_is_checked_with_a_real_c_echo(site, tmp_path):
    down = site.replace("pacs", host="127.0.0.1", port=free_port())
    check = _by_name(run_checks(down, min_free_bytes=0))["PACS (C-ECHO)"]
    assert not check.ok and "did not accept" in check.detail
    with running_orthanc(tmp_path / "orthanc", modalities={
            "MRRP": ["MRRP", "127.0.0.1", site.dicom.port]}) as orthanc:
        up = site.replace("pacs", host="127.0.0.1", port=orthanc.dicom_port)
        checks = _by_name(run_checks(up, min_free_bytes=0))
        assert checks["PACS (C-ECHO)"].ok and checks["PACS (C-FIND)"].ok
        # Orthanc echoes anyone but refuses queries from an AE it does not know
        stranger = up.replace("dicom", ae_title="STRANGER")
        checks = _by_name(run_checks(stranger, min_free_bytes=0))
        assert checks["PACS (C-ECHO)"].ok
        assert not checks["PACS (C-FIND)"].ok and "STRANGER" in checks["PACS (C-FIND)"].fix
        wrong = site.replace("pacs", host="127.0.0.1", port=orthanc.dicom_port,
                             ae_title="NOTORTHANC")
        assert not _by_name(run_checks(wrong, min_free_bytes=0))["PACS (C-ECHO)"].ok


def test_cli_exit_status_and_a_broken_config_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nport = 0\n")
    result = CliRunner().invoke(main, ["--config", str(bad), "doctor"])
    assert result.exit_code != 0 and "dicom.port" in result.output
    good = tmp_path / "good.toml"
    good.write_text(f'[paths]\ndata_dir = "{tmp_path / "d"}"\n[dicom]\nport = {free_port()}\n'
                    f'[hl7]\nport = {free_port()}\n[http]\nport = 0\n')
    result = CliRunner().invoke(main, ["--config", str(good), "doctor"])
    assert result.exit_code == 1
    assert "FAIL  database" in result.output and "failed" in result.output.splitlines()[-1]
