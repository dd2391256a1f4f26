"""Cohorts for the model: features from the store or a clinical table, outcomes, batches.

A cohort is a list of :class:`PatientRecord` (one per patient: token arrays per family, clinical
values, outcome). :func:`collate` pads them into a :class:`~mrrp_pacs.model.fusion.Batch`.
The model's token families are read from the extracted feature families as
:data:`FAMILY_SOURCES` says.
"""

from __future__ import annotations

import csv
import tomllib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrrp_pacs.cases import case_inputs
from mrrp_pacs.clinical_schema import load_schema
from mrrp_pacs.config import Config
from mrrp_pacs.errors import CohortError
from mrrp_pacs.features.cache import FeatureCache
from mrrp_pacs.model.fusion import Batch, FamilyTokens
from mrrp_pacs.store import Store

FAMILY_SOURCES: dict[str, tuple[str, str]] = {
    # model family: (feature family, array)   token shape
    "wsi_deep": ("wsi", "deep"),  # (tiles, d)
    "wsi_morphology": ("nuclei", "morphology"),  # (tiles, 328)
    "wsi_topology": ("nuclei", "topology"),  # (tiles, 504)
    "us_deep": ("us", "tokens"),  # (256, 64)
    "us_radiomics": ("radiomics", "tokens"),  # (49, 24)
    "us_text": ("text", "tokens"),  # (n, 384)
}
"""The one mapping from extracted feature families (:mod:`mrrp_pacs.features.families`) to
the model's token families."""
MODALITY_QUERY = {"wsi": "wsi_deep", "us": "us_deep"}


@dataclass(frozen=True)
class Outcome:
    time_months: float
    event: bool
    split: str | None = None  # train | test (optional column)


@dataclass
class PatientRecord:
    patient_id: str
    families: dict[str, np.ndarray]  # present families only
    positions: dict[str, np.ndarray]  # "wsi": (tiles, 2) µm, "us": (256, 2) grid
    clinical_values: np.ndarray  # (V,) float32
    clinical_missing: np.ndarray  # (V,) bool
    outcome: Outcome | None = None


@dataclass
class Cohort:
    records: list[PatientRecord]
    clinical_spec: list[tuple[str, str, int]]  # (name, kind, n_levels)
    extractors: dict[str, list[str]] = field(default_factory=dict)  # family -> [name, version]
    source: str = ""

    def family_dims(self) -> dict[str, int]:
        dims: dict[str, int] = {}
        for record in self.records:
            for family, tokens in record.families.items():
                dims.setdefault(family, int(tokens.shape[1]))
        return dims

    def subset(self, indices: Sequence[int] | np.ndarray) -> Cohort:
        return Cohort([self.records[int(i)] for i in indices], self.clinical_spec,
                      self.extractors, self.source)

    @property
    def time(self) -> np.ndarray:
        return np.array([r.outcome.time_months if r.outcome else np.nan for r in self.records])

    @property
    def event(self) -> np.ndarray:
        return np.array([bool(r.outcome.event) if r.outcome else False for r in self.records])

    @property
    def split(self) -> np.ndarray:
        return np.array([(r.outcome.split if r.outcome else None) or "" for r in self.records])


def read_outcomes(path: Path) -> dict[str, Outcome]:
    """``patient_id,time_months,event[,split]`` (event 1/0 or true/false).

    Raises
    ------
    CohortError
        Missing columns, unreadable values or a repeated patient; the message names the row.
    """
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise CohortError(f"outcomes file {path} cannot be read: {exc.strerror}") from None
    with handle:
        reader = csv.DictReader(handle)
        needed = {"patient_id", "time_months", "event"}
        if not needed <= set(reader.fieldnames or []):
            raise CohortError(f"{path}: needs columns {sorted(needed)}, has "
                              f"{reader.fieldnames}")
        outcomes: dict[str, Outcome] = {}
        for line, row in enumerate(reader, start=2):
            pid = (row["patient_id"] or "").strip()
            try:
                time = float(row["time_months"])
            except (TypeError, ValueError):
                raise CohortError(f"{path} line {line}: time_months "
                                  f"{row['time_months']!r} is not a number") from None
            event_text = (row["event"] or "").strip().lower()
            if event_text not in {"0", "1", "true", "false"}:
                raise CohortError(f"{path} line {line}: event {row['event']!r} is not 0/1")
            if not pid or time < 0 or not np.isfinite(time):
                raise CohortError(f"{path} line {line}: needs a patient_id and a time ≥ 0")
            if pid in outcomes:
                raise CohortError(f"{path} line {line}: patient {pid} appears twice")
            split = (row.get("split") or "").strip() or None
            if split not in (None, "train", "test"):
                raise CohortError(f"{path} line {line}: split {split!r} is not train/test")
            outcomes[pid] = Outcome(time, event_text in {"1", "true"}, split)
    if not outcomes:
        raise CohortError(f"{path} has no rows")
    return outcomes


