import hashlib
import json
import subprocess
from datetime import UTC, datetime

import pytest

from model_store import ModelStore, locate
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


def test_the_manifest_is_hashed_beside_it_and_checked_at_every_load(tmp_path):
    store = ModelStore(tmp_path)
    saved = store.save("m", "x", {"w": b"weights"}, {"risk_cutoff": 0.25})
    manifest, sidecar = saved.path / "manifest.json", saved.path / "manifest.sha256"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert sidecar.read_text() == f"{digest}  manifest.json\n"  # `sha256sum -c` reads it
    assert store.load("m", "x").manifest["risk_cutoff"] == 0.25

    # an edit that leaves every listed file's hash intact: caught by the sidecar
    original = manifest.read_bytes()
    manifest.write_bytes(original.replace(b'"risk_cutoff": 0.25', b'"risk_cutoff": 9.0'))
    with pytest.raises(ModelStoreError, match=r"manifest\.json does not match manifest\.sha256"):
        store.load("m", "x")
    # so is a manifest whose file hashes were rewritten to match altered weights
    (saved.path / "w").write_bytes(b"tampered")
    edited = json.loads(original)
    edited["files"]["w"]["sha256"] = hashlib.sha256(b"tampered").hexdigest()
    manifest.write_text(json.dumps(edited, indent=2, sort_keys=True) + "\n")
    with pytest.raises(ModelStoreError, match=r"does not match manifest\.sha256"):
        store.load("m", "x")
    with pytest.raises(ModelStoreError, match=r"does not match manifest\.sha256"):
        store.promote("m", "x", saved.version)

    manifest.write_bytes(original)
    (saved.path / "w").write_bytes(b"weights")
    sidecar.write_text("not a hash\n")
    with pytest.raises(ModelStoreError, match="not one sha256sum line"):
        store.load("m", "x")


def test_a_version_without_the_manifest_hash_is_refused_with_the_fix(tmp_path):
    """A version saved before manifests were hashed: refused, and the message says how to add
    the hash (after checking the manifest) or to train again; the fix it names works."""
    store = ModelStore(tmp_path)
    saved = store.save("m", "x", {"w": b"weights"}, {})
    (saved.path / "manifest.sha256").unlink()
    with pytest.raises(ModelStoreError) as refused:
        store.load("m", "x")
    message = str(refused.value)
    assert "has no manifest.sha256" in message and "train the model again" in message
    assert "sha256sum manifest.json > manifest.sha256" in message and str(saved.path) in message
    done = subprocess.run("sha256sum manifest.json > manifest.sha256", shell=True,
                          cwd=saved.path, capture_output=True)
    assert done.returncode == 0
    assert store.load("m", "x").version == saved.version


def test_locate_resolves_a_store_a_model_folder_or_a_version(tmp_path):
    clock = iter([datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 2, 1, tzinfo=UTC)])
    store = ModelStore(tmp_path / "models", clock=lambda: next(clock))
    first = store.save("mrrp", "mrrp", {"w": b"1"}, {})
    second = store.save("mrrp", "mrrp", {"w": b"2"}, {})
    store.clock = lambda: datetime(2024, 3, 1, tzinfo=UTC)
    encoder = store.save("us-encoder", "small", {"w": b"3"}, {})

    newest = locate(tmp_path / "models", "mrrp")  # the folder `train --out` was given
    assert (newest.version, newest.how) == (second.version, "newest")
    assert newest.load().path == second.path
    store.promote("mrrp", "mrrp", first.version)
    for folder in (tmp_path / "models", tmp_path / "models" / "mrrp",
                   tmp_path / "models" / "mrrp" / "mrrp"):
        found = locate(folder, "mrrp")
        assert (found.label, found.how) == (f"mrrp/mrrp@{first.version}", "promoted"), folder
    given = locate(second.path, "mrrp")
    assert (given.version, given.how) == (second.version, "given")

    # without a kind the store holds two models: ambiguous, and the message lists them
    with pytest.raises(ModelStoreError, match=r"several models \(mrrp/mrrp, us-encoder/small\)"):
        locate(tmp_path / "models")
    with pytest.raises(ModelStoreError, match="holds a 'us-encoder' model, not a 'mrrp' one"):
        locate(encoder.path, "mrrp")
    store.save("mrrp", "other", {"w": b"4"}, {})
    with pytest.raises(ModelStoreError, match=r"several 'mrrp' models \(mrrp/mrrp, mrrp/other\)"):
        locate(tmp_path / "models", "mrrp")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelStoreError, match="no 'mrrp' model in"):
        locate(tmp_path / "empty", "mrrp")


PROMOTER = """\
import sys
from pathlib import Path
from model_store import ModelStore
store = ModelStore(Path(sys.argv[1]))
versions = sys.argv[2:]
for i in range(400):
    store.promote("m", "x", versions[i % 2])
"""


def test_a_reader_never_sees_a_half_written_promotion(tmp_path):
    """Two promoters at once (two `models promote`, or one beside `train --promote`) and a
    scoring run reading the pointer: every read names one of the versions (a shared
    temporary file used to let a reader see an empty pointer, hence "the newest")."""
    import os
    import sys
    from pathlib import Path

    store = ModelStore(tmp_path)
    first = store.save("m", "x", {"w": b"1"}, {}).version
    second = store.save("m", "x", {"w": b"2"}, {}).version
    store.promote("m", "x", first)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    promoters = [subprocess.Popen([sys.executable, "-c", PROMOTER, str(tmp_path), *order],
                                  env=env, stderr=subprocess.PIPE)
                 for order in ((first, second), (second, first))]
    seen: dict[str | None, int] = {}
    while any(p.poll() is None for p in promoters):
        version = store.promoted("m", "x")
        seen[version] = seen.get(version, 0) + 1
    errors = [p.stderr.read().decode() for p in promoters]
    for p in promoters:
        p.stderr.close()
    assert [p.returncode for p in promoters] == [0, 0], errors
    assert set(seen) <= {first, second} and sum(seen.values()) > 100, seen
    assert store.promoted("m", "x") in (first, second)
    assert not [p.name for p in (tmp_path / "m" / "x").iterdir() if p.name.endswith(".tmp")]
