"""Training the MRRP model: Cox partial likelihood, Adam, early stopping, the model store.

Training is full-batch (the whole training split in one Cox risk set per step) when it fits,
seeded and deterministic on CPU. An inner validation split (stratified by event) decides when
to stop: the weights of the epoch with the lowest validation loss are kept. The stored version
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
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import safetensors.torch
import torch

from model_store import ModelStore, ModelVersion
from mrrp_pacs import __version__
from mrrp_pacs.errors import CohortError, MetricUndefined, ModelStoreError
from mrrp_pacs.model.dataset import Cohort, collate, describe
from mrrp_pacs.model.evaluate import breslow_baseline, harrell_c
from mrrp_pacs.model.fusion import FusionConfig, MrrpFusion
from mrrp_pacs.model.losses import Ties, cox_partial_log_likelihood

LOGGER = logging.getLogger(__name__)

MODEL_KIND = "mrrp"
TRAINER_VERSION = "1"


@dataclass(frozen=True)
class TrainSettings:
    max_epochs: int = 150
    learning_rate: float = 1e-3
    weight_decay: float = 4e-6  # as in the MRRP paper
    patience: int = 20  # epochs without a better validation loss before stopping
    validation_fraction: float = 0.2
    seed: int = 0
    ties: Ties = "efron"
    batch_size: int = 0  # 0 = full batch
    # what the inner validation split watches: "loss" (partial likelihood) or "c_index"
    # (Harrell); the loss can rise from overconfidence while the ranking still improves
    stop_on: str = "loss"


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    validation_loss: list[float] = field(default_factory=list)
    validation_c_index: list[float] = field(default_factory=list)
    best_epoch: int = 0
    stopped_epoch: int = 0


@dataclass
class TrainedModel:
    model: MrrpFusion
    config: FusionConfig
    history: History
    train_risk: np.ndarray  # risk of every training patient (inner validation included)


def config_for(cohort: Cohort, **overrides: Any) -> FusionConfig:
    """The default architecture for a cohort's families; a modality the cohort has no data for
    at all (a clinical-only table) is compensated by its learned vector."""
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
                                "token_slots": slots, "compensated": tuple(compensated)}
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
    """Fit a fresh model on ``cohort`` (every record needs an outcome)."""
    if any(r.outcome is None for r in cohort.records):
        raise CohortError("every training patient needs an outcome")
    event = cohort.event
    if settings.stop_on not in ("loss", "c_index"):
        raise ValueError(f"stop_on = {settings.stop_on!r}: expected 'loss' or 'c_index'")
    if event.sum() < 2:
        raise CohortError(f"the training cohort has {int(event.sum())} events: too few to fit")
    fit_idx, val_idx = inner_split(event, settings.validation_fraction, settings.seed)
    fit, validation = cohort.subset(fit_idx), cohort.subset(val_idx)
    dims = config.family_dims
    history = History()
    with seeded(settings.seed):
        model = MrrpFusion(config)
        fit_batch = collate(fit.records, dims)
        val_batch = collate(validation.records, dims)
        model.fit_normalisation(fit_batch)
        optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate,
                                     weight_decay=settings.weight_decay)
        best_loss, best_state = math.inf, copy.deepcopy(model.state_dict())
        generator = np.random.default_rng(settings.seed)
        for epoch in range(1, settings.max_epochs + 1):
            model.train()
            losses = []
            for batch in _batches(fit, fit_batch, settings.batch_size, generator, dims):
                assert batch.time is not None and batch.event is not None
                optimiser.zero_grad()
                loss = cox_partial_log_likelihood(model(batch).risk, batch.time, batch.event,
                                                  ties=settings.ties)
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
            model.eval()
            with torch.inference_mode():
                assert val_batch.time is not None and val_batch.event is not None
                val_risk = model(val_batch).risk
                val_loss = float(cox_partial_log_likelihood(val_risk, val_batch.time,
                                                            val_batch.event, ties=settings.ties))
            history.train_loss.append(float(np.mean(losses)))
            history.validation_loss.append(val_loss)
            try:
                history.validation_c_index.append(harrell_c(
                    validation.time, validation.event, val_risk.numpy().astype(np.float64)))
            except MetricUndefined:  # a tiny validation split may hold no comparable pair
                history.validation_c_index.append(float("nan"))
            score = (val_loss if settings.stop_on == "loss"
                     else -history.validation_c_index[-1])
            if score < best_loss - 1e-6:  # NaN (no comparable pair) never improves
                best_loss, best_state = score, copy.deepcopy(model.state_dict())
                history.best_epoch = epoch
            elif epoch - history.best_epoch >= settings.patience:
                break
        history.stopped_epoch = epoch
        model.load_state_dict(best_state)
        model.eval()
    LOGGER.info("trained %d epochs, best %d (validation %s %.4f)", history.stopped_epoch,
                history.best_epoch, settings.stop_on, abs(best_loss))
    return TrainedModel(model, config, history, predict(model, cohort))


def _batches(cohort: Cohort, full: Any, size: int, rng: np.random.Generator,
             dims: dict[str, int]) -> Iterator[Any]:
    if size <= 0 or size >= len(cohort.records):
        yield full
        return
    order = rng.permutation(len(cohort.records))
    for start in range(0, len(order), size):
        chunk = [cohort.records[i] for i in order[start : start + size]]
        if sum(bool(r.outcome and r.outcome.event) for r in chunk):
            yield collate(chunk, dims)


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
