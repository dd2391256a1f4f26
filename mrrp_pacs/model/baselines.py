"""Baselines on the MRRP model's own train/test splits (issue 16): what a classical survival
model makes of the same features, and, on the phantom, what the truth allows.

Feature baselines (:func:`fit_baselines`) read a :class:`~mrrp_pacs.model.dataset.Cohort` through
one fixed-width design per patient (:func:`patient_features`), fitted on the training patients
only, and return the test patients' risks:

``cox_clinical``
    Cox PH (Efron ties, ridge :data:`RIDGE_ALPHA`) on the clinical columns only.
``coxnet_features``
    Elastic-net Cox (``l1_ratio`` 0.5) on clinical + family components; the penalty is chosen
    by 5-fold cross-validated partial likelihood on the training patients (Verweij & van
    Houwelingen 1993, glmnet's ``cv.glmnet`` deviance), folds stratified by event and seeded.
``cox_features``
    Cox PH with the same small ridge on every column.
``rsf_features``
    Random survival forest, 300 trees, ``min_samples_leaf`` 15, ``max_features`` sqrt, seeded.

Phantom baselines (:func:`truth_baselines`) read the phantom's truth, not features: the true
log hazard itself (``oracle``) and a Cox model fitted on the true hazard's own terms
(``cox_true_form``, :func:`mrrp_pacs.phantom.cohort.hazard_design`): the correctly specified
model, the ceiling of anything learnt from a training set of this size.

Risk: a log hazard or risk score, **higher = worse**, everywhere.
"""

from __future__ import annotations

import csv
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from mrrp_pacs.errors import CohortError
from mrrp_pacs.model.dataset import FAMILY_SOURCES, Cohort
from mrrp_pacs.model.losses import cox_partial_log_likelihood
from mrrp_pacs.phantom import cohort as phantom

FAMILY_MODALITY: dict[str, str] = {
    "wsi_deep": "wsi", "wsi_morphology": "wsi", "wsi_topology": "wsi",
    "us_deep": "us", "us_radiomics": "us", "us_text": "report",
}
"""The modality whose missing-indicator column a family's absence sets (a family not named
here is its own modality)."""
TILE_FAMILIES = ("wsi_deep", "wsi_morphology", "wsi_topology")
"""Summarised by the mean and the per-feature standard deviation over the slide's tiles (the
spread: tumour heterogeneity). Other token families by their mean only."""
SLOTTED_FAMILIES = ("us_radiomics",)
"""Tokens at fixed slots (49 radiomics groups × 24): flattened slot × feature, not averaged."""
BASELINES = ("cox_clinical", "coxnet_features", "cox_features", "rsf_features")
RIDGE_ALPHA = 0.1
"""Ridge penalty ½·α·‖β‖² of the Cox baselines (on standardised columns): small, only so that
a column that separates events does not send its coefficient to infinity."""
COXNET_L1_RATIO = 0.5
COXNET_ALPHAS = 50
COXNET_ALPHA_MIN_RATIO = 0.01
COXNET_FOLDS = 5
RSF_TREES = 300
RSF_MIN_SAMPLES_LEAF = 15


@dataclass(frozen=True)
class FeatureDesign:
    """A per-patient fixed-width design, fitted on the training patients of one split.

    ``values`` holds every patient of the cohort (row i = ``cohort.records[i]``); calling the
    design with an index array gives those rows. Each patient's row depends only on that
    patient and on what was fitted from the training patients.

    Attributes
    ----------
    names
        One per column: ``<clinical variable>`` (continuous, standardised),
        ``<variable>=level<j>`` (categorical, one-hot, level 0 the reference),
        ``<variable>:missing``, ``<family>:pc<k>`` (unit variance on the training patients
        having the family; 0 when the patient lacks it) and ``<modality>:missing``.
    blocks
        Column indices by block: ``"clinical"`` (variables and their missing indicators),
        each family, and ``"missing"`` (the modality indicators).
    values
        (n_patients, n_columns) float64.
    """

    names: tuple[str, ...]
    blocks: dict[str, np.ndarray]
    values: np.ndarray = field(repr=False)

    def __call__(self, index: Sequence[int] | np.ndarray) -> np.ndarray:
        return self.values[np.asarray(index, dtype=int)]

    def columns(self, *blocks: str) -> np.ndarray:
        """Column indices of ``blocks`` (absent blocks contribute none), in design order."""
        parts = [self.blocks[b] for b in blocks if b in self.blocks]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, int)


