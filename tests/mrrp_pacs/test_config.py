import dataclasses
import tomllib
from pathlib import Path

import pytest

from mrrp_pacs.config import SECTIONS, Config, load_config
from mrrp_pacs.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "mrrp.example.toml"


def test_defaults_without_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, environ={})
    # one state folder, made absolute at load time: a later chdir changes nothing
    state = tmp_path / "mrrp-data"
    monkeypatch.chdir("/")
    assert config.paths.state_dir == state
    assert config.paths.db_file == state / "mrrp.sqlite3"
    assert config.paths.objects_dir == state / "objects"
    assert config.paths.model_store_dir == state / "models"
    assert config.paths.scheduler_db == state / "scheduler.sqlite3"
    assert config.identity.match == "id+issuer"


def test_example_documents_every_key_and_loads():
    raw = tomllib.loads(EXAMPLE.read_text())
    for name, section in SECTIONS.items():
        documented = set(raw.get(name, {}))
        declared = {f.name for f in dataclasses.fields(section)}
        assert documented == declared, f"[{name}] example keys differ from the code"
    config = load_config(EXAMPLE, environ={})
    # relative paths resolve against the file's folder
    assert config.paths.data_dir == EXAMPLE.parent / "mrrp-data"
    assert config.paths.db is None and config.paths.db_file == EXAMPLE.parent / "mrrp-data" / \
        "mrrp.sqlite3"


def test_example_values_are_the_defaults():
    from_file = load_config(EXAMPLE, environ={})
    defaults = Config()
    for name in SECTIONS:
        for f in dataclasses.fields(getattr(defaults, name)):
            if f.name == "data_dir":
                continue  # resolved against the file's folder
            assert getattr(getattr(from_file, name), f.name) == \
                getattr(getattr(defaults, name), f.name), f"{name}.{f.name}"


