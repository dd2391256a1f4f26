"""The phantom cohort: latent tumour traits, clinical variables and outcomes with a known hazard.

Outcomes follow a Cox model. The log hazard is a weighted sum of standardised latent traits per
modality (each modality's block scaled by its signal weight) plus one cross-modal interaction
(nuclear size × ultrasound margin irregularity). The traits are not stored beside the data:
:mod:`histology`, :mod:`ultrasound` and :mod:`reports` render them into pixels and words, and
``truth.csv`` keeps them only to measure how well features recover them.

Event times are Weibull (shape :data:`WEIBULL_SHAPE`) with a scale chosen by bisection so the
event fraction is ``CohortParameters.event_fraction`` (default :data:`TARGET_EVENT_FRACTION`)
under uniform administrative censoring over :data:`FOLLOW_UP_MONTHS`. The test split holds
``CohortParameters.test_fraction`` of the patients (default :data:`TEST_FRACTION`), stratified by
event. Neither changes a patient's traits, clinical values or images: only the outcome times and
the split, so a benchmark can re-draw outcomes on an already extracted phantom.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from sksurv.exceptions import NoComparablePairException
from sksurv.metrics import concordance_index_censored

TARGET_EVENT_FRACTION = 0.16
FOLLOW_UP_MONTHS = (24.0, 174.0)
WEIBULL_SHAPE = 1.3
CALIBRATION_SAMPLE = 20_000
TEST_FRACTION = 1 / 6

# Latent traits, standard normal, grouped by the modality they are rendered into.
TRAITS: dict[str, str] = {
    "nuclear_size": "wsi",       # tumour nuclear diameter
    "pleomorphism": "wsi",       # variability of nuclear size, shape and staining
    "tumour_density": "wsi",     # tumour-cell packing
    "lymphocytes": "wsi",        # tumour-infiltrating lymphocytes (protective)
    "lymph_clustering": "wsi",   # lymphocytes gathered in aggregates rather than scattered
    "us_margin": "us",           # lesion margin irregularity / spiculation
    "us_orientation": "us",      # taller-than-wide (not parallel) orientation
    "us_shadowing": "us",        # posterior acoustic shadowing
    "us_heterogeneity": "us",    # internal echo heterogeneity
    "vascularity": "text",       # Doppler vascularity: only in the report's words
}

# Log-hazard coefficient per standard deviation of each trait (before the modality weight).
COEFFICIENTS: dict[str, float] = {
    "nuclear_size": 0.55, "pleomorphism": 0.45, "tumour_density": 0.35, "lymphocytes": -0.55,
    "lymph_clustering": -0.20,
    "us_margin": 0.55, "us_orientation": 0.25, "us_shadowing": 0.30, "us_heterogeneity": 0.25,
    "vascularity": 0.45,
    # clinical terms act on standardised transforms of the clinical variables
    "clin_nodes": 0.45, "clin_size": 0.30, "clin_grade": 0.20, "clin_ki67": 0.25,
    "clin_age": -0.15,
}
INTERACTION = ("nuclear_size", "us_margin", 0.30)  # cross-modal: wsi × us

DEFAULT_SIGNAL: dict[str, float] = {"wsi": 1.0, "us": 0.6, "text": 0.5, "clinical": 0.6}


@dataclass(frozen=True)
class CohortParameters:
    patients: int
    seed: int
    signal: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SIGNAL))
    missing_wsi: float = 0.1
    missing_us: float = 0.1
    missing_report: float = 0.1
    event_fraction: float = TARGET_EVENT_FRACTION
    test_fraction: float = TEST_FRACTION

    def __post_init__(self) -> None:
        if not 0.01 <= self.event_fraction <= 0.95:
            raise ValueError(f"event fraction {self.event_fraction}: must be in [0.01, 0.95]")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test fraction {self.test_fraction}: must be in [0, 1)")


@dataclass
class Cohort:
    """Per-patient arrays, all of length ``n``; index i is patient ``ids[i]``."""

    ids: list[str]
    traits: dict[str, np.ndarray]
    clinical: dict[str, np.ndarray]
    log_hazard: np.ndarray
    time_months: np.ndarray
    event: np.ndarray
    split: np.ndarray  # "train" | "test"
    has_wsi: np.ndarray
    has_us: np.ndarray
    has_report: np.ndarray
    weibull_scale: float
    oracle_c_index: float

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def present(self) -> dict[str, np.ndarray]:
        """Trait modality (the values of :data:`TRAITS`) → whether each patient has it; the
        ``text`` traits are rendered into the ultrasound report, so they need the report."""
        return {"wsi": self.has_wsi, "us": self.has_us, "text": self.has_report}


def _draw_population(rng: np.random.Generator, n: int) -> tuple[dict[str, np.ndarray],
                                                                dict[str, np.ndarray]]:
    """Latent traits and clinical variables with realistic marginals (HR+/HER2- early BC).

    Clinical targets: median age ~47, grade 1/2/3 ~15/58/27 %, node positive ~58 %.
    """
    traits = {name: rng.standard_normal(n) for name in TRAITS}
    z_size, z_nodes, z_age, z_ki, z_grade = (rng.standard_normal(n) for _ in range(5))
    age = np.clip(np.round(47.0 + 10.0 * z_age), 25, 80)
    size_mm = np.clip(np.round(np.exp(np.log(20.0) + 0.45 * z_size), 0), 5, 80)
    # thresholds are population quantiles of each drive (fixed, so a patient's values do not
    # depend on who else was drawn): node_drive ~ N(0, 0.906), grade_drive ~ N(0, 0.986)
    node_drive = 0.8 * z_nodes + 0.3 * z_size + 0.3 * traits["tumour_density"]
    positive = node_drive > -0.183  # 58 % node positive
    nodes = np.where(positive, 1 + rng.poisson(1.2 * np.exp(0.5 * np.clip(z_nodes, -2, 2))), 0)
    grade_drive = 0.7 * traits["pleomorphism"] + 0.35 * traits["nuclear_size"] + 0.6 * z_grade
    grade = 1 + (grade_drive > -1.02).astype(int) + (grade_drive > 0.605).astype(int)  # 15/58/27 %
    ki67 = np.clip(np.round(np.exp(np.log(15.0) + 0.35 * (grade - 2) + 0.2 * traits[
        "tumour_density"] + 0.4 * z_ki)), 1, 90)
    er = np.clip(np.round(100 - np.exp(rng.normal(2.3, 0.8, n))), 1, 100)
    pr = np.where(rng.random(n) < 0.15, 0,
                  np.clip(np.round(100 * rng.beta(2.0, 1.2, n)), 1, 100))
    her2 = rng.choice(np.array(["0", "1+", "2+"]), size=n, p=[0.35, 0.40, 0.25])
    luminal_b = (ki67 >= 20) | (pr < 20) | (grade == 3)
    subtype = np.where(luminal_b, "luminal_b", "luminal_a")
    clinical = {"age_years": age, "tumour_size_mm": size_mm, "positive_nodes": nodes,
                "grade": grade, "er_percent": er, "pr_percent": pr, "her2_ihc": her2,
                "ki67_percent": ki67, "subtype": subtype}
    return traits, clinical


def clinical_terms(clinical: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The true hazard's five clinical terms (the keys of :data:`COEFFICIENTS` named ``clin_*``).

    Each transform is centred and scaled on fixed population values, not on the sample, so a
    patient's terms do not depend on who else was drawn. Reads the :data:`HAZARD_CLINICAL`
    variables (raw units: counts, mm, grade 1–3, %, years).
    """
    return {
        "clin_nodes": (np.log1p(clinical["positive_nodes"]) - 0.75) / 0.75,
        "clin_size": (np.log(clinical["tumour_size_mm"]) - np.log(20.0)) / 0.45,
        "clin_grade": (clinical["grade"] - 2.1) / 0.64,
        "clin_ki67": (np.log(clinical["ki67_percent"]) - np.log(15.0)) / 0.55,
        "clin_age": (clinical["age_years"] - 47.0) / 10.0,
    }


