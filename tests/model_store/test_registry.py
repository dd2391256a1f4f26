import json

import pytest

from model_store import ModelStore
from mrrp_pacs.errors import ModelStoreError


def test_save_load_and_manifest(tmp_path):
    store = ModelStore(tmp_path)
    saved = store.save("us-encoder", "resnet-small", {"weights.safetensors": b"abc"},
                       {"architecture": {"depth": 2}, "training": {"n": 10}})
    assert saved.manifest["files"]["weights.safetensors"]["size_bytes"] == 3
    loaded = store.load("us-encoder", "resnet-small")
    assert loaded.version == saved.version
    assert loaded.file("weights.safetensors").read_bytes() == b"abc"
    on_disk = json.loads((saved.path / "manifest.json").read_text())
    assert on_disk["architecture"] == {"depth": 2} and on_disk["kind"] == "us-encoder"
    assert store.names("us-encoder") == ["resnet-small"]


def test_promoted_version_is_the_default(tmp_path):
    store = ModelStore(tmp_path)
    first = store.save("m", "x", {"w": b"1"}, {})
    second = store.save("m", "x", {"w": b"2"}, {})
    assert first.version != second.version
    assert store.load("m", "x").version == max(first.version, second.version)
    store.promote("m", "x", first.version)
    assert store.load("m", "x").version == first.version


def test_altered_or_missing_files_are_refused(tmp_path):
    store = ModelStore(tmp_path)
    saved = store.save("m", "x", {"w": b"weights"}, {})
    (saved.path / "w").write_bytes(b"tampered")
    with pytest.raises(ModelStoreError, match="does not match its manifest sha256"):
        store.load("m", "x")
    (saved.path / "w").unlink()
    with pytest.raises(ModelStoreError, match="file w is missing"):
        store.load("m", "x")


def test_unknown_model_and_bad_names(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(ModelStoreError, match="no model m/x"):
        store.load("m", "x")
    with pytest.raises(ModelStoreError, match="must be 1-64"):
        store.save("m", "../escape", {"w": b""}, {})
    store.save("m", "x", {"w": b""}, {})
    with pytest.raises(ModelStoreError, match="has no version 'nope'"):
        store.load("m", "x", "nope")
    assert not any(p.name.startswith(".staging") for p in (tmp_path / "m" / "x").iterdir())
