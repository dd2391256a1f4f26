"""The MRRP result for people: a one-page A4 PDF, and that PDF as a DICOM Encapsulated PDF.

The page shows the score, its group and percentile, the absolute recurrence-free probability at
3, 5 and 7 years, the training cohort's Kaplan–Meier curves by risk group with this patient's
group marked, the modalities used and those the model compensated, the clinical variables by
attention, the model version, the scoring date and the intended-use statement (research use,
not a medical device, not for clinical decisions).

The page is drawn with matplotlib's object API and PDF backend (no pyplot state). Fonts are
embedded as TrueType (``pdf.fonttype`` 42) so that text extraction (``pdftotext``) and
searching in a viewer work, and the PDF carries no creation date, so the same result gives
the same bytes.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM
from sksurv.nonparametric import kaplan_meier_estimator

from exporters import codes
from exporters.sr import DEFAULT_UID_SECRET, content_datetime, result_uid, series_uid
from mrrp_pacs import __version__
from mrrp_pacs.model.evaluate import risk_groups
from mrrp_pacs.model.plots import at_risk_counts
from mrrp_pacs.results import HORIZONS_MONTHS, RiskResult

LOGGER = logging.getLogger(__name__)

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
DOCUMENT_TITLE = "MRRP recurrence risk report"
SERIES_DESCRIPTION = "MRRP recurrence risk report"
INTENDED_USE = ("For research use only. Not a medical device. "
                "Not for clinical decisions: do not use it to diagnose or to choose a treatment.")

A4_INCHES = (8.27, 11.69)
_GROUP_COLOURS = {"low": "#1b9e77", "high": "#d95f02"}
_MODALITY_NAMES = {"wsi": "whole-slide image (H&E)", "us": "breast ultrasound",
                   "clinical": "clinical and pathology variables"}
_TOP_VARIABLES = 6


@dataclass(frozen=True)
class TrainingKM:
    """The training cohort of a model version, as its manifest keeps it (no patient ids).

    Attributes
    ----------
    time_months
        (n,) follow-up (recurrence or censoring), months.
    event
        (n,) True = recurrence.
    risk
        (n,) the model's log hazard of each training patient (higher = worse).
    cutoff
        Log hazard above which a patient is ``high`` risk (a risk equal to it is ``low``).
    """

    time_months: np.ndarray
    event: np.ndarray
    risk: np.ndarray
    cutoff: float

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> TrainingKM:
        """Read ``training_outcomes`` and ``risk_cutoff`` of a model manifest.

        Raises
        ------
        ValueError
            The manifest lacks them or their lengths differ.
        """
        try:
            outcomes = manifest["training_outcomes"]
            km = cls(np.asarray(outcomes["time_months"], dtype=float),
                     np.asarray(outcomes["event"], dtype=bool),
                     np.asarray(outcomes["risk"], dtype=float),
                     float(manifest["risk_cutoff"]))
        except KeyError as missing:
            raise ValueError(f"model manifest lacks {missing}: it was not saved by the MRRP "
                             f"trainer; retrain or pick another model version") from None
        if not len(km.time_months) == len(km.event) == len(km.risk) > 0:
            raise ValueError("model manifest training_outcomes: time_months, event and risk "
                             "must be non-empty and of one length")
        return km

    @property
    def group(self) -> np.ndarray:
        """(n,) 0 = low, 1 = high risk, by the model's rule."""
        return risk_groups(self.risk, self.cutoff)


def build_companion_pdf(result: RiskResult, km: TrainingKM, *,
                        patient_id: str | None = None) -> bytes:
    """Draw the one-page A4 report of ``result``.

    Parameters
    ----------
    result
        The scoring (risk = log hazard, higher = worse; probabilities as fractions).
    km
        The model's training cohort, for the Kaplan–Meier curves.
    patient_id
        Printed in the header when given (the page goes to the PACS, which holds it anyway).

    Returns
    -------
    bytes
        A PDF 1.4 document of one page, 210 × 297 mm.
    """
    moment = content_datetime(result)
    figure = Figure(figsize=A4_INCHES)
    with mpl.rc_context({"pdf.fonttype": 42, "font.size": 9}):
        _header(figure, result, patient_id, moment.strftime("%Y-%m-%d %H:%M %Z"))
        _results(figure, result)
        axes = figure.add_axes((0.14, 0.15, 0.78, 0.33))
        _kaplan_meier(axes, result, km)
        _footer(figure, result)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="pdf", metadata={
            "Title": DOCUMENT_TITLE, "Creator": f"mrrp-pacs {__version__}",
            "CreationDate": None})
    return buffer.getvalue()