HAZARD_CLINICAL = ("positive_nodes", "tumour_size_mm", "grade", "ki67_percent", "age_years")
"""The clinical variables the true hazard reads (through :func:`clinical_terms`)."""
CLINICAL_TERM_NAMES = tuple(name for name in COEFFICIENTS if name.startswith("clin_"))
"""The names of :func:`clinical_terms`, in its order."""


def hazard_design(traits: dict[str, np.ndarray], clinical: dict[str, np.ndarray]
                  ) -> tuple[np.ndarray, list[str]]:
    """The true hazard's own terms, one column each: the log hazard is linear in them.

    Columns: every trait of :data:`TRAITS` (standard normal), the five :func:`clinical_terms`,
    and the :data:`INTERACTION` product (named ``"<a>*<b>"``). :func:`log_hazard` is this matrix
    times :func:`hazard_coefficients`, so a Cox model on it is the correctly specified model.

    Returns
    -------
    (matrix, names)
        (n, 16) float64 and the 16 column names.
    """
    columns = {name: np.asarray(traits[name], dtype=float) for name in TRAITS}
    columns.update(clinical_terms(clinical))
    a, b, _ = INTERACTION
    columns[f"{a}*{b}"] = np.asarray(traits[a], dtype=float) * np.asarray(traits[b], dtype=float)
    return np.column_stack(list(columns.values())).astype(float), list(columns)


