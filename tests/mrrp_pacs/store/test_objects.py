import hashlib

import pytest

from mrrp_pacs.store import ObjectStore, sha256_file
from mrrp_pacs.store.objects import fsync_dir


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


def _bytes_whose_digest_starts(prefix, avoid=None):
    """Content whose sha256 begins with ``prefix`` (and not with ``avoid``): found by trying."""
    for n in range(1_000_000):
        data = f"object {n}".encode()
        digest = hashlib.sha256(data).hexdigest()
        if digest.startswith(prefix) and not (avoid and digest.startswith(avoid)):
            return data, digest
    raise AssertionError(f"no content found for prefix {prefix}")


def test_new_folders_are_fsynced_in_their_parents(tmp_path):
    """After the rename the object's folder is synced, and the parent of each folder this
    write created (the root in its parent, ab/ in the root, cd/ in ab/); nothing else."""
    synced = []

    def sync(path):
        synced.append(path)
        fsync_dir(path)  # the real sync: a path that is no folder raises here

    root = tmp_path / "objects"
    objects = ObjectStore(root, sync_dir=sync)
    first = objects.put_bytes(b"first")
    ab, cd = root / first.sha256[:2], root / first.sha256[:2] / first.sha256[2:4]
    # tmp/ in the root, the root in its parent; then the object in cd/, cd/ in ab/, ab/ in root
    assert synced == [root, tmp_path, cd, ab, root]

    synced.clear()
    objects.put_bytes(b"first")  # already stored: nothing renamed, nothing to sync
    assert synced == []

    data, digest = _bytes_whose_digest_starts(first.sha256[:2], avoid=first.sha256[:4])
    objects.put_bytes(data)  # a new cd/ folder in the existing ab/
    assert synced == [ab / digest[2:4], ab]

    synced.clear()
    data, _ = _bytes_whose_digest_starts(first.sha256[:4])
    objects.put_bytes(data)  # into the existing ab/cd/: only its entry
    assert synced == [cd]


def test_the_default_sync_is_a_real_fsync_of_folders(tmp_path):
    fsync_dir(tmp_path)
    with pytest.raises(NotADirectoryError):
        fsync_dir(ObjectStore(tmp_path).put_bytes(b"x").path)
