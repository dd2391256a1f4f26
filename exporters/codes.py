"""Coded concepts of the MRRP result objects: standard codes where DICOM has them, our private
coding scheme ``99MRRP`` for the rest.

Standard codes are taken only from vocabularies the DICOM standard itself lists (pydicom's
code dictionary is generated from PS3.16), so every one of them can be checked offline:

- DCM ``121415`` "Percentile Ranking of measurement" (CID 7465) for the percentile of the
  patient's risk in the training cohort;
- SCT ``15508007`` "High risk" / ``75976002`` "Low risk" (CID 3118 "Level of Risk") for the risk
  group; newer SNOMED releases also have ``723509005``/``723505004`` "High/Low risk (qualifier
  value)" (used by HL7 mCODE), which DICOM does not list yet;
- DCM ``SM`` "Slide Microscopy" and ``US`` "Ultrasound" (CID 29) for the image modalities;
- UCUM ``%`` and ``1``, and the UCUM annotation ``{risk}`` (a dimensionless unit) for the score.

No verified standard code exists for "recurrence risk assessment", a risk score, a
recurrence-free probability at a horizon or an attention weight: those are private. A private
code's meaning never changes once an object carrying it has been sent.
"""

from __future__ import annotations

from types import MappingProxyType

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

from mrrp_pacs.results import CODING_SCHEME as SCHEME
from mrrp_pacs.results import HORIZONS_MONTHS

SCHEME_VERSION = "1"

CODING_SCHEME = CodingSchemeIdentificationItem(
    designator=SCHEME,
    name="MRRP recurrence risk private codes",
    version=SCHEME_VERSION,
    responsible_organization="mrrp-pacs",
)
"""Item of the Coding Scheme Identification Sequence that declares ``99MRRP``."""


def _private(value: str, meaning: str) -> Code:
    return Code(value, SCHEME, meaning)


# -- procedure and document ------------------------------------------------------------------
RISK_ASSESSMENT = _private("RRA", "Breast cancer recurrence risk assessment")
"""Procedure Reported (and Performed Procedure) of the SR."""
RISK_REPORT = _private("RRAREPORT", "Breast cancer recurrence risk report")
"""Concept name (document title) of the companion Encapsulated PDF."""

# -- measurements of the risk group (TID 1501) -----------------------------------------------
RISK_SCORE = _private("RISK", "Recurrence risk score (log hazard)")
PERCENTILE_RANKING = Code("121415", "DCM", "Percentile Ranking of measurement")
RISK_GROUP = _private("RISKGRP", "Recurrence risk group")
RFS_PROBABILITY = MappingProxyType({
    months: _private(f"RFS{months}", f"Recurrence-free probability at {months} months")
    for months in HORIZONS_MONTHS
})
"""Horizon in months → concept name of the recurrence-free probability at that horizon."""
MODALITY_USED = _private("MODUSED", "Modality used by the model")
MODALITY_COMPENSATED = _private("MODCOMP", "Modality missing, compensated by the model")
ATTENTION_WEIGHT = _private("ATTNW", "Clinical variable attention weight")
CLINICAL_VARIABLE = _private("CLINVAR", "Clinical variable")

# -- the number shown on the ultrasound region (TID 1410) ------------------------------------
# OHIF labels a region's NUM "meaning: value unit-code", so the group is in the concept name and
# the number is the absolute risk in %, a unit that reads as itself.
RECURRENCE_ON_REGION = MappingProxyType({
    "high": _private("REC60H", "MRRP risk high, recurrence within 5 years"),
    "low": _private("REC60L", "MRRP risk low, recurrence within 5 years"),
})
"""Risk group → concept name of the recurrence probability at 60 months drawn on the region."""
REGION_HORIZON_MONTHS = 60
US_ROI_SHAPE = _private("USROI", "Lesion region of the ultrasound features")
"""Qualitative evaluation on the region: what the ultrasound features were computed on."""
US_ROI_SHAPE_VALUE = MappingProxyType({
    "outline": _private("USROIOUT", "Drawn lesion outline"),
    "box": _private("USROIBOX", "Bounding box, no lesion outline drawn"),
})
""":attr:`mrrp_pacs.results.UsRegion.roi_shape` → its coded value."""

# -- values ----------------------------------------------------------------------------------
RISK_GROUP_VALUE = MappingProxyType({
    "high": Code("15508007", "SCT", "High risk"),
    "low": Code("75976002", "SCT", "Low risk"),
})
"""``RiskResult.group`` → coded level of risk (CID 3118)."""

MODALITY = MappingProxyType({
    "wsi": Code("SM", "DCM", "Slide Microscopy"),
    "us": Code("US", "DCM", "Ultrasound"),
    "clinical": _private("CLINICAL", "Clinical and pathology variables"),
})
"""Model modality name → coded modality."""

# -- units -----------------------------------------------------------------------------------
UNIT_RISK = Code("{risk}", "UCUM", "risk score")
"""Dimensionless UCUM annotation for the log-hazard score (UCUM ``1`` reads as a second number
where a viewer prints the unit's code after the value)."""
UNIT_PERCENT = Code("%", "UCUM", "Percent")
UNIT_ONE = Code("1", "UCUM", "no units")