def test_environment_overrides_file(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[paths]\ndata_dir = "a"\n[logging]\njson = false\n')
    config = load_config(path, environ={
        "MRRP__PATHS__DATA_DIR": "/srv/mrrp",
        "MRRP__LOGGING__JSON": "true",
        "MRRP__INGEST__ACCESSION_FIELDS": "OBR-18, OBR-2",
        "MRRP__IDENTITY__ISSUER_ALIASES": '{ "A" = "B" }',
        "MRRP__INGEST__MAX_HL7_BYTES": "1000",
    })
    assert config.paths.data_dir == Path("/srv/mrrp")
    assert config.logging.json is True
    assert config.ingest.accession_fields == ["OBR-18", "OBR-2"]
    assert config.identity.issuer_aliases == {"A": "B"}
    assert config.ingest.max_hl7_bytes == 1000


def test_config_file_from_environment(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[identity]\nmatch = "id"\n')
    assert load_config(None, environ={"MRRP_CONFIG": str(path)}).identity.match == "id"


@pytest.mark.parametrize(("text", "names"), [
    ('[paths]\ndbfile = "x"\n', ["paths.dbfile", "data_dir"]),
    ('[storage]\nx = 1\n', ["[storage]", "paths"]),
    ('[identity]\nmatch = "fuzzy"\n', ["identity.match", "'fuzzy'", "'id+issuer'"]),
    ('[ingest]\nmax_hl7_bytes = "big"\n',
     ["ingest.max_hl7_bytes", "'big'", "integer of 0 or more"]),
    ('[ingest]\nmax_hl7_bytes = 0\n', ["ingest.max_hl7_bytes", "at least 1"]),
    ('[dicom]\nport = 70000\n', ["dicom.port", "70000", "TCP port"]),
    ('[dicom]\nae_title = "A_TITLE_LONGER_THAN_16"\n', ["dicom.ae_title", "1-16 ASCII"]),
    ('[dicom]\nallowed_aes = ["OK", ""]\n', ["dicom.allowed_aes", "''"]),
    ('[scoring]\nrescore_time = "25:00"\n', ["scoring.rescore_time", "HH:MM"]),
    ('[pacs]\nmethod = "push"\n', ["pacs.method", "'move'", "'get'"]),
    ('[pacs]\nlookback_days = -1\n', ["pacs.lookback_days", "0 or more"]),
    ('[pacs]\nretry_max_backoff_s = 10\n', ["pacs.retry_max_backoff_s", "retry_backoff_s"]),
    ('[pacs]\nretry_budget_h = 0\n', ["pacs.retry_budget_h", "above 0 hours"]),
    ('[ingest]\nmax_hl7_bytes = -5\n', ["ingest.max_hl7_bytes", "-5"]),
    ('[logging]\njson = "yes"\n', ["logging.json", "true or false"]),
    ('[ingest]\naccession_fields = "OBR-3"\n', ["ingest.accession_fields", "list of strings"]),
    ('[features]\nnuclei_region_mm2 = 0.0\n', ["features.nuclei_region_mm2", "above 0 mm²"]),
    ('[features]\nnuclei_block_tiles = 0\n', ["features.nuclei_block_tiles", "at least 1"]),
    ('[export]\nretry_hours = 0\n', ["export.retry_hours", "hours above 0"]),
    ('[export]\nmax_attempts = -1\n', ["export.max_attempts", "integer of 0 or more"]),
    ('[export]\nbackoff_s = 600\nmax_backoff_s = 60\n', ["export.backoff_s", "max_backoff_s"]),
    ('[dicom]\nplain = false\n', ["dicom.plain", "one listener"]),
    ('[hl7]\ntls = true\ntls_port = 2575\n', ["hl7.tls_port", "other than hl7.port"]),
    ('[dicom]\ntls = true\n', ["tls.cert_file is empty", "our certificate"]),
    ('[dicom]\nae_addresses = { ORTHANC = ["10.0.0.300"] }\n',
     ["dicom.ae_addresses.ORTHANC", "10.0.0.300", "CIDR network"]),
    ('[dicom]\nae_addresses = { ORTHANC = "10.0.0.1" }\n',
     ["dicom.ae_addresses", "table of lists of strings"]),
    ('[dicom]\nae_addresses = { ORTHANC = [] }\n', ["dicom.ae_addresses.ORTHANC", "at least one"]),
    ('[hl7]\nallowed_addresses = ["10.0.0.0/33"]\n', ["hl7.allowed_addresses", "10.0.0.0/33"]),
    ('[tls]\nca_file = "missing-ca.pem"\n[export]\ntls = true\n',
     ["tls.ca_file", "missing-ca.pem", "no such file"]),
    ('[tls]\ncert_file = "our.pem"\n[pacs]\ntls = true\n',
     ["tls.cert_file and tls.key_file go together"]),
    ('paths = 3\n', ["'paths' must be a [section]"]),
    ('[paths\n', ["not valid TOML"]),
])
def test_invalid_values_are_named(tmp_path, text, names):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert str(path) in message
    for name in names:
        assert name in message


def test_invalid_environment_override_is_named():
    with pytest.raises(ConfigError, match=r"\$MRRP__LOGGING__JSON.*logging.json = 'maybe'"):
        load_config(None, environ={"MRRP__LOGGING__JSON": "maybe"})
    with pytest.raises(ConfigError, match="MRRP__NOPE"):
        load_config(None, environ={"MRRP__NOPE": "1"})
    with pytest.raises(ConfigError, match=r"unknown key 'paths\.colour'"):
        load_config(None, environ={"MRRP__PATHS__COLOUR": "1"})


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml", environ={})


def test_with_db_makes_its_folder_the_state_folder(tmp_path):
    config = load_config(None, environ={}).with_db(tmp_path / "x" / "cohort.sqlite3")
    state = tmp_path / "x"
    assert config.paths.db_file == state / "cohort.sqlite3"
    assert (config.paths.state_dir, config.paths.data_dir) == (state, state)
    assert config.paths.objects_dir == state / "objects"
    assert config.paths.model_store_dir == state / "models"
    assert config.paths.scheduler_db == state / "scheduler.sqlite3"


def test_relative_db_is_taken_against_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, environ={}).with_db(Path("run") / "state" / "mrrp.sqlite3")
    monkeypatch.chdir("/")
    assert config.paths.db_file == tmp_path / "run" / "state" / "mrrp.sqlite3"
    assert config.paths.model_store_dir == tmp_path / "run" / "state" / "models"


def test_db_in_a_file_moves_the_state_folder_and_explicit_folders_stay(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    path = site / "m.toml"
    path.write_text('[paths]\ndata_dir = "data"\ndb = "fast/mrrp.sqlite3"\n'
                    'model_store = "shared-models"\n')
    monkeypatch.chdir(tmp_path)
    config = load_config(path, environ={"MRRP__PATHS__OBJECTS": "bulk"})
    # the file's relative paths against its folder, the environment's against the current one
    assert config.paths.state_dir == site / "fast"
    assert config.paths.scheduler_db == site / "fast" / "scheduler.sqlite3"
    assert config.paths.model_store_dir == site / "shared-models"
    assert config.paths.objects_dir == tmp_path / "bulk"
    # --db elsewhere moves the state folder; what was named explicitly stays where it was
    moved = config.with_db(tmp_path / "other" / "x.sqlite3")
    assert moved.paths.scheduler_db == tmp_path / "other" / "scheduler.sqlite3"
    assert moved.paths.model_store_dir == site / "shared-models"
    assert moved.paths.objects_dir == tmp_path / "bulk"


def test_address_tables_load_from_file_and_environment_and_write_back(tmp_path):
    from mrrp_pacs.config import config_toml

    path = tmp_path / "m.toml"
    path.write_text('[dicom]\nae_addresses = { ORTHANC = ["10.1.2.3", "10.9.0.0/16"] }\n'
                    '[hl7]\nallowed_addresses = ["10.1.2.3", "fd00::/8"]\n')
    config = load_config(path, environ={
        "MRRP__DICOM__AE_ADDRESSES": '{ ORTHANC = ["10.1.2.4"], "US 1" = ["10.5.0.0/24"] }'})
    assert config.dicom.ae_addresses == {"ORTHANC": ["10.1.2.4"], "US 1": ["10.5.0.0/24"]}
    assert config.hl7.allowed_addresses == ["10.1.2.3", "fd00::/8"]
    again = tmp_path / "again.toml"
    again.write_text(config_toml(config))
    reloaded = load_config(again, environ={})
    assert reloaded.dicom.ae_addresses == config.dicom.ae_addresses
    assert reloaded.hl7.allowed_addresses == config.hl7.allowed_addresses


def test_addresses_match_networks_and_mapped_ipv4():
    from mrrp_pacs.tls import address_allowed, parse_networks

    networks = parse_networks(["10.1.2.3", "10.9.0.0/16", "fd00::/8"], "test")
    assert address_allowed("10.1.2.3", networks) and address_allowed("10.9.200.1", networks)
    assert address_allowed("::ffff:10.9.0.7", networks)  # IPv4 seen through an IPv6 socket
    assert address_allowed("fd00::1", networks)
    assert not address_allowed("10.1.2.4", networks)
    assert not address_allowed("?", networks) and not address_allowed("10.1.2.3", ())