def _families(cohort: Cohort) -> list[str]:
    """Families present for some patient: the model's order first, then any other by name."""
    present = {f for r in cohort.records for f, tokens in r.families.items() if len(tokens)}
    return [f for f in FAMILY_SOURCES if f in present] + sorted(present - set(FAMILY_SOURCES))


def _summary(family: str, tokens: np.ndarray) -> np.ndarray:
    """One patient's fixed-width summary of a family's (N_tokens, D) tokens."""
    tokens = np.asarray(tokens, dtype=float)
    if family in SLOTTED_FAMILIES:
        return tokens.reshape(-1)
    if family in TILE_FAMILIES:
        return np.concatenate([tokens.mean(axis=0), tokens.std(axis=0)])
    return tokens.mean(axis=0)


def _family_block(cohort: Cohort, family: str, train: np.ndarray, components: int
                  ) -> tuple[np.ndarray, list[str]] | None:
    """(n, k) principal-component scores of ``family``, fitted on the training patients having
    it; ``None`` when fewer than two training patients have it (nothing to fit)."""
    n = len(cohort.records)
    have = np.array([len(r.families.get(family, ())) > 0 for r in cohort.records])
    train_have = np.asarray(train)[have[train]]
    if len(train_have) < 2:
        return None
    rows = np.flatnonzero(have)
    summaries = [_summary(family, cohort.records[i].families[family]) for i in rows]
    widths = {len(s) for s in summaries}
    if len(widths) != 1:
        raise CohortError(f"feature family {family} has summaries of different widths "
                          f"{sorted(widths)} across patients (slotted tokens need the same "
                          "slots for every patient): extract the family again", key=family)
    full = np.zeros((n, widths.pop()))
    full[rows] = np.stack(summaries)
    fit = full[train_have]
    mean = fit.mean(axis=0)
    std = fit.std(axis=0)
    std[std < 1e-12] = 1.0  # a constant feature stays 0
    standard = (full - mean) / std
    k = min(components, len(train_have) - 1, full.shape[1])
    _, _, vt = np.linalg.svd(standard[train_have], full_matrices=False)
    basis = vt[:k].T
    # sign: each axis's largest loading positive, so the same fit gives the same columns
    basis *= np.where(basis[np.abs(basis).argmax(axis=0), np.arange(k)] < 0, -1.0, 1.0)
    scores = standard @ basis
    spread = scores[train_have].std(axis=0)
    spread[spread < 1e-12] = 1.0
    scores /= spread
    scores[~have] = 0.0  # missing: the training mean of the patients having the family
    return scores, [f"{family}:pc{j + 1}" for j in range(k)]


