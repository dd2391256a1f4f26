"""The MRRP result as a DICOM Comprehensive 3D SR: a TID 1500 Measurement Report following the
IHE AI Results (AIR) profile.

The document (docs/exporters.md has the full content tree) holds:

- observation context: the model as a device observer (TID 1004; one Device Observer UID per
  model version), Procedure Reported "Breast cancer recurrence risk assessment";
- one TID 1501 measurement group with the score, its percentile in the training cohort, the
  coded risk group, the recurrence-free probabilities at 36/60/84 months, the modalities used
  and compensated, the clinical variables by attention, and the Algorithm Identification
  (TID 4019). Its Tracking UID depends only on the patient (and the site's secret), so every
  rescoring of one patient, by any model version, carries the same Tracking UID;
- when the US lesion region is known and its image given, one TID 1410 group: the region as a
  closed POLYLINE on the US image with the risk group and the probability of recurrence within
  5 years as a NUM, under the same Tracking UID and placed first. OHIF (3.13.2, measured) merges
  groups that share a Tracking UID into one annotation: the box drawn on the US image, labelled
  with the first five NUMs — the region's, the percentile, the three recurrence-free
  probabilities, all in %; the log-hazard score, whose unit OHIF can only print as a code, is
  the TID 1501 group's last NUM. A group of its own without a region would leave OHIF a
  measurement without coordinates, on which its SR viewport fails (TypeError, nothing drawn).

UIDs are name-based (PS3.5 B.2, ``2.25.`` + a UUID version 5 of a site secret and the names
of what they identify): the same result (same model version, same inputs) placed in the same
study gets the same SOP Instance UID, so the caller can tell that nothing new is to be sent;
another result gets another. pydicom's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores
its entropy and returns a random UID, so it is not used.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.valuerep import DA, TM

from exporters import codes
from mrrp_pacs import __version__
from mrrp_pacs.results import HORIZONS_MONTHS, RiskResult, significant

LOGGER = logging.getLogger(__name__)

DEFAULT_UID_SECRET = "mrrp-pacs"  # noqa: S105 (a public default, not a credential)
"""Secret the name-based UIDs are derived from when a site sets none. A site should set its own:
with the default, anyone who knows a patient key can compute that patient's Tracking UID."""

SERIES_DESCRIPTION = "MRRP recurrence risk"
DEVICE_NAME = "MRRP"
_TRACKING_IDENTIFIER = "MRRP recurrence risk"
_KNOWN_MODALITIES = frozenset(codes.MODALITY)
_SEPARATOR = "\x1f"


def name_based_uid(secret: str, *names: str) -> str:
    """A UID derived from ``secret`` and ``names`` only (PS3.5 B.2: ``2.25.`` + UUID v5).

    Parameters
    ----------
    secret
        Site secret; without it the UID cannot be recomputed from the names.
    names
        What the UID identifies, e.g. ``("sr", study_uid, model_label, inputs_hash)``.

    Returns
    -------
    str
        At most 44 characters.
    """
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"urn:mrrp-pacs:{secret}")
    # the unit separator cannot occur in UIDs, keys or hashes, so the join is unambiguous
    return f"2.25.{uuid.uuid5(namespace, _SEPARATOR.join(names)).int}"


def model_device_uid(model_label: str, secret: str = DEFAULT_UID_SECRET) -> str:
    """Device Observer UID of one model version (``RiskResult.model_label``)."""
    return name_based_uid(secret, "device", model_label)


def tracking_uid(patient_key: str, secret: str = DEFAULT_UID_SECRET) -> str:
    """Tracking UID of a patient's recurrence risk: the same for every model and rescoring."""
    return name_based_uid(secret, "tracking", patient_key)


def result_uid(role: str, result: RiskResult, study_instance_uid: str,
               secret: str = DEFAULT_UID_SECRET, revision: int = 0) -> str:
    """UID of one object made from ``result`` in one study.

    ``role`` names the object (``sr``, ``pdf``); the UID changes with the model version and
    the inputs hash, not with the scoring time. ``revision`` counts the times the score was
    made current again after being superseded (``scores.revision``: model v2 rolled back to
    v1, inputs A → B → A): each revision is a new document with a UID of its own (revision 0
    keeps the UID it always had).
    """
    names = [role, study_instance_uid, result.patient_key, result.model_label,
             result.inputs_hash]
    if revision:
        names.append(f"revision {revision}")
    return name_based_uid(secret, *names)


