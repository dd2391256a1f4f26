"""Content-addressed object store: every received file, kept by its SHA-256.

Writes are atomic: bytes go to a temporary file in the same file system while being hashed,
are flushed to disk, then renamed to ``<root>/ab/cd/<sha256>``; a reader never sees a partial
object and a crash leaves at most a stray file under ``<root>/tmp``. Objects are never
rewritten or deleted by the application.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
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
    def __init__(self, root: Path) -> None:
        self.root = root

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
        staging.mkdir(parents=True, exist_ok=True)
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
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, target)
                _fsync_dir(target.parent)
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