def _clinical_block(cohort: Cohort, train: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Continuous standardised on the training patients (missing → mean, i.e. 0), categorical
    one-hot without the reference level 0 (missing → all 0), one indicator per variable."""
    values = np.stack([r.clinical_values for r in cohort.records]).astype(float)
    missing = np.stack([r.clinical_missing for r in cohort.records]).astype(bool)
    columns: list[np.ndarray] = []
    names: list[str] = []
    for j, (name, kind, levels) in enumerate(cohort.clinical_spec):
        seen = train[~missing[train, j]]
        if kind == "continuous":
            mean = values[seen, j].mean() if len(seen) else 0.0
            std = values[seen, j].std() if len(seen) else 1.0
            std = std if std > 1e-12 else 1.0
            columns.append(np.where(missing[:, j], 0.0, (values[:, j] - mean) / std))
            names.append(name)
        else:
            codes = np.where(missing[:, j], -1, values[:, j]).astype(int)
            for level in range(1, levels):
                columns.append((codes == level).astype(float))
                names.append(f"{name}=level{level}")
        columns.append(missing[:, j].astype(float))
        names.append(f"{name}:missing")
    return np.column_stack(columns) if columns else np.zeros((len(values), 0)), names


def patient_features(cohort: Cohort, train_idx: Sequence[int] | np.ndarray,
                     components: int = 8) -> FeatureDesign:
    """Fit a per-patient design on the training patients ``train_idx``; see :class:`FeatureDesign`.

    Per feature family: each patient's summary (mean over tokens; mean and per-feature standard
    deviation over tiles for :data:`TILE_FAMILIES`; the flattened slot × feature matrix for
    :data:`SLOTTED_FAMILIES`), standardised and reduced to at most ``components`` principal
    components, both fitted on the training patients having the family; components are scaled
    to unit variance there. A patient without the family gets 0 (the training mean) and the
    ``<modality>:missing`` indicator of its modality (:data:`FAMILY_MODALITY`) is 1 when the
    patient lacks any family of the modality. A family fewer than two training patients have
    gets no column and sets no indicator. Clinical: see :func:`_clinical_block`. Columns
    constant over the training patients (an indicator nobody in training sets, a level nobody
    has) are dropped.

    Raises
    ------
    CohortError
        No training patient, or a family whose summaries differ in width between patients.
    """
    train = np.unique(np.asarray(train_idx, dtype=int))
    if len(train) == 0:
        raise CohortError("the baselines need at least one training patient")
    if components < 1:
        raise CohortError(f"components must be at least 1, got {components}")
    blocks: list[tuple[str, np.ndarray, list[str]]] = []
    clinical, names = _clinical_block(cohort, train)
    blocks.append(("clinical", clinical, names))
    modality_missing: dict[str, np.ndarray] = {}
    for family in _families(cohort):
        fitted = _family_block(cohort, family, train, components)
        if fitted is None:
            continue  # no columns, so nothing imputed: it does not set its modality's indicator
        blocks.append((family, *fitted))
        modality = FAMILY_MODALITY.get(family, family)
        lacks = np.array([len(r.families.get(family, ())) == 0 for r in cohort.records])
        modality_missing[modality] = modality_missing.get(modality, lacks) | lacks
    blocks.append(("missing", np.column_stack(list(modality_missing.values())).astype(float)
                   if modality_missing else np.zeros((len(cohort.records), 0)),
                   [f"{m}:missing" for m in modality_missing]))
    kept_names: list[str] = []
    kept_values: list[np.ndarray] = []
    index: dict[str, np.ndarray] = {}
    for block, values, block_names in blocks:
        varies = np.ptp(values[train], axis=0) > 1e-12 if values.shape[1] else np.zeros(0, bool)
        start = len(kept_names)
        kept_names += [n for n, keep in zip(block_names, varies, strict=True) if keep]
        kept_values.append(values[:, varies])
        index[block] = np.arange(start, len(kept_names))
    return FeatureDesign(tuple(kept_names), index, np.hstack(kept_values))


def _standardiser(train_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train_rows.mean(axis=0)
    std = train_rows.std(axis=0)
    std[std < 1e-12] = 1.0
    return mean, std


def _log_partial_likelihood(eta: np.ndarray, time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Breslow log partial likelihood of each column of ``eta`` (n, m) → (m,), through the
    project's cross-checked loss (:mod:`mrrp_pacs.model.losses`)."""
    time_t, event_t = torch.from_numpy(time.astype(float)), torch.from_numpy(event.astype(bool))
    return np.array([-float(cox_partial_log_likelihood(
        torch.from_numpy(np.ascontiguousarray(column, dtype=float)), time_t, event_t,
        ties="breslow", reduction="sum")) for column in eta.T])


def coxnet_cv_alpha(x: np.ndarray, time: np.ndarray, event: np.ndarray, seed: int,
                    folds: int = COXNET_FOLDS) -> tuple[np.ndarray, np.ndarray, int]:
    """The elastic-net penalty path on ``x`` and the cross-validated choice along it.

    The path (:data:`COXNET_ALPHAS` values down to :data:`COXNET_ALPHA_MIN_RATIO` of the
    largest) is fitted on all rows; each of ``folds`` event-stratified folds (seeded) refits the
    path without the fold and scores it by the cross-validated partial likelihood
    ``l(β₋ₖ) − l₋ₖ(β₋ₖ)`` (Verweij & van Houwelingen), summed over folds.

    Returns
    -------
    (alphas, cv_log_likelihood, best)
        The path, its summed CV log partial likelihood per alpha, the index of the best.
    """
    from sksurv.linear_model import CoxnetSurvivalAnalysis
    from sksurv.util import Surv

    target = Surv.from_arrays(event, time)
    path = CoxnetSurvivalAnalysis(l1_ratio=COXNET_L1_RATIO, n_alphas=COXNET_ALPHAS,
                                  alpha_min_ratio=COXNET_ALPHA_MIN_RATIO).fit(x, target)
    alphas = np.asarray(path.alphas_)
    folds = min(folds, int(event.sum()), int((~event).sum()))
    if folds < 2:
        raise CohortError("the elastic-net baseline needs at least two training patients with "
                          "an event and two without")
    score = np.zeros(len(alphas))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit, _ in splitter.split(x, event):
        model = CoxnetSurvivalAnalysis(l1_ratio=COXNET_L1_RATIO, alphas=alphas).fit(
            x[fit], target[fit])
        coef = np.asarray(model.coef_)
        score += (_log_partial_likelihood(x @ coef, time, event)
                  - _log_partial_likelihood(x[fit] @ coef, time[fit], event[fit]))
    return alphas, score, int(np.argmax(score))


