"""What one scoring of one patient produced: the record exporters turn into DICOM and HL7.

A :class:`RiskResult` is stored as JSON in ``scores.outputs`` and read back with
:meth:`RiskResult.from_json`. Sign convention: ``risk`` is the model's log hazard relative to
the training cohort's baseline; higher = worse.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

HORIZONS_MONTHS = (36, 60, 84)

# Our private coding scheme: exporters declare it in every SR they write, and intake uses it to
# recognise those SRs when a PACS sends them back (a result is never an input).
CODING_SCHEME = "99MRRP"


def significant(value: float, digits: int = 6) -> float:
    """``value`` to ``digits`` significant digits. Probabilities are kept this way, never to a
    number of decimals: a small one must not become 0 (OHIF prints no value for a NUM of 0)."""
    return float(f"{value:.{digits}g}")


@dataclass(frozen=True)
class EvidenceRef:
    """One stored DICOM instance the score was computed from.

    ``role`` is ``wsi`` (a slide level), ``wsi_roi`` (tumour annotation), ``us_image`` or
    ``us_roi`` (the SR holding the lesion region). ``sha256`` locates the file in the object
    store.
    """

    role: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    sha256: str


@dataclass(frozen=True)
class UsRegion:
    """The ultrasound lesion region the US features were computed from.

    ``box_px`` is the lesion box (x0, y0, x1, y1) in pixel columns/rows of the US image frame,
    without the crop margin; ``source`` says where it came from (``sr``, ``gsps``, ``seg``,
    ``voc`` sidecar or ``automatic``). ``roi_shape`` says what the features describe: ``outline``
    (a drawn outline's mask) or ``box`` (a box standing in for one: VOC, calipers, automatic;
    also every region recorded before outlines were read). ``frame`` is the 1-based frame the
    lesion was drawn on (None: a single-frame image, or not recorded).
    """

    sop_instance_uid: str
    box_px: tuple[float, float, float, float]
    source: str
    roi_shape: str = "box"
    frame: int | None = None


@dataclass(frozen=True)
class RiskResult:
    """The MRRP output for one patient episode.

    Attributes
    ----------
    risk
        Log hazard (higher = worse).
    percentile
        Percent of the training cohort with a lower risk, 0–100.
    group
        ``high`` above the model's cutoff (training median by default), else ``low``.
    rfs_probability
        Recurrence-free probability at 36, 60 and 84 months (Breslow baseline), keys are the
        horizons in months as strings (JSON keys).
    modalities_used / compensated
        Model modalities (``wsi``, ``us``) that were present, and those replaced by the model's
        learned embedding because they were missing; ``clinical`` is always used.
    clinical_attention
        (variable, weight) pairs, largest first; weights sum to 1.
    """

    patient_key: str
    model_name: str
    model_version: str
    inputs_hash: str
    risk: float
    percentile: float
    group: str
    cutoff: float
    rfs_probability: dict[str, float]
    modalities_used: list[str]
    compensated: list[str]
    clinical_attention: list[tuple[str, float]]
    evidence: list[EvidenceRef]
    us_region: UsRegion | None
    algorithm_parameters: dict[str, str] = field(default_factory=dict)
    scored_at: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RiskResult:
        raw: dict[str, Any] = json.loads(text)
        raw["evidence"] = [EvidenceRef(**e) for e in raw["evidence"]]
        region = raw.get("us_region")
        raw["us_region"] = (UsRegion(region["sop_instance_uid"], tuple(region["box_px"]),
                                     region["source"], region.get("roi_shape", "box"),
                                     region.get("frame")) if region else None)
        raw["clinical_attention"] = [(str(v), float(w)) for v, w in raw["clinical_attention"]]
        return cls(**raw)

    @property
    def model_label(self) -> str:
        return f"{self.model_name}@{self.model_version}"