def _header(figure: Figure, result: RiskResult, patient_id: str | None, scored: str) -> None:
    figure.text(0.06, 0.955, "Breast cancer recurrence risk (MRRP)", fontsize=17,
                fontweight="bold", va="top")
    who = f"Patient ID {patient_id}    " if patient_id else ""
    figure.text(0.06, 0.922, f"{who}Scored {scored}    Model {result.model_label}",
                fontsize=9.5, va="top")
    figure.text(0.5, 0.895, INTENDED_USE, fontsize=9, color="#a50f15", fontweight="bold",
                ha="center", va="top", wrap=True,
                bbox={"boxstyle": "round,pad=0.5", "facecolor": "#fee0d2",
                      "edgecolor": "#a50f15"})


def _results(figure: Figure, result: RiskResult) -> None:
    colour = _GROUP_COLOURS.get(result.group, "black")
    figure.text(0.06, 0.845, f"{result.group.upper()} RISK", fontsize=22, fontweight="bold",
                color=colour, va="top")
    figure.text(0.06, 0.805, f"Recurrence risk score {result.risk:.2f} (log hazard; cut-off "
                f"{result.cutoff:.2f}; higher = worse)", fontsize=11, va="top")
    figure.text(0.06, 0.783, f"Higher than {result.percentile:.1f} % of the patients the model "
                f"was trained on", fontsize=11, va="top")
    horizons = "    ".join(
        f"{months // 12} years: {100 * result.rfs_probability[str(months)]:.1f} %"
        for months in HORIZONS_MONTHS)
    figure.text(0.06, 0.755, "Estimated probability of staying free of recurrence",
                fontsize=11, fontweight="bold", va="top")
    figure.text(0.06, 0.735, horizons, fontsize=11, va="top")

    used = ", ".join(_MODALITY_NAMES.get(m, m) for m in result.modalities_used) or "none"
    missing = ", ".join(_MODALITY_NAMES.get(m, m) for m in result.compensated) or "none"
    figure.text(0.06, 0.700, f"Data used: {used}", fontsize=9.5, va="top")
    figure.text(0.06, 0.682, f"Missing, replaced by the model's learned stand-in: {missing}",
                fontsize=9.5, va="top")
    if result.compensated:
        figure.text(0.06, 0.664, "A missing modality makes the estimate less certain.",
                    fontsize=9, style="italic", va="top")

    figure.text(0.06, 0.632, "Clinical variables the model attended to most", fontsize=9.5,
                fontweight="bold", va="top")
    top = result.clinical_attention[:_TOP_VARIABLES]
    for row, (variable, weight) in enumerate(top):
        y = 0.612 - row * 0.017
        figure.text(0.08, y, variable, fontsize=9, va="top")
        figure.text(0.30, y, f"{100 * weight:.0f} %", fontsize=9, va="top", ha="right")
        figure.patches.append(Rectangle(
            (0.32, y - 0.011), 0.3 * weight, 0.009, transform=figure.transFigure,
            facecolor="#7570b3", edgecolor="none"))


