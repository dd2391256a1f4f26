import hashlib

import pytest

from mrrp_pacs.store import ObjectStore, sha256_file


def test_bytes_are_stored_by_digest_once(tmp_path):
    objects = ObjectStore(tmp_path)
    first = objects.put_bytes(b"hello")
    second = objects.put_bytes(b"hello")
    assert first == second
    assert first.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert first.path == tmp_path / first.sha256[:2] / first.sha256[2:4] / first.sha256
    assert objects.read_bytes(first.sha256) == b"hello"
    assert list((tmp_path / "tmp").iterdir()) == []  # no staging leftovers


def test_file_copy_checks_the_expected_digest(tmp_path):
    source = tmp_path / "in.bin"
    source.write_bytes(b"x" * 3_000_000)
    sha, size = sha256_file(source)
    objects = ObjectStore(tmp_path / "objects")
    stored = objects.put_file(source, expected_sha256=sha)
    assert (stored.sha256, stored.size_bytes) == (sha, size)
    source.write_bytes(b"changed")
    with pytest.raises(ValueError, match="changed while being stored"):
        objects.put_file(source, expected_sha256="0" * 64)
    assert not objects.contains("0" * 64)
    assert list((tmp_path / "objects" / "tmp").iterdir()) == []


def test_rejects_a_path_that_is_not_a_digest(tmp_path):
    with pytest.raises(ValueError, match="not a sha256"):
        ObjectStore(tmp_path).path_for("../../etc/passwd")
