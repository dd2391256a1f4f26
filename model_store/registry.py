"""A versioned model registry on disk: weights + manifest with provenance and hashes.

Layout: ``<root>/<kind>/<name>/<version>/`` holds the model's files, ``manifest.json`` and
``manifest.sha256``; ``<root>/<kind>/<name>/PROMOTED`` names the version in use. A version is
written to a staging folder and renamed into place, so it appears whole or not at all; it is
never modified after.

Loading verifies the manifest against ``manifest.sha256`` (the SHA-256 of its bytes, in
``sha256sum`` format, so ``sha256sum -c manifest.sha256`` checks it too), then the SHA-256 of
every file the manifest lists. The sidecar catches a manifest edited or corrupted after the
save (an architecture, a cutoff, a baseline hazard or a file hash changed by hand); it is not a
signature: whoever can write the folder can rewrite both. A version saved before the sidecar
existed is refused with the way to add it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mrrp_pacs.errors import ModelStoreError

MANIFEST = "manifest.json"
MANIFEST_HASH = "manifest.sha256"
PROMOTED = "PROMOTED"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ModelVersion:
    kind: str
    name: str
    version: str
    path: Path
    manifest: dict[str, Any]

    def file(self, filename: str) -> Path:
        if filename not in self.manifest.get("files", {}):
            raise ModelStoreError(f"{self.label} has no file {filename!r}")
        return self.path / filename

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.name}@{self.version}"


def _check_name(what: str, value: str) -> str:
    if not _SAFE_NAME.match(value):
        raise ModelStoreError(f"{what} {value!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _wall_clock() -> datetime:
    return datetime.now(UTC)


class ModelStore:
    """Versioned models under ``root``; ``clock`` (UTC, timezone-aware) names new versions."""

    def __init__(self, root: Path, clock: Callable[[], datetime] = _wall_clock) -> None:
        self.root = root
        self.clock = clock

    def save(self, kind: str, name: str, files: Mapping[str, bytes],
             manifest: Mapping[str, Any]) -> ModelVersion:
        """Write a new version; returns it. ``manifest`` is the caller's provenance (JSON-able).

        The version id is ``<UTC timestamp>-<first 8 hex of the content digest>``.
        """
        folder = self.root / _check_name("kind", kind) / _check_name("name", name)
        for filename in files:
            _check_name("file name", filename)
            if filename in (MANIFEST, MANIFEST_HASH):
                raise ModelStoreError(f"{filename} is written by the store, not passed as a file")
        content = hashlib.sha256()
        for filename in sorted(files):
            content.update(filename.encode() + b"\0" + hashlib.sha256(files[filename]).digest())
        created = self.clock().astimezone(UTC)
        version = f"{created:%Y%m%dT%H%M%SZ}-{content.hexdigest()[:8]}"
        full_manifest = {
            **manifest,
            "kind": kind, "name": name, "version": version,
            "created_at": created.isoformat(timespec="seconds"),
            "files": {f: {"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)}
                      for f, data in sorted(files.items())},
        }
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".staging-"))
        try:
            for filename, data in files.items():
                (staging / filename).write_bytes(data)
            manifest_bytes = (json.dumps(full_manifest, indent=2, sort_keys=True)
                              + "\n").encode()
            (staging / MANIFEST).write_bytes(manifest_bytes)
            (staging / MANIFEST_HASH).write_text(_hash_line(manifest_bytes))
            for entry in staging.iterdir():
                with entry.open("rb") as handle:
                    os.fsync(handle.fileno())
            target = folder / version
            if target.exists():
                raise ModelStoreError(f"{kind}/{name}@{version} already exists")
            os.replace(staging, target)
            _fsync_dir(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return ModelVersion(kind, name, version, target, full_manifest)

    def names(self, kind: str) -> list[str]:
        folder = self.root / kind
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def versions(self, kind: str, name: str) -> list[str]:
        folder = self.root / kind / name
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).exists())

    def promoted(self, kind: str, name: str) -> str | None:
        """The promoted version id, or None. Read once per use: a caller that needs one version
        for a whole run (a scoring run) reads it once and loads that id."""
        marker = self.root / kind / name / PROMOTED
        try:
            return marker.read_text().strip() or None
        except FileNotFoundError:
            return None

    def promote(self, kind: str, name: str, version: str) -> None:
        """Make ``version`` the one :meth:`load` returns by default (after verifying it).

        Atomic: the pointer is written whole to a temporary file of its own (two promotions at
        once never share one), flushed to disk, and renamed over ``PROMOTED``; the folder is
        then flushed too. A reader sees the old version or the new one, never an empty or
        half-written pointer, and after a power cut the pointer is one of the two as well.
        """
        self.load(kind, name, version)
        folder = self.root / kind / name
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{PROMOTED}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(version + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, folder / PROMOTED)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        _fsync_dir(folder)

    def load(self, kind: str, name: str, version: str | None = None) -> ModelVersion:
        """The given version, else the promoted one, else the latest; hashes verified.

        Raises
        ------
        ModelStoreError
            No such model/version, or a file is missing or altered.
        """
        available = self.versions(kind, name)
        if not available:
            raise ModelStoreError(
                f"no model {kind}/{name} in {self.root}: train one first (see the operator "
                "guide) or point [paths] model_store at the folder that holds it",
                key=f"{kind}/{name}", source=str(self.root))
        chosen = version or self.promoted(kind, name) or available[-1]
        if chosen not in available:
            raise ModelStoreError(f"{kind}/{name} has no version {chosen!r}; available: "
                                  f"{', '.join(available)}", key=f"{kind}/{name}")
        path = self.root / kind / name / chosen
        manifest = _verified_manifest(f"{kind}/{name}@{chosen}", path)
        loaded = ModelVersion(kind, name, chosen, path, manifest)
        self.verify(loaded)
        return loaded

    @staticmethod
    def verify(model: ModelVersion) -> None:
        """Check the SHA-256 of every file the (already verified) manifest lists."""
        for filename, entry in model.manifest.get("files", {}).items():
            path = model.path / filename
            if not path.is_file():
                raise ModelStoreError(f"{model.label}: file {filename} is missing",
                                      key=model.label, source=str(path))
            if _sha256(path) != entry["sha256"]:
                raise ModelStoreError(
                    f"{model.label}: {filename} does not match its manifest sha256 (altered or "
                    "corrupt); restore it or train again", key=model.label, source=str(path))


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_line(manifest_bytes: bytes) -> str:
    """The content of ``manifest.sha256``: one ``sha256sum`` line."""
    return f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST}\n"


def _verified_manifest(label: str, path: Path) -> dict[str, Any]:
    """The manifest of the version folder ``path``, once its bytes match ``manifest.sha256``.

    Raises
    ------
    ModelStoreError
        The sidecar is missing (a version saved before it existed), unreadable, or names
        another hash; or the manifest is not JSON.
    """
    manifest_bytes = (path / MANIFEST).read_bytes()
    sidecar = path / MANIFEST_HASH
    if not sidecar.is_file():
        raise ModelStoreError(
            f"{label}: {MANIFEST} has no {MANIFEST_HASH} beside it (saved before manifests were "
            f"hashed, or the file was removed), so an edit to it could not be detected: train "
            f"the model again, or, once you have checked that {MANIFEST} is as saved, run "
            f"`sha256sum {MANIFEST} > {MANIFEST_HASH}` in {path}", key=label, source=str(path))
    fields = sidecar.read_text(encoding="utf-8", errors="replace").split()
    if len(fields) != 2 or fields[1].lstrip("*") != MANIFEST \
            or not re.fullmatch(r"[0-9a-f]{64}", fields[0]):
        raise ModelStoreError(f"{label}: {MANIFEST_HASH} is not one sha256sum line for "
                              f"{MANIFEST}", key=label, source=str(sidecar))
    if hashlib.sha256(manifest_bytes).hexdigest() != fields[0]:
        raise ModelStoreError(
            f"{label}: {MANIFEST} does not match {MANIFEST_HASH} (edited or corrupt after it "
            "was saved); restore it or train again", key=label, source=str(path / MANIFEST))
    try:
        manifest = json.loads(manifest_bytes)
    except ValueError as exc:
        raise ModelStoreError(f"{label}: {MANIFEST} is not JSON ({exc})", key=label,
                              source=str(path / MANIFEST)) from None
    if not isinstance(manifest, dict):
        raise ModelStoreError(f"{label}: {MANIFEST} is not a JSON object", key=label,
                              source=str(path / MANIFEST))
    return manifest


@dataclass(frozen=True)
class Located:
    """A model version found from a folder (:func:`locate`).

    Attributes
    ----------
    how
        ``"given"`` (a version folder), ``"promoted"`` or ``"newest"`` (no version promoted).
    """

    store: ModelStore
    kind: str
    name: str
    version: str
    how: str

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.name}@{self.version}"

    def load(self) -> ModelVersion:
        """The version, verified (:meth:`ModelStore.load`)."""
        return self.store.load(self.kind, self.name, self.version)


def locate(path: Path, kind: str | None = None) -> Located:
    """The model version a folder stands for.

    ``path`` may be a version folder (``<root>/<kind>/<name>/<version>``, the one version), a
    name folder (``<root>/<kind>/<name>``), a kind folder (``<root>/<kind>``) or the store
    root (the folder given to ``train --out``); the last three stand for the promoted version
    of the one model they hold, or its newest version when none is promoted.

    Parameters
    ----------
    kind
        Only models of this kind (e.g. ``"mrrp"``: a store also holds the encoders).

    Raises
    ------
    ModelStoreError
        No model (of ``kind``) under ``path``, several (the message lists them), or a version
        folder of another kind.
    """
    path = path.absolute()
    if (path / MANIFEST).is_file():
        if len(path.parents) < 3:
            raise ModelStoreError(f"{path} is not inside a model store (<root>/<kind>/<name>/"
                                  "<version>)")
        found = path.parent.parent.name
        if kind is not None and found != kind:
            raise ModelStoreError(f"{path} holds a {found!r} model, not a {kind!r} one")
        return Located(ModelStore(path.parents[2]), found, path.parent.name, path.name, "given")
    candidates: list[tuple[ModelStore, str, str]] = []
    if len(path.parents) >= 2 and ModelStore(path.parents[1]).versions(path.parent.name,
                                                                        path.name):
        candidates = [(ModelStore(path.parents[1]), path.parent.name, path.name)]
    elif len(path.parents) >= 1 and any(ModelStore(path.parent).versions(path.name, name)
                                        for name in ModelStore(path.parent).names(path.name)):
        store = ModelStore(path.parent)
        candidates = [(store, path.name, name) for name in store.names(path.name)
                      if store.versions(path.name, name)]
    elif path.is_dir():
        store = ModelStore(path)
        kinds = sorted(p.name for p in path.iterdir()
                       if p.is_dir() and not p.name.startswith("."))
        candidates = [(store, k, name) for k in kinds for name in store.names(k)
                      if store.versions(k, name)]
    if kind is not None:
        candidates = [c for c in candidates if c[1] == kind]
    what = f"{kind!r} model" if kind is not None else "model"
    if not candidates:
        raise ModelStoreError(
            f"no {what} in {path}: give a model store (the folder `train --out` wrote), a "
            "model's folder in it (<store>/<kind>/<name>) or a version folder",
            source=str(path))
    if len(candidates) > 1:
        names = ", ".join(f"{k}/{name}" for _, k, name in candidates)
        store, k, name = candidates[0]
        raise ModelStoreError(
            f"{path} holds several {what}s ({names}): give one of their folders, e.g. "
            f"{store.root / k / name}", source=str(path))
    store, k, name = candidates[0]
    promoted = store.promoted(k, name)
    if promoted is not None:
        return Located(store, k, name, promoted, "promoted")
    return Located(store, k, name, store.versions(k, name)[-1], "newest")
