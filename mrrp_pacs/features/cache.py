"""The feature cache: one row per (patient, family, extractor, version, input hash).

Arrays are stored as one compressed ``.npz`` in the object store, referenced by its SHA-256;
``meta`` (JSON) keeps names, shapes and flags. A new result for a patient and family marks the
previous current row ``superseded_by`` (nothing is deleted), so "current features" is simply the
row that is not superseded.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mrrp_pacs.store import Store


@dataclass
class FeatureSet:
    """What one extractor produced for one patient."""

    family: str
    extractor: str
    version: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def flags(self) -> list[str]:
        return list(self.meta.get("flags", []))


def input_hash(parts: list[object]) -> str:
    """SHA-256 over a JSON rendering of what went into an extraction (files, parameters)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]  # numpy stubs
    return buffer.getvalue()


class FeatureCache:
    def __init__(self, store: Store) -> None:
        self.store = store

    def find(self, patient_key: str, family: str, extractor: str, version: str,
             inputs: str) -> int | None:
        row = self.store.conn.execute(
            "SELECT id FROM features WHERE patient_key = ? AND family = ? AND extractor = ? "
            "AND extractor_version = ? AND input_hash = ?",
            (patient_key, family, extractor, version, inputs)).fetchone()
        return None if row is None else int(row[0])

    def put(self, patient_key: str, inputs: str, features: FeatureSet) -> int:
        """Store ``features`` and make them the patient's current ones for the family."""
        stored = self.store.objects.put_bytes(_npz(features.arrays))
        meta = {**features.meta,
                "shapes": {k: list(v.shape) for k, v in features.arrays.items()}}
        with self.store.transaction() as conn:
            existing = self.find(patient_key, features.family, features.extractor,
                                 features.version, inputs)
            if existing is not None:  # another worker got there first
                return existing
            new_id = self.store.insert(conn, "features", {
                "patient_key": patient_key,
                "family": features.family,
                "extractor": features.extractor,
                "extractor_version": features.version,
                "input_hash": inputs,
                "array_sha256": stored.sha256,
                "meta": json.dumps(meta, sort_keys=True),
                "created_at": self.store.stamp(),
            })
            conn.execute(
                "UPDATE features SET superseded_by = ? WHERE patient_key = ? AND family = ? "
                "AND superseded_by IS NULL AND id != ?",
                (new_id, patient_key, features.family, new_id))
        return new_id

    def replace(self, feature_id: int, features: FeatureSet) -> None:
        """Recomputed arrays for an existing key (``extract --force``); the old object stays."""
        stored = self.store.objects.put_bytes(_npz(features.arrays))
        meta = {**features.meta,
                "shapes": {k: list(v.shape) for k, v in features.arrays.items()}}
        with self.store.transaction() as conn:
            conn.execute("UPDATE features SET array_sha256 = ?, meta = ?, created_at = ? "
                         "WHERE id = ?", (stored.sha256, json.dumps(meta, sort_keys=True),
                                          self.store.stamp(), feature_id))
        self.revive(feature_id)

    def revive(self, feature_id: int) -> None:
        """Make a cached row current again (its inputs came back, e.g. a reverted report)."""
        row = self.store.conn.execute(
            "SELECT patient_key, family, superseded_by FROM features WHERE id = ?",
            (feature_id,)).fetchone()
        others = self.store.conn.execute(
            "SELECT count(*) FROM features WHERE patient_key = ? AND family = ? AND "
            "superseded_by IS NULL AND id != ?", (row[0], row[1], feature_id)).fetchone()[0]
        if row[2] is None and others == 0:
            return  # already the current one: nothing to write
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE features SET superseded_by = ? WHERE patient_key = ? AND family = ? "
                "AND superseded_by IS NULL AND id != ?",
                (feature_id, row[0], row[1], feature_id))
            conn.execute("UPDATE features SET superseded_by = NULL WHERE id = ?", (feature_id,))

    def current(self, patient_key: str, family: str) -> FeatureSet | None:
        row = self.store.conn.execute(
            "SELECT family, extractor, extractor_version, array_sha256, meta FROM features "
            "WHERE patient_key = ? AND family = ? AND superseded_by IS NULL",
            (patient_key, family)).fetchone()
        if row is None:
            return None
        with np.load(io.BytesIO(self.store.objects.read_bytes(row[3]))) as archive:
            arrays = {name: archive[name] for name in archive.files}
        return FeatureSet(row[0], row[1], row[2], arrays, json.loads(row[4]))

    def summary(self) -> dict[str, dict[str, list[str]]]:
        """Per patient: current families and the flags they carry."""
        found: dict[str, dict[str, list[str]]] = {}
        for patient_key, family, meta in self.store.conn.execute(
                "SELECT patient_key, family, meta FROM features WHERE superseded_by IS NULL "
                "ORDER BY patient_key, family"):
            entry = found.setdefault(patient_key, {"features": [], "flags": []})
            entry["features"].append(family)
            for flag in json.loads(meta).get("flags", []):
                if flag not in entry["flags"]:
                    entry["flags"].append(flag)
        return found