def cohort_from_store(store: Store, config: Config, outcomes: dict[str, Outcome] | None,
                      patient_keys: Collection[str] | None = None) -> Cohort:
    """Every patient with clinical features (and, when ``outcomes`` is given, an outcome).

    Patients are matched to outcome rows by patient key or by patient id (unique ids only).
    Without outcomes, ``patient_keys`` restricts the cohort to those patients (by key); their
    records are named by patient key.

    Raises
    ------
    CohortError
        A family extracted with different extractor versions across patients (extract again),
        or an outcome row whose patient has no features.
    """
    schema = load_schema(config.clinical.schema_file)
    spec: list[tuple[str, str, int]] = [(v.name, v.kind, len(v.levels))
                                        for v in schema.variables]
    cache = FeatureCache(store)
    inputs = case_inputs(store, config)
    by_id: dict[str, list[str]] = {}
    for key, case in inputs.items():
        by_id.setdefault(case.patient_id, []).append(key)
    records: list[PatientRecord] = []
    extractors: dict[str, list[str]] = {}
    if outcomes is not None:
        wanted: Collection[str] = outcomes.keys()
    elif patient_keys is not None:
        wanted = [key for key in inputs if key in patient_keys]
    else:
        wanted = [c.patient_id for c in inputs.values()]
    for pid in wanted:
        keys = [pid] if pid in inputs else by_id.get(pid, [])
        if len(keys) != 1:
            if outcomes is not None:
                raise CohortError(f"patient {pid} of the outcomes file is "
                                  f"{'ambiguous' if keys else 'not in the store'}")
            continue
        key = keys[0]
        clinical = cache.current(key, "clinical")
        if clinical is None:
            raise CohortError(f"patient {pid} has no clinical features: run mrrp-pacs extract")
        families: dict[str, np.ndarray] = {}
        positions: dict[str, np.ndarray] = {}
        for family, (source, array) in FAMILY_SOURCES.items():
            found = cache.current(key, source)
            if found is None:
                continue
            seen = extractors.setdefault(source, [found.extractor, found.version])
            if seen != [found.extractor, found.version]:
                raise CohortError(
                    f"feature family {source} was made by {seen} for some patients and by "
                    f"{[found.extractor, found.version]} for patient {pid}: run mrrp-pacs "
                    "extract so that every patient has the same extractor version")
            families[family] = found.arrays[array].astype(np.float32)
            if family == "wsi_deep":
                positions["wsi"] = found.arrays["positions_um"].astype(np.float32)
            elif family == "us_deep":
                positions["us"] = found.arrays["positions"].astype(np.float32)
        records.append(PatientRecord(
            pid, families, positions, clinical.arrays["values"].astype(np.float32),
            clinical.arrays["missing"].astype(bool),
            outcomes[pid] if outcomes is not None else None))
    if not records:
        raise CohortError("no patient with features: ingest and run mrrp-pacs extract first")
    return Cohort(records, spec, extractors, source=str(config.paths.db_file))


