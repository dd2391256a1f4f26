"""Scoring: which cases are ready, and their MRRP risk as a stored :class:`RiskResult`.

A case is *ready* when it has final clinical values and every imaging modality (slide and
ultrasound), or when it has one of them and the wait window for the other has passed since
its first image arrived; it is then scored with the missing modality compensated by the
model's learned embedding. A case is scored again when what arrived for it changes
(``arrivals``, a digest of its stored rows) or when another model version is promoted; the
same model on the same features (``inputs_hash``) never writes a second row: when that row was
superseded (model v2 rolled back to v1, inputs A → B → A) it is made current again, with its
``revision`` raised, and published anew (:func:`reinstate`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import torch

from model_store import ModelStore, ModelVersion
from mrrp_pacs import audit
from mrrp_pacs.cases import CaseInputs, case_inputs
from mrrp_pacs.clock import iso_utc
from mrrp_pacs.config import Config
from mrrp_pacs.faults import fault_point
from mrrp_pacs.model.dataset import FAMILY_SOURCES, MODALITY_QUERY, cohort_from_store, collate
from mrrp_pacs.model.evaluate import (
    BaselineHazard,
    percentile_in,
    risk_groups,
    survival_probability,
)
from mrrp_pacs.model.train import MODEL_KIND, load
from mrrp_pacs.results import HORIZONS_MONTHS, EvidenceRef, RiskResult, UsRegion, significant
from mrrp_pacs.store import Store

LOGGER = logging.getLogger(__name__)

READY, WAITING, INCOMPLETE = "ready", "waiting", "incomplete"


@dataclass(frozen=True)
class Readiness:
    state: str  # ready | waiting | incomplete
    reason: str
    compensating: tuple[str, ...] = ()  # imaging modalities it will be scored without


def readiness(inputs: CaseInputs, wait_from: datetime | None, now: datetime,
              wait: timedelta, *, scored: bool = False) -> Readiness:
    """Whether a case can be scored at ``now``.

    ``wait_from`` is when the wait for a missing imaging modality began (UTC; see
    :func:`wait_started`), None when unknown; ``wait`` is how long to wait before the case is
    scored without that modality. A ``wait_from`` later than ``now`` waits until
    ``wait_from + wait``: never early. The wait delays a case's first score only: a case
    that has a current score (``scored``) stays ready, so rescoring looks at it again (and a
    shorter wait used then, as the demo does, does not send it back to waiting).
    """
    if not inputs.clinical:
        return Readiness(INCOMPLETE, "no final clinical values")
    missing = missing_imaging(inputs)
    if len(missing) == 2:
        return Readiness(INCOMPLETE, "no slide and no ultrasound image")
    if not missing:
        return Readiness(READY, "complete")
    if scored:
        return Readiness(READY, f"scored before without {missing[0]}", missing)
    if wait_from is not None and now - wait_from >= wait:
        return Readiness(READY, f"waited {wait} for {missing[0]}", missing)
    return Readiness(WAITING, f"waiting for {missing[0]} until "
                     f"{(wait_from or now) + wait:%Y-%m-%d %H:%M} UTC", missing)


def missing_imaging(inputs: CaseInputs) -> tuple[str, ...]:
    """The imaging modalities (``wsi``, ``us``) the case has no image of."""
    return tuple(m for m, present in (("wsi", bool(inputs.slides)),
                                      ("us", bool(inputs.us_images))) if not present)


def arrivals_digest(inputs: CaseInputs) -> str:
    """SHA-256 over the ids of every stored row the case is made of (what arrived for it)."""
    rows = sorted(
        [f"i{ref.row_id}" for refs in inputs.slides.values() for ref in refs]
        + [f"i{ref.row_id}" for ref in inputs.annotations + inputs.us_images]
        + [f"i{ref.row_id}" for ref, _ in inputs.us_rois]
        + [f"s{ref.row_id}" for ref in inputs.slide_sidecars + inputs.us_sidecars]
        + [f"r{ref.row_id}" for ref in inputs.reports]
        + [f"c{value.row_id}" for value in inputs.clinical.values()])
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()


@dataclass
class ScoreOutcome:
    """What :meth:`Scorer.score` did for one patient."""

    patient_key: str
    state: str  # scored (new, or made current again) | unchanged | failed
    score_id: int | None = None
    reason: str = ""
    result: RiskResult | None = None


@dataclass
class ScoringRun:
    outcomes: list[ScoreOutcome] = field(default_factory=list)
    waiting: int = 0
    incomplete: int = 0

    def count(self, state: str) -> int:
        return sum(o.state == state for o in self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        return {"scored": self.count("scored"), "unchanged": self.count("unchanged"),
                "failed": self.count("failed"), "waiting": self.waiting,
                "incomplete": self.incomplete}


class Scorer:
    """Scores patients with one stored model version (the promoted one by default).

    Raises
    ------
    ModelStoreError
        No such model, or its files do not verify.
    """

    def __init__(self, store: Store, config: Config, models: ModelStore,
                 model_name: str = "mrrp", version: str | None = None) -> None:
        self.store = store
        self.config = config
        self.version: ModelVersion = models.load(MODEL_KIND, model_name, version)
        manifest = self.version.manifest
        self.cutoff = float(manifest["risk_cutoff"])
        self.training_risk = np.asarray(manifest["training_outcomes"]["risk"], dtype=float)
        self.baseline = BaselineHazard(
            np.asarray(manifest["baseline_hazard"]["time_months"], dtype=float),
            np.asarray(manifest["baseline_hazard"]["cumulative_hazard"], dtype=float))
        architecture = manifest["architecture"]
        self.parameters = {"fusion": str(architecture.get("fusion")),
                           "missing": str(architecture.get("missing")),
                           "d_model": str(architecture.get("d_model")),
                           "cutoff": f"{self.cutoff:.6g}"}
        self.model = load(self.version)

    @property
    def model_version(self) -> str:
        return self.version.version

    def current_scores(self) -> dict[str, tuple[str, str | None]]:
        """Per patient key: (model version, arrivals digest) of its current score."""
        return {key: (version, arrivals) for key, version, arrivals in self.store.conn.execute(
            "SELECT patient_key, model_version, arrivals FROM scores "
            "WHERE superseded_by IS NULL")}

    def score(self, inputs: dict[str, CaseInputs], arrivals: dict[str, str] | None = None
              ) -> list[ScoreOutcome]:
        """Score the given cases from their current features (extract first).

        A patient whose features cannot form a model input fails alone, with the reason.
        """
        if not inputs:
            return []
        cohort = cohort_from_store(self.store, self.config, None, patient_keys=inputs.keys())
        load(self.version, cohort)  # refuses features from other extractor versions
        outcomes: list[ScoreOutcome] = []
        by_key = {record.patient_id: record for record in cohort.records}
        for key in inputs:
            record = by_key.get(key)
            if record is None:
                outcomes.append(ScoreOutcome(key, "failed", reason="no clinical features"))
                continue
            outcomes.append(self._score_one(inputs[key], record, cohort.clinical_spec,
                                            (arrivals or {}).get(key)))
        return outcomes

    def _score_one(self, inputs: CaseInputs, record: Any, spec: list[tuple[str, str, int]],
                   arrivals: str | None) -> ScoreOutcome:
        key = inputs.patient_key
        inputs_hash = self._inputs_hash(key)
        existing = self.store.conn.execute(
            "SELECT id, superseded_by FROM scores WHERE patient_key = ? AND "
            "model_version = ? AND inputs_hash = ?",
            (key, self.model_version, inputs_hash)).fetchone()
        if existing is not None and existing["superseded_by"] is not None:
            result = reinstate(self.store, int(existing["id"]), arrivals)
            LOGGER.info("score %d of model %s is current again", existing["id"],
                        self.version.label)
            return ScoreOutcome(key, "scored", int(existing["id"]), reason="current again",
                                result=result)
        if existing is not None:
            with self.store.transaction() as conn:
                # same model, same features: only what arrived may be new (e.g. a duplicate)
                conn.execute("UPDATE scores SET arrivals = ? WHERE id = ?",
                             (arrivals, existing[0]))
            return ScoreOutcome(key, "unchanged", existing[0])
        batch = collate([record], self.model.config.family_dims)
        with torch.inference_mode():
            output = self.model(batch)
        risk = float(output.risk[0])
        attention = output.clinical_attention[0].numpy().astype(float)
        order = np.argsort(-attention, kind="stable")
        present = [m for m, query in MODALITY_QUERY.items() if query in record.families]
        survival = survival_probability(np.array([risk]), self.baseline, HORIZONS_MONTHS)[0]
        result = RiskResult(
            patient_key=key,
            model_name=self.version.name,
            model_version=self.model_version,
            inputs_hash=inputs_hash,
            risk=round(risk, 6),
            percentile=round(float(percentile_in(self.training_risk, risk)), 2),
            group="high" if int(risk_groups(np.array([risk]), self.cutoff)[0]) else "low",
            cutoff=self.cutoff,
            rfs_probability={str(h): significant(float(p))
                             for h, p in zip(HORIZONS_MONTHS, survival, strict=True)},
            modalities_used=[*present, "clinical"],
            compensated=[m for m in MODALITY_QUERY if m not in present],
            clinical_attention=[(spec[i][0], round(float(attention[i]), 4)) for i in order],
            evidence=self._evidence(inputs),
            us_region=self._us_region(key) if "us" in present else None,
            algorithm_parameters=self.parameters,
            scored_at=self.store.stamp(),
        )
        with self.store.transaction() as conn:
            score_id = self.store.insert(conn, "scores", {
                "patient_key": key, "model_version": self.model_version,
                "inputs_hash": inputs_hash, "outputs": result.to_json(),
                "created_at": result.scored_at, "arrivals": arrivals})
            conn.execute("UPDATE scores SET superseded_by = ? WHERE patient_key = ? AND "
                         "id != ? AND superseded_by IS NULL", (score_id, key, score_id))
            audit.record(conn, at=result.scored_at, event=audit.SCORED,
                         who=f"model:{self.model_version}", what=f"score:{score_id}",
                         patient_key=key)
        fault_point("score.committed")
        return ScoreOutcome(key, "scored", score_id, result=result)

    def _inputs_hash(self, key: str) -> str:
        sources = sorted({source for source, _ in FAMILY_SOURCES.values()} | {"clinical"})
        rows = self.store.conn.execute(
            f"SELECT family, extractor, extractor_version, input_hash FROM features "
            f"WHERE patient_key = ? AND superseded_by IS NULL AND family IN "
            f"({','.join('?' * len(sources))}) ORDER BY family", (key, *sources)).fetchall()
        return hashlib.sha256(json.dumps([list(row) for row in rows]).encode()).hexdigest()

    def _evidence(self, inputs: CaseInputs) -> list[EvidenceRef]:
        roles = ([("wsi", ref) for refs in inputs.slides.values() for ref in refs]
                 + [("wsi_roi", ref) for ref in inputs.annotations]
                 + [("us_image", ref) for ref in inputs.us_images]
                 + [("us_roi", ref) for ref, _ in inputs.us_rois])
        evidence = []
        for role, ref in roles:
            study, sop_class = self.store.conn.execute(
                "SELECT study_instance_uid, sop_class_uid FROM instances WHERE id = ?",
                (ref.row_id,)).fetchone()
            evidence.append(EvidenceRef(role, study, ref.series_instance_uid,
                                        ref.sop_instance_uid, sop_class, ref.sha256))
        return evidence

    def _us_region(self, key: str) -> UsRegion | None:
        row = self.store.conn.execute(
            "SELECT array_sha256, meta FROM features WHERE patient_key = ? AND family = 'us' "
            "AND superseded_by IS NULL", (key,)).fetchone()
        meta = json.loads(row[1]) if row else {}
        if "image_uid" not in meta:  # features extracted before the region was recorded
            return None
        with np.load(io.BytesIO(self.store.objects.read_bytes(row[0]))) as archive:
            box = tuple(float(v) for v in archive["box_px"])
        return UsRegion(meta["image_uid"], (box[0], box[1], box[2], box[3]), meta["roi_source"],
                        meta.get("roi_shape", "box"), meta.get("frame"))


def reinstate(store: Store, score_id: int, arrivals: str | None) -> RiskResult:
    """Make a superseded score current again (the model or the inputs went back to it).

    The same model on the same features gives the same result, so the row is reused, not
    computed again: it supersedes the patient's current row, its ``revision`` grows by one
    (the publisher names the new objects by it, :func:`exporters.sr.result_uid`) and its
    ``scored_at`` becomes now, when it became current again (``created_at`` keeps the first
    time), so that its new SR is the newest in the viewer. One transaction.

    Returns
    -------
    RiskResult
        The result as now stored.
    """
    with store.transaction() as conn:
        key, outputs, version = conn.execute(
            "SELECT patient_key, outputs, model_version FROM scores WHERE id = ?",
            (score_id,)).fetchone()
        result = dataclasses.replace(RiskResult.from_json(outputs), scored_at=store.stamp())
        conn.execute("UPDATE scores SET superseded_by = ? WHERE patient_key = ? AND "
                     "id != ? AND superseded_by IS NULL", (score_id, key, score_id))
        conn.execute("UPDATE scores SET superseded_by = NULL, revision = revision + 1, "
                     "outputs = ?, arrivals = ? WHERE id = ?",
                     (result.to_json(), arrivals, score_id))
        audit.record(conn, at=result.scored_at, event=audit.SCORED, who=f"model:{version}",
                     what=f"score:{score_id}", patient_key=key,
                     detail="current again")
    return result


def first_image_at(store: Store, case: CaseInputs) -> datetime | None:
    """When the first slide or ultrasound image of ``case`` was received (UTC)."""
    ids = [ref.row_id for refs in case.slides.values() for ref in refs]
    ids += [ref.row_id for ref in case.us_images]
    if not ids:
        return None
    (first,) = store.conn.execute(
        f"SELECT MIN(received_at) FROM instances WHERE id IN ({','.join('?' * len(ids))})",
        ids).fetchone()
    return _utc(first)


def wait_started(store: Store, case: CaseInputs, now: datetime, *, record: bool = True
                 ) -> datetime | None:
    """When the wait for ``case``'s missing imaging modality began (UTC), as known at ``now``.

    The earliest of two stamps that is not later than ``now``: the first image's
    ``received_at``, and when scoring first saw the case with one modality (``case_waits``).
    A stamp later than ``now`` means the clock was stepped back after writing it (or another
    host's clock runs ahead), so the time since then is unknown and it is left out: counting
    from it would keep the case waiting for the length of the step (a year, after a wrong
    hardware clock), and treating it as elapsed would score early. The second stamp bounds
    the wait to ``wait`` after scoring first saw the case, whatever the clocks did.

    With ``record`` (what the scoring pass does), the first sighting is stored, and a stored
    sighting later than ``now`` is replaced by ``now``. Read-only callers (``cases``,
    ``/metrics``) pass ``record=False``. Returns None for a case with both or no modalities.
    """
    if len(missing_imaging(case)) != 1:
        return None
    first = first_image_at(store, case)
    row = store.conn.execute("SELECT seen_at FROM case_waits WHERE patient_key = ?",
                             (case.patient_key,)).fetchone()
    seen = _utc(row[0]) if row is not None else None
    if seen is None or seen > now:
        seen = now
        if record:
            with store.transaction() as conn:
                conn.execute("INSERT INTO case_waits (patient_key, seen_at) VALUES (?, ?) "
                             "ON CONFLICT (patient_key) DO UPDATE SET seen_at = excluded.seen_at",
                             (case.patient_key, iso_utc(now)))
            if first is not None and first > now:
                LOGGER.warning("a case's first image is stamped %s, later than now (clock "
                               "stepped back?): its wait runs from now", iso_utc(first))
    return min(stamp for stamp in (first, seen) if stamp is not None and stamp <= now)


def _utc(stamp: str | None) -> datetime | None:
    return None if stamp is None else datetime.fromisoformat(stamp).astimezone(UTC)


def judge_cases(store: Store, config: Config, now: datetime, wait: timedelta, *,
                record: bool = True) -> dict[str, tuple[CaseInputs, Readiness]]:
    """Every case with its readiness at ``now``: the one rule for scoring runs, ``cases`` and
    ``/metrics``. ``record`` as in :func:`wait_started` (read-only callers pass False)."""
    scored = {key for (key,) in store.conn.execute(
        "SELECT DISTINCT patient_key FROM scores WHERE superseded_by IS NULL")}
    return {key: (case, readiness(case, wait_started(store, case, now, record=record), now,
                                  wait, scored=key in scored))
            for key, case in case_inputs(store, config).items()}


def due_cases(store: Store, config: Config, scorer: Scorer, now: datetime, wait: timedelta,
              everyone: bool = False, patient_keys: Collection[str] | None = None,
              ) -> tuple[dict[str, CaseInputs], dict[str, str], ScoringRun]:
    """Ready cases to (re)score: new arrivals or another model; all ready ones if ``everyone``.

    Returns the cases, their arrivals digests, and a run with the waiting/incomplete counts.
    """
    run = ScoringRun()
    current = scorer.current_scores()
    due: dict[str, CaseInputs] = {}
    digests: dict[str, str] = {}
    for key, (case, state) in judge_cases(store, config, now, wait).items():
        if patient_keys is not None and key not in patient_keys:
            continue
        if state.state == WAITING:
            run.waiting += 1
            continue
        if state.state == INCOMPLETE:
            run.incomplete += 1
            continue
        digest = arrivals_digest(case)
        if everyone or current.get(key) != (scorer.model_version, digest):
            due[key] = case
            digests[key] = digest
    return due, digests, run