def _kaplan_meier(axes: Axes, result: RiskResult, km: TrainingKM) -> None:
    """Training cohort by risk group, this patient's group thick, her estimates as points."""
    groups = km.group
    names = {0: "low", 1: "high"}
    end = float(km.time_months.max())
    ticks = np.arange(0.0, end + 1e-9, 12.0 if end <= 96 else 24.0)
    for label, name in names.items():
        members = groups == label
        if not members.any():
            continue
        steps_t, steps_s = kaplan_meier_estimator(km.event[members], km.time_months[members])
        mine = name == result.group
        axes.step(np.r_[0.0, steps_t], np.r_[1.0, steps_s], where="post",
                  color=_GROUP_COLOURS[name], linewidth=3.0 if mine else 1.4,
                  alpha=1.0 if mine else 0.5,
                  label=f"training cohort, {name} risk (n={int(members.sum())})"
                        + ("  ← this patient's group" if mine else ""))
    months = np.array(HORIZONS_MONTHS, dtype=float)
    estimates = [result.rfs_probability[str(m)] for m in HORIZONS_MONTHS]
    axes.plot(months, estimates, "D", color="black", markersize=6,
              label="this patient (model estimate)")
    axes.set_xlim(0.0, max(float(ticks[-1]), float(months.max())) + 2.0)
    axes.set_ylim(0.0, 1.02)
    axes.set_xticks(ticks)
    axes.set_xlabel("Months since diagnosis")
    axes.set_ylabel("Recurrence-free survival")
    axes.set_title("Recurrence-free survival of the training cohort by risk group", fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    counts = at_risk_counts(km.time_months, groups, ticks)
    present = [names[int(g)] for g in np.unique(groups)]
    for row, name in enumerate(present):
        y = -0.16 - 0.06 * row
        axes.text(-0.05, y, f"at risk, {name}", transform=axes.transAxes, ha="right",
                  fontsize=7.5, color=_GROUP_COLOURS[name])
        for tick, count in zip(ticks, counts[row], strict=True):
            axes.text(tick, y, str(count), transform=axes.get_xaxis_transform(), ha="center",
                      fontsize=7.5, color=_GROUP_COLOURS[name])


def _footer(figure: Figure, result: RiskResult) -> None:
    figure.text(0.06, 0.045,
                f"Model {result.model_name}, version {result.model_version}; inputs "
                f"{result.inputs_hash[:12]}; produced by mrrp-pacs {__version__}. "
                "Probabilities are model estimates for patients like those in the training "
                "cohort, not certainties.", fontsize=7, color="#555555", va="top", wrap=True)


def build_encapsulated_pdf(
    pdf_bytes: bytes,
    study: Dataset,
    *,
    result: RiskResult,
    series_number: int,
    instance_number: int,
    uid_secret: str = DEFAULT_UID_SECRET,
    revision: int = 0,
    manufacturer: str = "mrrp-pacs",
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
) -> Dataset:
    """Wrap ``pdf_bytes`` in a DICOM Encapsulated PDF in its own series of ``study``.

    Parameters
    ----------
    pdf_bytes
        The document (from :func:`build_companion_pdf`); it must start with ``%PDF-``.
    study
        Any instance header of the target study (it needs its SOP Class UID): its Patient and
        Study modules are copied.
    result
        The scoring the PDF shows: its UIDs (same result, same UIDs), date and source instances
        (Source Instance Sequence) come from it.
    series_number, instance_number
        Positive integers chosen by the caller.
    uid_secret
        Site secret of the name-based UIDs.
    revision
        The score's revision (:func:`exporters.sr.result_uid`).

    Returns
    -------
    pydicom.Dataset
        With file meta (explicit VR little endian); the document is padded with one NUL to an
        even length, Encapsulated Document Length keeps the length of the PDF itself.
    """
    if not pdf_bytes.startswith(b"%PDF-"):
        raise ValueError("pdf_bytes is not a PDF (it does not start with %PDF-)")
    study_uid = str(study.StudyInstanceUID)
    moment = content_datetime(result)
    ds = hd.SOPClass(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid("pdf", result, study_uid, uid_secret),
        series_number=series_number,
        sop_instance_uid=result_uid("pdf", result, study_uid, uid_secret, revision),
        sop_class_uid=ENCAPSULATED_PDF,
        instance_number=instance_number,
        modality="DOC",
        manufacturer=manufacturer,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=result.model_name,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        content_date=moment.date(),
        content_time=moment.time(),
        specific_character_set=study.get("SpecificCharacterSet") or "ISO_IR 192",
    )
    ds.copy_patient_and_study_information(study)
    ds.InstanceCreationDate = DA(moment.strftime("%Y%m%d"))
    ds.InstanceCreationTime = TM(moment.strftime("%H%M%S"))
    ds.add_new("SoftwareVersions", "LO", [__version__, result.model_version])
    ds.ConversionType = "SYN"
    ds.AcquisitionDateTime = moment.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = DOCUMENT_TITLE
    ds.ConceptNameCodeSequence = [hd.sr.CodedConcept.from_code(codes.RISK_REPORT)]
    ds.CodingSchemeIdentificationSequence = [codes.CODING_SCHEME]
    ds.VerificationFlag = "UNVERIFIED"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.SourceInstanceSequence = [_instance_reference(ref.sop_class_uid, ref.sop_instance_uid)
                                 for ref in result.evidence]
    ds.EncapsulatedDocumentLength = len(pdf_bytes)
    ds.EncapsulatedDocument = pdf_bytes + b"\x00" * (len(pdf_bytes) % 2)
    return ds


def _instance_reference(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class_uid
    item.ReferencedSOPInstanceUID = sop_instance_uid
    return item
