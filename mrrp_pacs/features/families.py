"""The feature families: their names, what each reads and what it stores, in pipeline order.

This is the one list of families: the configuration (``[features] families``), the ``extract``
command and the pipeline read it. It imports nothing beyond the standard library, so the
configuration can import it cheaply.

These are *extraction* families (one cached row per patient and family). The model regroups
their arrays into its own token families (``wsi_deep``, ``us_radiomics``, …):
:data:`mrrp_pacs.model.dataset.FAMILY_SOURCES` holds that mapping.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FamilyInput(StrEnum):
    """What of a patient's case a family reads; a patient without it has no input for it."""

    SLIDE = "slide"  # the whole-slide image and its tumour region
    ULTRASOUND = "ultrasound"  # an ultrasound image and its lesion ROI
    REPORT = "report"  # the latest ultrasound report
    CLINICAL = "clinical"  # the clinical values


@dataclass(frozen=True)
class FeatureFamily:
    """One family of extracted features.

    Attributes
    ----------
    name : str
        The name in the configuration, on the command line and in the ``features`` table.
    reads : FamilyInput
        What it reads.
    arrays : tuple[str, ...]
        The arrays it stores per patient (:attr:`FeatureSet.arrays`), shapes in docs/features.md.
    summary : str
        What it is, in a few words.
    """

    name: str
    reads: FamilyInput
    arrays: tuple[str, ...]
    summary: str


FAMILIES: tuple[FeatureFamily, ...] = (
    FeatureFamily("wsi", FamilyInput.SLIDE, ("deep", "positions_um"),
                  "deep features of the tiles of the tumour region"),
    FeatureFamily("nuclei", FamilyInput.SLIDE,
                  ("morphology", "topology", "counts", "positions_um"),
                  "nucleus morphology and topology tokens on the same tiles as wsi"),
    FeatureFamily("us", FamilyInput.ULTRASOUND,
                  ("tokens", "positions", "box_px", "roi_is_outline"),
                  "ResNet tokens of the lesion crop (box of the lesion mask + margin)"),
    FeatureFamily("radiomics", FamilyInput.ULTRASOUND, ("tokens", "roi_is_outline"),
                  "PyRadiomics tokens of the same lesion, on its mask"),
    FeatureFamily("text", FamilyInput.REPORT, ("tokens",),
                  "token embeddings of the findings of the ultrasound report"),
    FeatureFamily("clinical", FamilyInput.CLINICAL, ("values", "missing"),
                  "the clinical schema's variables, normalised, missing ones marked"),
)
FAMILY_NAMES: tuple[str, ...] = tuple(family.name for family in FAMILIES)


def family_named(name: str) -> FeatureFamily:
    """The family called ``name``; :class:`ValueError` naming the known ones otherwise."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown feature family {name!r}; known: {', '.join(FAMILY_NAMES)}")