def hazard_coefficients(signal: dict[str, float]) -> np.ndarray:
    """Log-hazard coefficient of each :func:`hazard_design` column under the signal weights."""
    a, b, weight = INTERACTION
    return np.array(
        [signal[modality] * COEFFICIENTS[name] for name, modality in TRAITS.items()]
        + [signal["clinical"] * COEFFICIENTS[name] for name in CLINICAL_TERM_NAMES]
        + [np.sqrt(signal[TRAITS[a]] * signal[TRAITS[b]]) * weight])


def log_hazard(traits: dict[str, np.ndarray], clinical: dict[str, np.ndarray],
               signal: dict[str, float]) -> np.ndarray:
    """The true log hazard (arbitrary origin): :func:`hazard_design` × :func:`hazard_coefficients`.

    Higher = worse.
    """
    design, _ = hazard_design(traits, clinical)
    eta = np.zeros(len(design))
    for column, weight in zip(design.T, hazard_coefficients(signal), strict=True):
        eta += weight * column
    return eta


def observed_traits(traits: Mapping[str, np.ndarray], present: Mapping[str, np.ndarray],
                    fill: Mapping[str, np.ndarray | float] | None = None
                    ) -> dict[str, np.ndarray]:
    """The traits as a reader of the patient's data can know them.

    A trait of a modality the patient lacks (``present[TRAITS[trait]]`` false; a cohort's
    :attr:`Cohort.present`) is replaced by ``fill[trait]`` (per patient or a scalar); by default
    by 0, its population mean (the traits are standard normal). Traits of a modality the patient
    has are kept.

    With ``fill`` the conditional expectation of each missing trait given what is observed,
    :func:`log_hazard` of the result is E[true log hazard | observed]: the hazard is linear in
    each trait, and its one product (:data:`INTERACTION`) joins traits of two modalities that are
    independent given the observed data, so the expectation of the product is the product of the
    expectations. Zero is that expectation for the ultrasound and report traits (independent of
    everything observed); the slide's nuclear size, pleomorphism and tumour density also drive
    grade, nodes and Ki-67, so given the clinical values their expectation is not 0.

    Parameters
    ----------
    traits
        Trait name → values, as :attr:`Cohort.traits`.
    present
        Modality (``"wsi"``, ``"us"``, ``"text"``) → boolean per patient.
    fill
        Trait name → the value to use where its modality is missing; absent names use 0.

    Returns
    -------
    dict
        Trait name → float64 values, one per patient, in the order of ``traits``.
    """
    fill = fill or {}
    seen = {}
    for name, values in traits.items():
        values = np.asarray(values, dtype=float)
        seen[name] = np.where(np.asarray(present[TRAITS[name]], dtype=bool), values,
                              np.broadcast_to(np.asarray(fill.get(name, 0.0), dtype=float),
                                              values.shape))
    return seen


