"""Content-addressed object store: every received file, kept by its SHA-256.

Writes are atomic: bytes go to a temporary file in the same file system while being hashed,
are flushed to disk, then renamed to ``<root>/ab/cd/<sha256>``; a reader never sees a partial
object and a crash leaves at most a stray file under ``<root>/tmp``. Objects are never
rewritten or deleted by the application.

Durability: after the rename the object's folder is fsynced (its new entry), and so is the
parent of every fan-out folder this write created (``ab/`` in the root, ``cd/`` in ``ab/``,
the root in its parent), so an object whose row is committed is still found after a power
cut. The folder sync is :func:`fsync_dir`, replaceable through ``ObjectStore(sync_dir=...)``
(tests wrap it to see which folders are synced).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class StoredObject:
    sha256: str
    size_bytes: int
    path: Path


class ObjectStore:
    """Objects under ``root``; ``sync_dir`` makes a folder's entries durable (fsync)."""

    def __init__(self, root: Path, *, sync_dir: Callable[[Path], None] | None = None) -> None:
        self.root = root
        self.sync_dir = fsync_dir if sync_dir is None else sync_dir

    def path_for(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def contains(self, sha256: str) -> bool:
        return self.path_for(sha256).is_file()

    def put_bytes(self, data: bytes) -> StoredObject:
        return self._put([data], expected_sha256=None)

    def put_file(self, source: Path, expected_sha256: str | None = None) -> StoredObject:
        """Copy ``source`` in. With ``expected_sha256`` the copy must have that digest.

        Raises
        ------
        ValueError
            The file changed between hashing and copying (its digest differs).
        """
        if expected_sha256 is not None and self.contains(expected_sha256):
            target = self.path_for(expected_sha256)
            return StoredObject(expected_sha256, target.stat().st_size, target)
        with source.open("rb") as src:
            return self._put(iter(lambda: src.read(CHUNK_BYTES), b""), expected_sha256)

    def open(self, sha256: str) -> BinaryIO:
        return self.path_for(sha256).open("rb")

    def read_bytes(self, sha256: str) -> bytes:
        return self.path_for(sha256).read_bytes()

    def _put(self, chunks: Iterable[bytes], expected_sha256: str | None) -> StoredObject:
        staging = self.root / "tmp"
        for folder in reversed(_make_folders(staging)):  # the root too, on the first write
            self.sync_dir(folder.parent)
        fd, tmp_name = tempfile.mkstemp(dir=staging, prefix="in-")
        tmp = Path(tmp_name)
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            if expected_sha256 is not None and sha != expected_sha256:
                raise ValueError("the file changed while being stored (its sha256 differs)")
            target = self.path_for(sha)
            if not target.is_file():
                created = _make_folders(target.parent)
                os.replace(tmp, target)
                self.sync_dir(target.parent)  # the object's new name
                # each new folder's name in its parent, innermost first
                for folder in reversed(created):
                    self.sync_dir(folder.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return StoredObject(sha, size, target)


def sha256_file(path: Path) -> tuple[str, int]:
    """Digest and size of a file, read in chunks (WSI files can be gigabytes)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as src:
        while chunk := src.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (names created or renamed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones found missing, outermost first.

    A folder another thread creates at the same moment counts as missing here too, so its
    parent is synced by both writers rather than by neither before this object is known.
    """
    missing: list[Path] = []
    probe = folder
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    missing.reverse()
    for path in missing:
        path.mkdir(exist_ok=True)
    return missing