def fit_baselines(cohort: Cohort, train_idx: Sequence[int] | np.ndarray,
                  test_idx: Sequence[int] | np.ndarray, seed: int, components: int = 8,
                  models: Collection[str] = BASELINES) -> dict[str, np.ndarray]:
    """Fit the baselines on ``train_idx`` and return each one's risk on ``test_idx``.

    Parameters
    ----------
    cohort
        Patients with features; the training patients need outcomes.
    train_idx, test_idx
        Indices into ``cohort.records`` (the MRRP model's own split).
    seed
        Seeds the elastic net's CV folds and the forest: same seed, same risks.
    components
        Principal components per feature family (:func:`patient_features`).
    models
        A subset of :data:`BASELINES`.

    Returns
    -------
    dict
        Model name → (len(test_idx),) risk, higher = worse, in ``test_idx`` order.

    Raises
    ------
    CohortError
        A training patient without an outcome, too few training events, an unknown model.
    """
    from sksurv.ensemble import RandomSurvivalForest
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    unknown = set(models) - set(BASELINES)
    if unknown:
        raise CohortError(f"unknown baselines {sorted(unknown)}; known: {', '.join(BASELINES)}")
    train = np.asarray(train_idx, dtype=int)
    test = np.asarray(test_idx, dtype=int)
    time, event = cohort.time, cohort.event
    if np.isnan(time[train]).any():
        raise CohortError("every training patient of the baselines needs an outcome")
    if event[train].sum() < 2:
        raise CohortError("the baselines need at least two training events")
    design = patient_features(cohort, train, components)
    target = Surv.from_arrays(event[train], time[train])
    mean, std = _standardiser(design(train))
    x_train, x_test = (design(train) - mean) / std, (design(test) - mean) / std
    clinical = design.columns("clinical")
    risks: dict[str, np.ndarray] = {}
    for name in BASELINES:
        if name not in models:
            continue
        if name == "cox_clinical":
            if len(clinical) == 0:
                risks[name] = np.zeros(len(test))  # no clinical column: no information
                continue
            cox = CoxPHSurvivalAnalysis(alpha=RIDGE_ALPHA, ties="efron")
            risks[name] = cox.fit(x_train[:, clinical], target).predict(x_test[:, clinical])
        elif name == "cox_features":
            cox = CoxPHSurvivalAnalysis(alpha=RIDGE_ALPHA, ties="efron")
            risks[name] = cox.fit(x_train, target).predict(x_test)
        elif name == "coxnet_features":
            from sksurv.linear_model import CoxnetSurvivalAnalysis

            alphas, _, best = coxnet_cv_alpha(x_train, time[train], event[train], seed)
            net = CoxnetSurvivalAnalysis(l1_ratio=COXNET_L1_RATIO, alphas=alphas).fit(
                x_train, target)
            risks[name] = x_test @ np.asarray(net.coef_)[:, best]
        else:
            forest = RandomSurvivalForest(
                n_estimators=RSF_TREES, min_samples_leaf=RSF_MIN_SAMPLES_LEAF,
                max_features="sqrt", n_jobs=1, random_state=seed)
            risks[name] = forest.fit(design(train), target).predict(design(test))
    return {name: np.asarray(risk, dtype=float) for name, risk in risks.items()}