def series_uid(role: str, result: RiskResult, study_instance_uid: str,
               secret: str = DEFAULT_UID_SECRET) -> str:
    """Series of the ``role`` objects of one model version in one study.

    One series per model version keeps the series-level equipment attributes (model name and
    version) true for every instance in it.
    """
    return name_based_uid(secret, f"{role}-series", study_instance_uid, result.model_label)


def content_datetime(result: RiskResult) -> datetime:
    """When ``result`` was scored, in this machine's local time zone.

    DICOM dates and times without Timezone Offset From UTC are local; the study's dates are
    too, so the SR states none. ``scored_at`` without a zone is taken as UTC; an empty one
    gives the current time.
    """
    if not result.scored_at:
        LOGGER.warning("result has no scored_at; the current time is used as content time")
        return datetime.now(UTC).astimezone()
    moment = datetime.fromisoformat(result.scored_at)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone()


def build_risk_sr(
    result: RiskResult,
    sources: Sequence[Dataset],
    *,
    study: Dataset,
    series_number: int,
    instance_number: int,
    predecessor: Dataset | None = None,
    us_image: Dataset | None = None,
    device_observer_uid: str | None = None,
    uid_secret: str = DEFAULT_UID_SECRET,
    revision: int = 0,
    manufacturer: str = "mrrp-pacs",
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Measurement Report of one scoring, placed in ``study``.

    Parameters
    ----------
    result
        The scoring; ``risk`` is a log hazard (higher = worse), probabilities are fractions.
    sources
        Headers (``stop_before_pixels`` is enough) of every instance in ``result.evidence``,
        from any study; all are listed in the Current Requested Procedure Evidence Sequence.
    study
        Any instance header of the study the SR goes into (it needs its SOP Class UID): its
        Patient and Study modules are copied.
    series_number, instance_number
        Positive integers chosen by the caller.
    predecessor
        The SR this one replaces (an earlier scoring of the patient), if any; it is listed in
        the Predecessor Documents Sequence.
    us_image
        The US image of ``result.us_region`` (header enough). With both, a TID 1410 group draws
        the region on it; without the image the group is left out.
    device_observer_uid
        Device Observer UID; default :func:`model_device_uid` of the model version.
    uid_secret
        Site secret of the name-based UIDs (Tracking, SOP Instance, Series, device).
    revision
        The score's revision (:func:`result_uid`): a later revision is another SOP instance.
    manufacturer, institution_name, institutional_department_name
        General Equipment of the SR.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        Little endian explicit VR, ready to write or send.

    Raises
    ------
    ValueError
        A source of ``result.evidence`` is missing, the US image is not the region's, the region
        lies outside the image, or the group or a modality is not one the SR can code.
    """
    _check_result(result)
    evidence = _evidence(result, sources, us_image)
    study_uid = str(study.StudyInstanceUID)
    moment = content_datetime(result)

    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations
                 | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations] = [
        _risk_group(result, uid_secret)]
    if result.us_region is not None and us_image is not None:
        # first, so that OHIF's label of the merged groups starts with the group and score
        groups.insert(0, _region_group(result, us_image, uid_secret))
    elif result.us_region is not None:
        LOGGER.info("US region known but no US image given: SR without a region group")

    observer = hd.sr.ObserverContext(
        observer_type=dcm_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid or model_device_uid(result.model_label, uid_secret),
            name=DEVICE_NAME,
            manufacturer_name=manufacturer,
            model_name=result.model_version,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.RISK_ASSESSMENT,
        imaging_measurements=groups,
    )
    charset = study.get("SpecificCharacterSet") or "ISO_IR 192"
    sr = hd.sr.Comprehensive3DSR(
        # highdicom takes the study from the first evidence; the study is replaced below
        evidence=sorted(evidence, key=lambda ds: ds.StudyInstanceUID != study_uid),
        content=report,
        series_instance_uid=series_uid("sr", result, study_uid, uid_secret),
        series_number=series_number,
        sop_instance_uid=result_uid("sr", result, study_uid, uid_secret, revision),
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=True,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        performed_procedure_codes=[codes.RISK_ASSESSMENT],
        previous_versions=[predecessor] if predecessor is not None else None,
        coding_schemes=[codes.CODING_SCHEME],
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=result.model_name,
        software_versions=[__version__, result.model_version],
        content_date=moment.date(),
        content_time=moment.time(),
        specific_character_set=charset,
    )
    _place_in_study(sr, study, evidence, moment)
    return sr


def _check_result(result: RiskResult) -> None:
    if result.group not in codes.RISK_GROUP_VALUE:
        raise ValueError(f"risk group {result.group!r} has no code; expected one of "
                         f"{sorted(codes.RISK_GROUP_VALUE)}")
    unknown = set(result.modalities_used) | set(result.compensated)
    unknown -= _KNOWN_MODALITIES
    if unknown:
        raise ValueError(f"modalities {sorted(unknown)} have no code; expected some of "
                         f"{sorted(_KNOWN_MODALITIES)}")
    missing = [str(h) for h in HORIZONS_MONTHS if str(h) not in result.rfs_probability]
    if missing:
        raise ValueError(f"rfs_probability lacks the horizons {missing} (months)")


def _evidence(result: RiskResult, sources: Sequence[Dataset],
              us_image: Dataset | None) -> list[Dataset]:
    """Sources and the US image, each instance once, after checking they cover the evidence."""
    by_uid: dict[str, Dataset] = {}
    for ds in [*sources, *([us_image] if us_image is not None else [])]:
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID",
                        "StudyInstanceUID"):
            if not ds.get(keyword):
                raise ValueError(f"a source dataset lacks {keyword}")
        by_uid.setdefault(str(ds.SOPInstanceUID), ds)
    absent = [ref.sop_instance_uid for ref in result.evidence
              if ref.sop_instance_uid not in by_uid]
    if absent:
        raise ValueError(f"no source dataset given for evidence instance(s) {absent}")
    if not by_uid:
        raise ValueError("an SR needs at least one source instance as evidence")
    region = result.us_region
    if (region is not None and us_image is not None
            and us_image.SOPInstanceUID != region.sop_instance_uid):
        raise ValueError(f"us_image {us_image.SOPInstanceUID} is not the image of the US "
                             f"region ({region.sop_instance_uid})")
    return list(by_uid.values())


def _risk_group(result: RiskResult, secret: str) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group: everything the score says, as NUM/CODE items.

    The log-hazard score comes after the percentile and the recurrence-free probabilities: OHIF
    labels the drawn region with the first five NUMs of the merged groups (the region's one,
    then these), and the score's unit is a code (``{risk}``) where the others read ``%``.
    """
    measurements = [
        hd.sr.Measurement(name=codes.PERCENTILE_RANKING, value=float(result.percentile),
                          unit=codes.UNIT_PERCENT),
        *[hd.sr.Measurement(name=codes.RFS_PROBABILITY[months],
                            value=_rfs_percent(result, months), unit=codes.UNIT_PERCENT)
          for months in HORIZONS_MONTHS],
        hd.sr.Measurement(name=codes.RISK_SCORE, value=float(result.risk),
                          unit=codes.UNIT_RISK),
    ]
    evaluations = [
        hd.sr.QualitativeEvaluation(codes.RISK_GROUP, codes.RISK_GROUP_VALUE[result.group]),
        *[hd.sr.QualitativeEvaluation(codes.MODALITY_USED, codes.MODALITY[m])
          for m in result.modalities_used],
        *[hd.sr.QualitativeEvaluation(codes.MODALITY_COMPENSATED, codes.MODALITY[m])
          for m in result.compensated],
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(result.patient_key, secret), identifier=_TRACKING_IDENTIFIER),
        algorithm_id=_algorithm(result),
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )
    # TID 1501 has no row for a weighted variable; a NUM with the variable as concept modifier
    # keeps name and weight together (highdicom's Measurement only takes coded modifiers)
    for variable, weight in result.clinical_attention:
        item = hd.sr.NumContentItem(
            name=codes.ATTENTION_WEIGHT, value=float(weight), unit=codes.UNIT_ONE,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        item.ContentSequence = hd.sr.ContentSequence([hd.sr.TextContentItem(
            name=codes.CLINICAL_VARIABLE, value=variable,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)])
        group[0].ContentSequence.append(item)
    return group


def _rfs_percent(result: RiskResult, months: int) -> float:
    """Recurrence-free probability at ``months`` in %, to 6 significant digits (not 0.01 %:
    0.003 % must stay 0.003 %, which OHIF shows as "0.00 %", where 0 would show no value)."""
    return significant(100.0 * result.rfs_probability[str(months)])


def _region_group(result: RiskResult, us_image: Dataset,
                  secret: str) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The TID 1410 group: the lesion box on the US image (on the frame the lesion was drawn on),
    with a qualitative evaluation saying whether the US features describe a drawn outline or a
    box standing in for one, labelled with the risk group and the
    probability of recurrence within 5 years (100 % minus the recurrence-free probability at
    60 months, so the two drawn lines add up).

    It tracks the same finding as the TID 1501 group (the patient's recurrence risk), so it
    carries the same Tracking Identifier and UID: OHIF then draws both as one annotation. The
    algorithm goes to the group, not the NUM: under the NUM its modifiers hide the value in
    OHIF.
    """
    assert result.us_region is not None
    x0, y0, x1, y1 = (float(v) for v in result.us_region.box_px)
    rows, columns = int(us_image.Rows), int(us_image.Columns)
    if not (0 <= x0 < x1 <= columns and 0 <= y0 < y1 <= rows):
        raise ValueError(f"US region box {result.us_region.box_px} (x0, y0, x1, y1 in pixels) "
                         f"is not inside the {columns}×{rows} image "
                         f"{us_image.SOPInstanceUID}")
    frames = int(us_image.get("NumberOfFrames", 1) or 1)
    frame = result.us_region.frame
    if frame is not None and not 1 <= frame <= frames:
        raise ValueError(f"US region frame {frame} is not one of the {frames} frame(s) of "
                         f"image {us_image.SOPInstanceUID}")
    if result.us_region.roi_shape not in codes.US_ROI_SHAPE_VALUE:
        raise ValueError(f"US region shape {result.us_region.roi_shape!r} has no code; expected "
                         f"one of {sorted(codes.US_ROI_SHAPE_VALUE)}")
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]),
        source_image=hd.sr.SourceImageForRegion.from_source_image(
            us_image, referenced_frame_numbers=[frame] if frame and frames > 1 else None),
    )
    recurrence = significant(100.0 - _rfs_percent(result, codes.REGION_HORIZON_MONTHS))
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(result.patient_key, secret), identifier=_TRACKING_IDENTIFIER),
        referenced_region=region,
        algorithm_id=_algorithm(result),
        measurements=[hd.sr.Measurement(name=codes.RECURRENCE_ON_REGION[result.group],
                                        value=recurrence, unit=codes.UNIT_PERCENT)],
        # says whether the US features saw a drawn outline or a box standing in for one
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            codes.US_ROI_SHAPE, codes.US_ROI_SHAPE_VALUE[result.us_region.roi_shape])],
    )


def _algorithm(result: RiskResult) -> hd.sr.AlgorithmIdentification:
    # highdicom keeps only the keys of a dict of parameters: pass "key=value" strings
    return hd.sr.AlgorithmIdentification(
        name=result.model_name,
        version=result.model_version,
        parameters=[f"{k}={v}" for k, v in sorted(result.algorithm_parameters.items())] or None,
    )


def _place_in_study(sr: hd.sr.Comprehensive3DSR, study: Dataset, evidence: Sequence[Dataset],
                    moment: datetime) -> None:
    """Put the SR in ``study``, list all evidence as current, and date it by the scoring."""
    sr.StudyInstanceUID = study.StudyInstanceUID
    sr.copy_patient_and_study_information(study)
    # IHE AIR: the Current Requested Procedure Evidence lists every instance the result was
    # computed from, whichever study holds it (highdicom would put other studies' instances
    # under Pertinent Other Evidence)
    tree: dict[str, dict[str, list[Dataset]]] = defaultdict(lambda: defaultdict(list))
    for ds in evidence:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        tree[str(ds.StudyInstanceUID)][str(ds.SeriesInstanceUID)].append(item)
    studies = []
    for study_uid, series in tree.items():
        study_item = Dataset()
        study_item.StudyInstanceUID = study_uid
        study_item.ReferencedSeriesSequence = []
        for series_uid_, instances in series.items():
            series_item = Dataset()
            series_item.SeriesInstanceUID = series_uid_
            series_item.ReferencedSOPSequence = instances
            study_item.ReferencedSeriesSequence.append(series_item)
        studies.append(study_item)
    sr.CurrentRequestedProcedureEvidenceSequence = studies
    if "PertinentOtherEvidenceSequence" in sr:
        del sr.PertinentOtherEvidenceSequence
    # the same result gives the same bytes, whenever it is built
    sr.InstanceCreationDate = DA(moment.strftime("%Y%m%d"))
    sr.InstanceCreationTime = TM(moment.strftime("%H%M%S"))
    for equipment in sr.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = moment.strftime("%Y%m%d%H%M%S")
