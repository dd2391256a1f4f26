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


def test_a_sound_site_passes_every_check(site):
    site = site.replace("export", uid_secret="site-secret-1234")
    with Store(site.paths.db_file, site.paths.objects_dir):
        pass
    _save_model(site.paths.model_store_dir, "mrrp", "mrrp")
    _save_model(site.paths.model_store_dir, "us-encoder", "usresnet-small")
    checks = run_checks(site.replace("export", enabled=False), min_free_bytes=0)
    assert [c.name for c in checks if not c.ok or c.warning] == []
    assert "verified" in _by_name(checks)["model mrrp/mrrp"].detail
    assert _by_name(checks)["PACS"].detail.startswith("none configured")  # push-only


def test_default_uid_secret_and_export_without_destination_are_warnings(site):
    checks = _by_name(run_checks(site, min_free_bytes=0))
    secret = checks["uid secret"]
    assert secret.ok and secret.warning and "public default 'mrrp-pacs'" in secret.detail
    assert "set [export] uid_secret" in secret.fix
    assert secret.line().startswith("WARN  uid secret: ") and "-> set" in secret.line()
    pacs = checks["PACS"]  # export enabled (the default) but nowhere to send to
    assert pacs.ok and pacs.warning and "[export] enabled = true" in pacs.detail
    assert "[export] host" in pacs.fix and "[export] enabled = false" in pacs.fix
    custom = _by_name(run_checks(site.replace("export", uid_secret="s3cr3t-of-the-site"),
                                 min_free_bytes=0))["uid secret"]
    assert custom.ok and not custom.warning and "s3cr3t" not in custom.line()
    result = CliRunner().invoke(main, ["doctor"])  # built-in defaults: warned, not failed
    assert "WARN  uid secret" in result.output and "WARN  PACS" in result.output


def test_the_public_uid_secret_with_a_destination_fails_and_serve_refuses_it(site, tmp_path):
    exporting = site.replace("pacs", host="127.0.0.1")
    secret = _by_name(run_checks(exporting, min_free_bytes=0))["uid secret"]
    assert not secret.ok and "`serve` refuses" in secret.detail
    assert secret.line().startswith("FAIL  uid secret: ")

    data = tmp_path / "site"
    config = tmp_path / "mrrp.toml"
    config.write_text(f'[paths]\ndata_dir = "{data}"\n[pacs]\nhost = "127.0.0.1"\n'
                      '[http]\nport = 0\n')
    refused = CliRunner().invoke(main, ["--config", str(config), "serve"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "[export] uid_secret is the public default 'mrrp-pacs'" in refused.output
    assert "secrets.token_hex(32)" in refused.output
    assert not (data / "mrrp.lock").exists() and not (data / "mrrp.sqlite3").exists()


def test_ports_held_by_our_running_daemon_are_ok_and_others_fail(site, monkeypatch):
    """Beside a running daemon its three ports are busy: ours, so not a failure."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mrrp_pacs.daemon import components_from_config

    # a site proxy must not carry the question to our own /healthz
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)

    with Store(site.paths.db_file, site.paths.objects_dir):
        pass
    listeners = components_from_config(site).listeners
    for listener in listeners:
        listener.start()
    try:
        checks = _by_name(run_checks(site, min_free_bytes=0))
        for name in ("DICOM port", "MLLP port", "HTTP port"):
            assert checks[name].ok and not checks[name].warning, checks[name].line()
            assert "in use by the running mrrp-pacs daemon" in checks[name].detail
        assert "our AE MRRP answers C-ECHO" in checks["DICOM port"].detail
        assert "hl7 listener up" in checks["MLLP port"].detail
        assert "/healthz answers 'ok'" in checks["HTTP port"].detail
    finally:
        for listener in reversed(listeners):
            listener.stop()
    # another program on the HTTP port is not our daemon, and our MLLP port then cannot be
    # told apart from anyone else's
    other = ThreadingHTTPServer(("127.0.0.1", site.http.port), BaseHTTPRequestHandler)
    try:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", site.hl7.port))
            busy.listen()
            checks = _by_name(run_checks(site, min_free_bytes=0))
    finally:
        other.server_close()
    assert not checks["HTTP port"].ok and "[http] port" in checks["HTTP port"].fix
    assert not checks["MLLP port"].ok and "no mrrp-pacs daemon" in checks["MLLP port"].detail
    assert checks["DICOM port"].ok and checks["DICOM port"].detail.endswith("free")


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


@pytest.mark.needs_tool("Orthanc")
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


@pytest.mark.needs_tool("openssl")
def test_tls_peers_and_ports_are_checked_over_tls_and_a_bad_key_is_reported(site, certs,
                                                                             tmp_path):
    from listeners.dicom_scp import StorageScp
    from mrrp_pacs.tls import server_context

    tls = site.replace("tls", cert_file=certs.client_cert, key_file=certs.client_key,
                       ca_file=certs.ca, require_client_cert=True)
    serving = tls.replace("tls", cert_file=certs.server_cert, key_file=certs.server_key)
    ours = StorageScp(lambda: None, "MRRP", None, tls_port=0,
                      ssl_context=server_context(serving.tls))
    with ours:
        checked = (tls.replace("dicom", tls=True, tls_port=ours.tls_port)
                   .replace("pacs", host="127.0.0.1", port=ours.tls_port, ae_title="MRRP",
                            tls=True))
        checks = _by_name(run_checks(checked, min_free_bytes=0))
        assert checks["DICOM TLS port"].ok, checks["DICOM TLS port"].detail
        assert "in use by the running mrrp-pacs daemon" in checks["DICOM TLS port"].detail
        echo = checks["PACS (C-ECHO over TLS)"]
        assert echo.ok and echo.detail == f"MRRP@127.0.0.1:{ours.tls_port} answered"
        assert checks["TLS"].detail.startswith(f"listening on DICOM port {ours.tls_port}")
        plain = checked.replace("pacs", tls=False)
        echo = _by_name(run_checks(plain, min_free_bytes=0))["PACS (C-ECHO)"]
        assert not echo.ok and "did not accept" in echo.detail
    broken = tmp_path / "broken.toml"
    broken.write_text(f'[tls]\ncert_file = "{certs.server_cert}"\nkey_file = '
                      f'"{certs.client_key}"\n[dicom]\ntls = true\n')
    result = CliRunner().invoke(main, ["--config", str(broken), "doctor"])
    assert result.exit_code != 0
    assert "tls.cert_file" in result.output and "cannot be loaded" in result.output