def cohort_from_table(table: Path, schema_path: Path) -> Cohort:
    """A clinical-only cohort: ``patient_id,time_months,event`` plus the schema's columns.

    The schema TOML declares each used column: ``[columns.<name>] kind = "continuous"`` or
    ``kind = "categorical"`` with ``levels = [...]``. Empty cells are missing.
    """
    try:
        schema = tomllib.loads(schema_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CohortError(f"schema {schema_path} cannot be read: {exc}") from None
    columns = schema.get("columns", {})
    if not columns:
        raise CohortError(f"schema {schema_path} declares no [columns.<name>]")
    spec: list[tuple[str, str, int]] = []
    for name, entry in columns.items():
        kind = entry.get("kind")
        if kind == "continuous":
            spec.append((name, kind, 0))
        elif kind == "categorical" and entry.get("levels"):
            spec.append((name, kind, len(entry["levels"])))
        else:
            raise CohortError(f"schema {schema_path}: column {name} needs kind = continuous, "
                              "or categorical with levels")
    outcomes = read_outcomes(table)
    records = []
    with table.open(newline="", encoding="utf-8") as handle:
        rows = {row["patient_id"].strip(): row for row in csv.DictReader(handle)}
    for pid, outcome in outcomes.items():
        row = rows[pid]
        values = np.zeros(len(spec), np.float32)
        missing = np.ones(len(spec), bool)
        for i, (name, kind, _) in enumerate(spec):
            if name not in row:
                raise CohortError(f"{table}: the schema's column {name} is not in the table")
            cell = (row[name] or "").strip()
            if not cell:
                continue
            if kind == "continuous":
                try:
                    values[i] = float(cell)
                except ValueError:
                    raise CohortError(f"{table}: patient {pid} column {name} value {cell!r} is "
                                      "not a number") from None
            else:
                levels = [str(level) for level in columns[name]["levels"]]
                if cell not in levels:
                    raise CohortError(f"{table}: patient {pid} column {name} value {cell!r} is "
                                      f"not one of the levels {levels}")
                values[i] = levels.index(cell)
            missing[i] = False
        records.append(PatientRecord(pid, {}, {}, values, missing, outcome))
    return Cohort(records, spec, {}, source=str(table))


def collate(records: Sequence[PatientRecord], family_dims: dict[str, int]) -> Batch:
    """Pad ``records`` into one batch (families absent for a patient have an all-False mask)."""
    n = len(records)
    families: dict[str, FamilyTokens] = {}
    for family, dim in family_dims.items():
        longest = max([r.families[family].shape[0] for r in records if family in r.families]
                      or [1])
        tokens = np.zeros((n, longest, dim), np.float32)
        mask = np.zeros((n, longest), bool)
        for i, record in enumerate(records):
            values = record.families.get(family)
            if values is not None and len(values):
                tokens[i, : len(values)] = values
                mask[i, : len(values)] = True
        families[family] = FamilyTokens(torch.from_numpy(tokens), torch.from_numpy(mask))
    positions: dict[str, torch.Tensor] = {}
    for modality, query in MODALITY_QUERY.items():
        if query in families:
            longest = families[query].mask.shape[1]
            array = np.zeros((n, longest, 2), np.float32)
            for i, record in enumerate(records):
                if modality in record.positions:
                    pos = record.positions[modality]
                    array[i, : len(pos)] = pos
            positions[modality] = torch.from_numpy(array)
    present = {m: torch.tensor([q in r.families for r in records], dtype=torch.bool)
               for m, q in MODALITY_QUERY.items()}
    outcomes = [r.outcome for r in records]
    has_outcomes = all(o is not None for o in outcomes)
    return Batch(
        families=families,
        positions=positions,
        present=present,
        clinical_values=torch.from_numpy(np.stack([r.clinical_values for r in records])),
        clinical_missing=torch.from_numpy(np.stack([r.clinical_missing for r in records])),
        time=torch.tensor([o.time_months for o in outcomes if o is not None],
                          dtype=torch.float32) if has_outcomes else None,
        event=torch.tensor([o.event for o in outcomes if o is not None],
                           dtype=torch.bool) if has_outcomes else None,
    )


def describe(cohort: Cohort) -> dict[str, Any]:
    """Counts for the manifest and reports."""
    event = cohort.event
    return {"n": len(cohort.records), "events": int(event.sum()),
            "with_wsi": sum("wsi_deep" in r.families for r in cohort.records),
            "with_us": sum("us_deep" in r.families for r in cohort.records),
            "source": cohort.source}
