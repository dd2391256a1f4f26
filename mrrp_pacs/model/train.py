"""Training the MRRP model: Cox partial likelihood, Adam, inner cross-validation, the store.

Mini-batches of 64 patients stratified by event (each batch is a Cox risk set), seeded and
deterministic on CPU. Inner cross-validation on the training patients chooses the learning rate
and the number of epochs; the model is then refitted on all of them for that many epochs
(``TrainSettings.tune``; without it, one inner validation split early-stops a single fit). The
missing-modality vectors start at the mean pooled vector of the training patients and are not
weight-decayed; modality dropout (on by default, :data:`DEFAULT_MODALITY_DROPOUT`) hides present
modalities in training so that they are fitted at all. The stored version
carries everything scoring needs: weights (safetensors), the architecture config, the extractor
names and versions the model was trained on, the training cohort, the risk cutoff (training
median), the Breslow baseline hazard and the training risk distribution.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import safetensors.torch
import torch

from model_store import ModelStore, ModelVersion
from mrrp_pacs import __version__
from mrrp_pacs.errors import CohortError, MetricUndefined, ModelStoreError
from mrrp_pacs.model.dataset import Cohort, collate, describe
from mrrp_pacs.model.evaluate import breslow_baseline, harrell_c
from mrrp_pacs.model.fusion import Batch, FamilyTokens, FusionConfig, ModalityBranch, MrrpFusion
from mrrp_pacs.model.losses import Ties, cox_partial_log_likelihood

LOGGER = logging.getLogger(__name__)

MODEL_KIND = "mrrp"
TRAINER_VERSION = "1"  # what a stored version needs to load, not how it was fitted


@dataclass(frozen=True)
class TrainSettings:
    """How a model is fitted (docs/model.md, "Training").

    With ``tune`` (the default), inner ``inner_folds``-fold cross-validation on the training
    patients chooses the learning rate among ``learning_rates`` and the number of epochs
    (≤ ``max_epochs``), then the model is refitted on every training patient for that many
    epochs. Without it, one inner validation split (``validation_fraction``) early-stops a
    single fit at ``learning_rate``.
    """

    max_epochs: int = 60
    learning_rate: float = 1e-3
    weight_decay: float = 4e-6  # as in the MRRP paper
    patience: int = 12  # epochs without a better validation score before stopping
    validation_fraction: float = 0.2
    seed: int = 0
    ties: Ties = "efron"
    # patients per Adam step; batches are stratified so each holds its share of the events
    # (the Cox risk set is the batch); 0 = full batch
    batch_size: int = 64
    # what the inner validation watches: "loss" (partial likelihood per event) or "c_index"
    # (Harrell); the loss can rise from overconfidence while the ranking still improves
    stop_on: str = "loss"
    tune: bool = True
    learning_rates: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    inner_folds: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "learning_rates", tuple(float(r) for r in self.learning_rates))
        if self.stop_on not in ("loss", "c_index"):
            raise ValueError(f"stop_on = {self.stop_on!r}: expected 'loss' or 'c_index'")
        if self.tune and (not self.learning_rates or self.inner_folds < 2):
            raise ValueError("tuning needs at least one learning rate and two inner folds")
        if self.max_epochs < 1 or self.batch_size < 0:
            raise ValueError("max_epochs must be ≥ 1 and batch_size ≥ 0")


@dataclass
class History:
    """Per-epoch figures of the final fit, and what the inner cross-validation chose.

    ``validation_*`` are per epoch of the final fit when it early-stopped on a validation split;
    after tuning they are the inner cross-validation's mean curve at the chosen learning rate
    (the final refit has no validation patients). ``tuning`` maps each learning rate to its
    best mean inner score and epoch.
    """

    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    validation_c_index: list[float] = field(default_factory=list)
    best_epoch: int = 0
    stopped_epoch: int = 0
    learning_rate: float = 0.0
    tuning: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class TrainedModel:
    model: MrrpFusion
    config: FusionConfig
    history: History
    train_risk: np.ndarray  # risk of every training patient (inner validation included)


DEFAULT_MODALITY_DROPOUT = 0.2
MISSING_RATE_FACTOR = 10.0


def config_for(cohort: Cohort, **overrides: Any) -> FusionConfig:
    """The default architecture for a cohort's families; a modality the cohort has no data for
    at all (a clinical-only table) is compensated by its learned vector. Modality dropout is
    :data:`DEFAULT_MODALITY_DROPOUT` unless overridden: without it the missing-modality vectors
    learn only from the few patients who really lack a modality."""
    dims = cohort.family_dims()
    slots = {}
    radiomics = next((r.families["us_radiomics"] for r in cohort.records
                      if "us_radiomics" in r.families), None)
    if radiomics is not None:
        slots["us_radiomics"] = int(radiomics.shape[0])
    compensated = []
    for modality, query in (("wsi", "wsi_deep"), ("us", "us_deep")):
        if query not in dims:
            dims[query] = 1  # a placeholder input: the branch only supplies its missing vector
            compensated.append(modality)
    settings: dict[str, Any] = {"family_dims": dims, "clinical": cohort.clinical_spec,
                                "token_slots": slots, "compensated": tuple(compensated),
                                "modality_dropout": DEFAULT_MODALITY_DROPOUT}
    settings.update(overrides)
    return FusionConfig(**settings)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch and numpy and make torch deterministic for the block; restore after."""
    state = torch.random.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
        torch.use_deterministic_algorithms(deterministic)