@dataclass(frozen=True)
class PhantomTruth:
    """What the phantom drew, per patient: outcome, true log hazard, traits, the clinical
    variables the hazard reads (:data:`mrrp_pacs.phantom.cohort.HAZARD_CLINICAL`)."""

    patient_ids: tuple[str, ...]
    time_months: np.ndarray
    event: np.ndarray
    true_log_hazard: np.ndarray
    traits: dict[str, np.ndarray]
    clinical: dict[str, np.ndarray]

    @classmethod
    def from_phantom(cls, cohort: phantom.Cohort) -> PhantomTruth:
        """From a drawn phantom cohort (:func:`mrrp_pacs.phantom.cohort.make_cohort`)."""
        return cls(tuple(cohort.ids), np.asarray(cohort.time_months, float),
                   np.asarray(cohort.event, bool), np.asarray(cohort.log_hazard, float),
                   {t: np.asarray(cohort.traits[t], float) for t in phantom.TRAITS},
                   {v: np.asarray(cohort.clinical[v], float) for v in phantom.HAZARD_CLINICAL})

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, str]], source: str = "truth.csv"
                  ) -> PhantomTruth:
        """From ``truth.csv`` rows (``csv.DictReader``).

        Raises
        ------
        CohortError
            A needed column is absent (a ``truth.csv`` from before issue 16 has no
            ``clinical_*`` columns: generate the phantom again) or a value is not a number.
        """
        rows = list(rows)
        if not rows:
            raise CohortError(f"{source} has no rows", source=source)
        needed = (["patient_id", "time_months", "event", "true_log_hazard"]
                  + [f"latent_{t}" for t in phantom.TRAITS]
                  + [f"clinical_{v}" for v in phantom.HAZARD_CLINICAL])
        absent = [c for c in needed if c not in rows[0]]
        if absent:
            raise CohortError(f"{source} lacks the columns {absent}: a truth.csv written "
                              "before the clinical_* columns existed; generate the phantom "
                              "again", source=source)

        def column(name: str) -> np.ndarray:
            try:
                return np.array([float(row[name]) for row in rows])
            except ValueError:
                raise CohortError(f"{source}: column {name} holds a value that is not a "
                                  "number", source=source) from None

        return cls(tuple(row["patient_id"] for row in rows), column("time_months"),
                   column("event") == 1, column("true_log_hazard"),
                   {t: column(f"latent_{t}") for t in phantom.TRAITS},
                   {v: column(f"clinical_{v}") for v in phantom.HAZARD_CLINICAL})

    @classmethod
    def read(cls, path: Path) -> PhantomTruth:
        """From a phantom's ``truth.csv`` (:mod:`mrrp_pacs.phantom.generator`)."""
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                return cls.from_rows(csv.DictReader(handle), source=str(path))
        except OSError as exc:
            raise CohortError(f"{path} cannot be read: {exc.strerror}",
                              source=str(path)) from None


def truth_baselines(truth: PhantomTruth, train_ids: Iterable[str], test_ids: Iterable[str]
                    ) -> dict[str, np.ndarray]:
    """The phantom's ceilings on the test patients, in ``test_ids`` order.

    ``oracle`` is the true log hazard; ``cox_true_form`` a Cox model (Efron, ridge
    :data:`RIDGE_ALPHA`) fitted on the training patients' :func:`hazard_design
    <mrrp_pacs.phantom.cohort.hazard_design>`: the true form with coefficients estimated.

    Raises
    ------
    CohortError
        A patient id not in ``truth``, or fewer than two training events.
    """
    from sksurv.linear_model import CoxPHSurvivalAnalysis
    from sksurv.util import Surv

    position = {pid: i for i, pid in enumerate(truth.patient_ids)}

    def rows(ids: Iterable[str]) -> np.ndarray:
        ids = list(ids)
        unknown = [pid for pid in ids if pid not in position]
        if unknown:
            raise CohortError(f"{len(unknown)} patient(s) of the split are not in the phantom's "
                              "truth: use the truth.csv of the phantom the features came from")
        return np.array([position[pid] for pid in ids], dtype=int)

    train, test = rows(train_ids), rows(test_ids)
    if truth.event[train].sum() < 2:
        raise CohortError("the true-form Cox needs at least two training events")
    design, _ = phantom.hazard_design(truth.traits, truth.clinical)
    cox = CoxPHSurvivalAnalysis(alpha=RIDGE_ALPHA, ties="efron").fit(
        design[train], Surv.from_arrays(truth.event[train], truth.time_months[train]))
    return {"oracle": truth.true_log_hazard[test].copy(),
            "cox_true_form": np.asarray(cox.predict(design[test]), dtype=float)}