def _event_fraction(scale: float, eta: np.ndarray, u_event: np.ndarray,
                    follow_up: np.ndarray) -> float:
    times = _weibull_times(scale, eta, u_event)
    return float(np.mean(times <= follow_up))


def _weibull_times(scale: float, eta: np.ndarray, u_event: np.ndarray) -> np.ndarray:
    """Inverse-CDF draw: S(t) = exp(-(t/scale)^k * exp(eta))."""
    return scale * (-np.log(u_event) * np.exp(-eta)) ** (1.0 / WEIBULL_SHAPE)


def calibrate_scale(rng: np.random.Generator, signal: dict[str, float],
                    event_fraction: float = TARGET_EVENT_FRACTION) -> float:
    """Weibull scale (months) giving ``event_fraction`` events in a large sample."""
    traits, clinical = _draw_population(rng, CALIBRATION_SAMPLE)
    eta = log_hazard(traits, clinical, signal)
    u_event = rng.random(CALIBRATION_SAMPLE)
    follow_up = rng.uniform(*FOLLOW_UP_MONTHS, CALIBRATION_SAMPLE)
    low, high = 1.0, 1e7  # event fraction falls as the scale grows
    for _ in range(80):
        mid = np.sqrt(low * high)
        if _event_fraction(mid, eta, u_event, follow_up) > event_fraction:
            low = mid
        else:
            high = mid
    return float(np.sqrt(low * high))


def stratified_split(rng: np.random.Generator, event: np.ndarray,
                     test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """Train/test split with ``test_fraction`` held out (5:1 by default), stratified by event."""
    split = np.full(len(event), "train", dtype=object)
    for value in (False, True):
        members = np.flatnonzero(event == value)
        rng.shuffle(members)
        split[members[: round(len(members) * test_fraction)]] = "test"
    return split


def harrell_c(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C (risk: higher = worse), scikit-survival's definition; NaN without a
    comparable pair (no event, or, in a small cohort, only events after every other time)."""
    if not event.any():
        return float("nan")
    try:
        return float(concordance_index_censored(event.astype(bool), time, risk)[0])
    except NoComparablePairException:
        return float("nan")


def make_cohort(params: CohortParameters) -> Cohort:
    """Draw the whole cohort; deterministic in ``params`` (independent of worker count)."""
    if params.patients < 1:
        raise ValueError("a phantom needs at least one patient")
    root = np.random.SeedSequence([params.seed, 0x4D525250])  # "MRRP"
    calibration_seq, population_seq, outcome_seq, split_seq, missing_seq = root.spawn(5)
    scale = calibrate_scale(np.random.default_rng(calibration_seq), params.signal,
                            params.event_fraction)
    n = params.patients
    traits, clinical = _draw_population(np.random.default_rng(population_seq), n)
    eta = log_hazard(traits, clinical, params.signal)
    outcome_rng = np.random.default_rng(outcome_seq)
    times = _weibull_times(scale, eta, outcome_rng.random(n))
    follow_up = outcome_rng.uniform(*FOLLOW_UP_MONTHS, n)
    event = times <= follow_up
    observed = np.round(np.minimum(times, follow_up), 1)
    observed = np.maximum(observed, 0.1)
    split = stratified_split(np.random.default_rng(split_seq), event, params.test_fraction)
    missing_rng = np.random.default_rng(missing_seq)
    has_wsi = missing_rng.random(n) >= params.missing_wsi
    has_us = missing_rng.random(n) >= params.missing_us
    has_report = missing_rng.random(n) >= params.missing_report
    test = split == "test"
    oracle = harrell_c(observed[test], event[test], eta[test]) if test.any() else float("nan")
    return Cohort(
        ids=[f"PH{params.seed:04d}-{i + 1:05d}" for i in range(n)],
        traits=traits, clinical=clinical, log_hazard=eta, time_months=observed, event=event,
        split=split, has_wsi=has_wsi, has_us=has_us, has_report=has_report,
        weibull_scale=scale, oracle_c_index=oracle,
    )