def inner_split(event: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (fit, validation), stratified by event status."""
    rng = np.random.default_rng(seed)
    validation: list[int] = []
    for value in (False, True):
        members = np.flatnonzero(event == value)
        rng.shuffle(members)
        validation.extend(members[: max(1, round(len(members) * fraction))].tolist()
                          if len(members) > 1 else [])
    held = np.zeros(len(event), bool)
    held[validation] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def predict(model: MrrpFusion, cohort: Cohort, batch_size: int = 256) -> np.ndarray:
    """Risk (log hazard, higher = worse) of every patient, in eval mode."""
    model.eval()
    dims = model.config.family_dims
    risks = []
    with torch.inference_mode():
        for start in range(0, len(cohort.records), batch_size):
            batch = collate(cohort.records[start : start + batch_size], dims)
            risks.append(model(batch).risk.numpy())
    return np.concatenate(risks).astype(np.float64) if risks else np.zeros(0)


def train(cohort: Cohort, config: FusionConfig, settings: TrainSettings = TrainSettings()
          ) -> TrainedModel:
    """Fit a fresh model on ``cohort`` (every record needs an outcome).

    With ``settings.tune``: inner cross-validation chooses the learning rate and the number of
    epochs, then the model is refitted on the whole cohort. Otherwise one stratified inner
    validation split early-stops a single fit (the weights of the best epoch are kept).
    """
    if any(r.outcome is None for r in cohort.records):
        raise CohortError("every training patient needs an outcome")
    event = cohort.event
    if event.sum() < 2:
        raise CohortError(f"the training cohort has {int(event.sum())} events: too few to fit")
    if settings.tune and event.sum() >= 2 * settings.inner_folds:
        rate, epochs, curves, tuning = _tune(cohort, config, settings)
        model, history = fit_once(cohort, None, config, settings, rate, epochs)
        history.validation_loss = curves["loss"][:epochs]
        history.validation_c_index = curves["c_index"][:epochs]
        history.best_epoch = history.stopped_epoch = epochs
        history.tuning = tuning
    else:
        if settings.tune:
            LOGGER.warning("%d events cannot fill %d inner folds: one fit early-stopped on a "
                           "validation split instead of tuning", int(event.sum()),
                           settings.inner_folds)
        fit_idx, val_idx = inner_split(event, settings.validation_fraction, settings.seed)
        model, history = fit_once(cohort.subset(fit_idx), cohort.subset(val_idx), config, settings,
                              settings.learning_rate, settings.max_epochs)
    LOGGER.info("trained at learning rate %g for %d epochs (best %d)", history.learning_rate,
                history.stopped_epoch, history.best_epoch)
    return TrainedModel(model, config, history, predict(model, cohort))


def _tune(cohort: Cohort, config: FusionConfig, settings: TrainSettings
          ) -> tuple[float, int, dict[str, list[float]], dict[str, dict[str, float]]]:
    """Learning rate and epochs with the best mean inner-validation score over the folds.

    Every fold trains up to ``max_epochs`` (early stopping at ``patience``; a stopped fold
    keeps its last score for the later epochs, so the mean curve stays defined).
    """
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(settings.inner_folds, shuffle=True, random_state=settings.seed)
    pairs = list(folds.split(np.zeros(len(cohort.event)), cohort.event))
    best: tuple[float, float, int, dict[str, list[float]]] | None = None
    tuning: dict[str, dict[str, float]] = {}
    for rate in settings.learning_rates:
        curves: dict[str, list[np.ndarray]] = {"loss": [], "c_index": []}
        for number, (fit_idx, val_idx) in enumerate(pairs):
            fold_settings = replace(settings, seed=settings.seed + 1000 * (number + 1))
            _, history = fit_once(cohort.subset(fit_idx), cohort.subset(val_idx), config,
                              fold_settings, rate, settings.max_epochs)
            for key, values in (("loss", history.validation_loss),
                                ("c_index", history.validation_c_index)):
                padded = np.full(settings.max_epochs, values[-1] if values else np.nan)
                padded[: len(values)] = values
                curves[key].append(padded)
        mean = {key: np.nanmean(np.stack(v), axis=0) for key, v in curves.items()}
        score = mean["loss"] if settings.stop_on == "loss" else -mean["c_index"]
        if np.all(np.isnan(score)):
            continue
        epoch = int(np.nanargmin(score))
        tuning[f"{rate:g}"] = {"epochs": epoch + 1, "loss": float(mean["loss"][epoch]),
                               "c_index": float(mean["c_index"][epoch])}
        if best is None or score[epoch] < best[0] - 1e-9:
            best = (float(score[epoch]), rate, epoch + 1,
                    {k: [float(x) for x in v] for k, v in mean.items()})
    if best is None:
        raise CohortError("inner cross-validation found no comparable pair of validation "
                          "patients: the cohort is too small to tune; use --no-tune")
    return best[1], best[2], best[3], tuning


def fit_once(fit: Cohort, validation: Cohort | None, config: FusionConfig,
         settings: TrainSettings, rate: float, epochs: int) -> tuple[MrrpFusion, History]:
    """One fit at learning rate ``rate``: with ``validation``, early-stopped at its best epoch
    (patience ``settings.patience``); without, exactly ``epochs`` epochs."""
    dims = config.family_dims
    history = History(learning_rate=rate)
    with seeded(settings.seed):
        model = MrrpFusion(config)
        fit_batch = collate(fit.records, dims)
        model.fit_normalisation(fit_batch)
        _start_missing_vectors(model, fit_batch)
        missing = [p for name, p in model.named_parameters() if name.endswith(".missing")]
        others = [p for name, p in model.named_parameters() if not name.endswith(".missing")]
        # The missing-modality vectors stand for a pooled vector: no weight decay pulls them
        # towards zero (the "ignore" arm), and they learn MISSING_RATE_FACTOR times faster,
        # since only absent or dropped patients move them and Adam's steps are ~lr-sized.
        optimiser = torch.optim.Adam([
            {"params": others, "weight_decay": settings.weight_decay},
            {"params": missing, "weight_decay": 0.0, "lr": rate * MISSING_RATE_FACTOR}],
            lr=rate)
        val_batch = collate(validation.records, dims) if validation is not None else None
        best_score, best_state = math.inf, copy.deepcopy(model.state_dict())
        generator = np.random.default_rng(settings.seed)
        epoch = 0
        for epoch in range(1, epochs + 1):
            model.train()
            losses = []
            for index in stratified_batches(fit.event, settings.batch_size, generator):
                batch = take(fit_batch, index)
                assert batch.time is not None and batch.event is not None
                optimiser.zero_grad()
                loss = cox_partial_log_likelihood(model(batch).risk, batch.time, batch.event,
                                                  ties=settings.ties)
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
            history.train_loss.append(float(np.mean(losses)))
            if val_batch is None or validation is None:
                continue
            model.eval()
            with torch.inference_mode():
                assert val_batch.time is not None and val_batch.event is not None
                val_risk = model(val_batch).risk
                val_loss = float(cox_partial_log_likelihood(val_risk, val_batch.time,
                                                            val_batch.event, ties=settings.ties))
            history.validation_loss.append(val_loss)
            try:
                history.validation_c_index.append(harrell_c(
                    validation.time, validation.event, val_risk.numpy().astype(np.float64)))
            except MetricUndefined:  # a tiny validation split may hold no comparable pair
                history.validation_c_index.append(float("nan"))
            score = (val_loss if settings.stop_on == "loss"
                     else -history.validation_c_index[-1])
            if score < best_score - 1e-6:  # NaN (no comparable pair) never improves
                best_score, best_state = score, copy.deepcopy(model.state_dict())
                history.best_epoch = epoch
            elif epoch - history.best_epoch >= settings.patience:
                break
        history.stopped_epoch = epoch
        if val_batch is not None:
            model.load_state_dict(best_state)
        else:
            history.best_epoch = epoch
        model.eval()
    return model, history


@torch.no_grad()
def _start_missing_vectors(model: MrrpFusion, batch: Batch, chunk: int = 128) -> None:
    """Start each modality's missing vector at the mean pooled vector of the patients who have
    the modality (the untrained branch's output): zero, its old start, is the "ignore" arm,
    and a vector that starts there barely moves."""
    model.eval()
    n = batch.clinical_values.shape[0]
    for modality, branch in model.branches.items():
        assert isinstance(branch, ModalityBranch)
        if modality in model.config.compensated:
            continue
        total, count = torch.zeros_like(branch.missing), 0
        for start in range(0, n, chunk):
            part = take(batch, np.arange(start, min(n, start + chunk)))
            pooled, _, present = branch(part)
            total += pooled[present].sum(0)
            count += int(present.sum())
        if count:
            branch.missing.copy_(total / count)


def stratified_batches(event: np.ndarray, size: int, rng: np.random.Generator
                       ) -> list[np.ndarray]:
    """Index arrays of one epoch's mini-batches, each holding its share of the events.

    Events and censored patients are shuffled separately and dealt in turn to
    ``round(n / size)`` batches, so every batch holds about ``size`` patients and, when there
    are at least as many events as batches, at least one event (a batch without an event has
    no Cox partial likelihood and is skipped). ``size`` 0 = one full batch.
    """
    n = len(event)
    if size <= 0 or size >= n:
        return [np.arange(n)]
    count = max(1, round(n / size))
    dealt = np.concatenate([rng.permutation(np.flatnonzero(event)),
                            rng.permutation(np.flatnonzero(~event))])
    batches = [np.sort(dealt[i::count]) for i in range(count)]
    return [b for b in batches if event[b].any()]


def take(batch: Batch, index: np.ndarray) -> Batch:
    """The patients ``index`` of a collated batch (padding as in the whole batch)."""
    rows = torch.from_numpy(np.asarray(index, dtype=np.int64))
    return Batch(
        families={f: FamilyTokens(t.tokens[rows], t.mask[rows])
                  for f, t in batch.families.items()},
        positions={m: p[rows] for m, p in batch.positions.items()},
        present={m: p[rows] for m, p in batch.present.items()},
        clinical_values=batch.clinical_values[rows],
        clinical_missing=batch.clinical_missing[rows],
        time=None if batch.time is None else batch.time[rows],
        event=None if batch.event is None else batch.event[rows],
    )


def save(store: ModelStore, name: str, trained: TrainedModel, cohort: Cohort,
         settings: TrainSettings, metrics: dict[str, Any]) -> ModelVersion:
    """Write the model version (weights + manifest) into the store."""
    weights = safetensors.torch.save({k: v.contiguous()
                                      for k, v in trained.model.state_dict().items()})
    times, cumulative_hazard = breslow_baseline(trained.train_risk, cohort.time, cohort.event)
    manifest = {
        "code_version": __version__,
        "trainer_version": TRAINER_VERSION,
        "architecture": trained.config.to_dict(),
        "extractors": cohort.extractors,
        "clinical_spec": [list(v) for v in cohort.clinical_spec],
        "training": {**describe(cohort), "settings": asdict(settings),
                     "history": asdict(trained.history)},
        "risk_cutoff": float(np.median(trained.train_risk)),
        # outcomes and risks of the training cohort, without patient ids: the reference for
        # IPCW metrics, the null Brier and percentiles when the model is assessed later
        "training_outcomes": {"time_months": cohort.time.round(3).tolist(),
                              "event": cohort.event.astype(int).tolist(),
                              "risk": trained.train_risk.round(6).tolist()},
        "baseline_hazard": {"time_months": times.tolist(),
                            "cumulative_hazard": cumulative_hazard.tolist()},
        "training_risk_percentiles": np.percentile(trained.train_risk,
                                                   np.arange(101)).tolist(),
        "metrics": metrics,
    }
    return store.save(MODEL_KIND, name, {"weights.safetensors": weights}, manifest)


def load(version: ModelVersion, cohort: Cohort | None = None) -> MrrpFusion:
    """Rebuild a stored model; refuse features made by other extractor versions.

    Raises
    ------
    ModelStoreError
        The manifest is not an MRRP model of this trainer, or ``cohort``'s features were made by
        extractors other than the ones the model was trained on.
    """
    manifest = version.manifest
    if manifest.get("kind") != MODEL_KIND or manifest.get("trainer_version") != TRAINER_VERSION:
        raise ModelStoreError(f"{version.label} is not an MRRP model of trainer version "
                              f"{TRAINER_VERSION}")
    if cohort is not None:
        trained_on = manifest.get("extractors", {})
        for family, found in cohort.extractors.items():
            if family in trained_on and trained_on[family] != found:
                raise ModelStoreError(
                    f"{version.label} was trained on {family} features from extractor "
                    f"{trained_on[family]}, but these features come from {found}: extract them "
                    "again with the model's extractor or train a new model")
    model = MrrpFusion(FusionConfig.from_dict(manifest["architecture"]))
    state = safetensors.torch.load(version.file("weights.safetensors").read_bytes())
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelStoreError(f"{version.label}: its weights do not fit this code's "
                              f"architecture ({str(exc).splitlines()[0]}); train a new model"
                              ) from None
    model.eval()
    return model
