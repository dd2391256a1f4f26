"""Write a phantom hospital to disk: DICOM per patient, HL7 per patient, the truth table.

Layout of ``out``::

    dicom/<patient>/slide/level-<k>.dcm       VL WSI pyramid (TILED_FULL, JPEG baseline)
    dicom/<patient>/slide/tumour-region.dcm   Microscopy Bulk Simple Annotations
    dicom/<patient>/us/image.dcm              Ultrasound Image
    dicom/<patient>/us/lesion-roi.dcm         Comprehensive SR (TID 1500, lesion outline)
    hl7/<patient>-us-report.hl7               ORU^R01 breast ultrasound report
    hl7/<patient>-pathology.hl7               ORU^R01 pathology result
    truth/nuclei/<patient>.csv.gz             every nucleus drawn (x, y level-0 px, type, µm)
    truth.csv                                 outcomes, true log hazard, split, site, traits,
                                              clinical values
    phantom.json                              parameters, sites, oracle C-index

Each patient draws from its own random stream, so the output is byte-identical for a seed
whatever the number of worker processes.

Patients are spread over ``spec.sites`` hospitals (:mod:`mrrp_pacs.phantom.sites`), in turn by
patient number: each site scans and images with its own stain batch, glass, scanner, JPEG
quality and ultrasound machine, and names its studies its own way. The traits are drawn and
rendered the same way at every site.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pydicom

from mrrp_pacs import __version__
from mrrp_pacs.phantom import cohort as cohort_model
from mrrp_pacs.phantom.dicom_objects import (
    Demographics,
    Equipment,
    StudyInfo,
    lesion_roi_report,
    phantom_uid,
    tumour_region_annotation,
    ultrasound_image,
)
from mrrp_pacs.phantom.histology import NUCLEUS_TYPES, Nuclei, render_slide
from mrrp_pacs.phantom.messages import (
    MessageContext,
    pathology_result,
    report_text,
    ultrasound_report,
    value_text,
)
from mrrp_pacs.phantom.sites import SITES, Site, describe
from mrrp_pacs.phantom.ultrasound import render_frame
from mrrp_pacs.phantom.wsi_dicom import SlideIdentity, write_wsi_pyramid

ISSUER = "PHANTOM"
TRUTH_CLINICAL_PREFIX = "clinical_"
"""``truth.csv`` names the column of clinical variable ``v`` ``clinical_<v>``."""
DEFAULT_MPP = 0.5


@dataclass(frozen=True)
class PhantomSpec:
    patients: int
    seed: int
    slide_px: int = 4096  # slide side in pixels at ``mpp``: every site's section is as wide
    mpp: float = DEFAULT_MPP
    missing_wsi: float = 0.1
    missing_us: float = 0.1
    missing_report: float = 0.1
    event_fraction: float = cohort_model.TARGET_EVENT_FRACTION
    test_fraction: float = cohort_model.TEST_FRACTION
    signal: tuple[tuple[str, float], ...] = tuple(cohort_model.DEFAULT_SIGNAL.items())
    sites: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.sites <= len(SITES):
            raise ValueError(f"--sites must be between 1 and {len(SITES)}, got {self.sites}")
        for name in ("missing_wsi", "missing_us", "missing_report"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be between 0 and 1, "
                                 f"got {value}")
        if not 0.01 <= self.event_fraction <= 0.95:
            raise ValueError(f"--event-fraction must be between 0.01 and 0.95, got "
                             f"{self.event_fraction}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be at least 0 and below 1, got "
                             f"{self.test_fraction}")
        unknown = {k for k, _ in self.signal} - set(cohort_model.DEFAULT_SIGNAL)
        if unknown:
            raise ValueError(f"--signal: unknown modality {sorted(unknown)}; known: "
                             f"{', '.join(cohort_model.DEFAULT_SIGNAL)}")
        if self.slide_px < 512 or self.slide_px % 256:
            raise ValueError(f"--slide-px must be a multiple of 256, at least 512; got "
                             f"{self.slide_px}")
        for site in SITES[: self.sites]:
            side_px = self.slide_px * self.mpp / site.scanner.mpp
            if side_px != int(side_px):
                raise ValueError(f"a {self.slide_px}-px slide at {self.mpp} µm/px is not a whole "
                                 f"number of pixels at site {site.code}'s "
                                 f"{site.scanner.mpp} µm/px")

    def site_of(self, index: int) -> Site:
        """The site of the patient numbered ``index`` (from 0): the sites take turns."""
        return SITES[index % self.sites]


def parse_signal(text: str) -> tuple[tuple[str, float], ...]:
    """``wsi=1,us=0.6`` → weights, the rest at their defaults."""
    weights = dict(cohort_model.DEFAULT_SIGNAL)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--signal: {item!r} is not name=weight")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--signal: weight {value!r} of {name} is not a number") from None
    return tuple(weights.items())


@dataclass(frozen=True)
class _PatientJob:
    index: int
    patient_id: str
    seed: int
    slide_px: int
    mpp: float
    site: Site
    traits: dict[str, float]
    clinical: dict[str, object]
    has_wsi: bool
    has_us: bool
    has_report: bool
    out: Path


FIRST_DIAGNOSIS = date(2008, 1, 1)
US_DAYS_BEFORE_DIAGNOSIS = (3, 21)  # the ultrasound study precedes diagnosis by [3, 21) days
EARLIEST_STUDY_DATE = FIRST_DIAGNOSIS - timedelta(days=US_DAYS_BEFORE_DIAGNOSIS[1])
"""No phantom study is older: how far back a PACS query must reach to find them all."""


def _dates(rng: np.random.Generator, age: int) -> tuple[date, date, date, date]:
    """Diagnosis, US study, pathology sign-out and birth dates (2008–2018 diagnoses)."""
    diagnosis = FIRST_DIAGNOSIS + timedelta(days=int(rng.integers(0, 11 * 365)))
    us_day = diagnosis - timedelta(days=int(rng.integers(*US_DAYS_BEFORE_DIAGNOSIS)))
    pathology_day = diagnosis + timedelta(days=int(rng.integers(5, 15)))
    birth = diagnosis - timedelta(days=round(age * 365.25) + int(rng.integers(0, 365)))
    return diagnosis, us_day, pathology_day, birth


def _write_patient(job: _PatientJob) -> dict[str, int]:
    rng = np.random.default_rng(np.random.SeedSequence([job.seed, job.index, 0x50484E54]))
    age = int(job.clinical["age_years"])  # type: ignore[call-overload]
    _, us_day, pathology_day, birth = _dates(rng, age)
    laterality = "R" if rng.random() < 0.5 else "L"
    who = Demographics(job.patient_id, ISSUER, f"PHANTOM^{job.patient_id}",
                       birth.strftime("%Y%m%d"), "F")
    seed_key = f"{job.seed}/{job.patient_id}"
    us_accession = f"US{job.seed:04d}{job.index + 1:05d}"
    path_accession = f"PA{job.seed:04d}{job.index + 1:05d}"
    written = {"dicom": 0, "hl7": 0}
    patient_dir = job.out / "dicom" / job.patient_id
    # draw every random quantity in a fixed order whatever is missing, so that removing a
    # modality does not change the others
    slide_rng, us_rng, text_rng = (np.random.default_rng(s) for s in
                                   np.random.SeedSequence([job.seed, job.index, 7]).spawn(3))

    site = job.site
    if job.has_wsi:
        scanner = site.scanner
        # the same section (slide_px x mpp µm) at the site scanner's resolution
        side_px = round(job.slide_px * job.mpp / scanner.mpp)
        slide = render_slide(slide_rng, job.traits, side_px, scanner.mpp, site.stain)
        identity = SlideIdentity(
            patient_id=job.patient_id, issuer_of_patient_id=ISSUER,
            patient_name=who.patient_name, patient_birth_date=who.birth_date,
            patient_sex="F", study_instance_uid=phantom_uid(seed_key, "pathology-study"),
            accession_number=path_accession, study_id="PATH1",
            study_date=pathology_day.strftime("%Y%m%d"), study_time="090000",
            uid_seed=f"{seed_key}/slide", container_identifier=f"{job.patient_id}-A1",
            study_description=describe(site.pathology_study, laterality),
            series_description=describe(site.pathology_series, laterality),
            laterality=laterality, body_part_examined="BREAST",
            manufacturer=scanner.manufacturer, manufacturer_model_name=scanner.model,
            station_name=site.wsi_station, institution_name=site.institution)
        levels = write_wsi_pyramid(slide.rgb, scanner.mpp, identity, patient_dir / "slide",
                                   jpeg_quality=scanner.jpeg_quality)
        level0 = pydicom.dcmread(levels[0], stop_before_pixels=True)
        annotation = tumour_region_annotation(level0, slide.tumour_polygon_px, laterality,
                                              f"{seed_key}/slide")
        annotation.save_as(patient_dir / "slide" / "tumour-region.dcm", enforce_file_format=True)
        _write_nuclei(job.out / "truth" / "nuclei" / f"{job.patient_id}.csv.gz", slide.nuclei,
                      scanner.mpp)
        written["dicom"] += len(levels) + 1

    size_mm = float(job.clinical["tumour_size_mm"])  # type: ignore[arg-type]
    if job.has_us:
        machine = site.ultrasound
        frame = render_frame(us_rng, job.traits, size_mm, machine.rows, machine.columns,
                             machine.pixel_mm, machine.gain_db, machine.frames)
        study = StudyInfo(phantom_uid(seed_key, "us-study"), us_accession, "US1",
                          us_day.strftime("%Y%m%d"), "101500",
                          describe(site.us_study, laterality))
        image = ultrasound_image(
            frame.pixels if frame.cine is None else frame.cine, frame.pixel_mm, who, study,
            laterality, f"{seed_key}/us",
            Equipment(machine.manufacturer, machine.model, site.us_station, site.institution),
            describe(site.us_series, laterality), machine.frame_rate_hz)
        (patient_dir / "us").mkdir(parents=True, exist_ok=True)
        image.save_as(patient_dir / "us" / "image.dcm", enforce_file_format=True)
        roi = lesion_roi_report(image, frame.lesion_box_px, f"{seed_key}/us",
                                outline_px=frame.lesion_outline_px)
        roi.save_as(patient_dir / "us" / "lesion-roi.dcm", enforce_file_format=True)
        written["dicom"] += 2

    context = MessageContext(job.patient_id, ISSUER, f"PHANTOM^{job.patient_id}",
                             who.birth_date, "F", laterality)
    hl7_dir = job.out / "hl7"
    hl7_dir.mkdir(parents=True, exist_ok=True)
    lines = report_text(text_rng, job.traits, size_mm, laterality)
    if job.has_report:
        message = ultrasound_report(context, f"{job.patient_id}-US", us_accession,
                                    us_day.strftime("%Y%m%d"), lines)
        (hl7_dir / f"{job.patient_id}-us-report.hl7").write_bytes(message)
        written["hl7"] += 1
    message = pathology_result(context, f"{job.patient_id}-PA", path_accession,
                               pathology_day.strftime("%Y%m%d"), job.clinical)
    (hl7_dir / f"{job.patient_id}-pathology.hl7").write_bytes(message)
    written["hl7"] += 1
    return written


def _write_nuclei(path: Path, nuclei: Nuclei, mpp: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    text.write(f"# level-0 pixels at {mpp} um/px; sizes in um\n")
    text.write("x_px,y_px,type,major_um,minor_um,angle_rad\n")
    for i in range(len(nuclei)):
        text.write(f"{nuclei.x_px[i]:.2f},{nuclei.y_px[i]:.2f},"
                   f"{NUCLEUS_TYPES[nuclei.kind[i]]},{nuclei.major_um[i]:.2f},"
                   f"{nuclei.minor_um[i]:.2f},{nuclei.angle_rad[i]:.3f}\n")
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                               mtime=0) as packed:
        packed.write(text.getvalue().encode("ascii"))


def _finite(value: float) -> float | None:
    return round(value, 6) if np.isfinite(value) else None


def _scalar(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else value


def cohort_parameters(spec: PhantomSpec) -> cohort_model.CohortParameters:
    """The cohort model's parameters of a phantom specification."""
    return cohort_model.CohortParameters(
        patients=spec.patients, seed=spec.seed, signal=dict(spec.signal),
        missing_wsi=spec.missing_wsi, missing_us=spec.missing_us,
        missing_report=spec.missing_report, event_fraction=spec.event_fraction,
        test_fraction=spec.test_fraction)


def written_cohort(out: Path, **outcomes: float) -> cohort_model.Cohort:
    """The cohort a written phantom was drawn from (its ``phantom.json``), with the outcomes
    re-drawn when ``event_fraction`` or ``test_fraction`` is given: neither changes a trait,
    a clinical value or a pixel, so the images on disk still belong to these patients."""
    spec = json.loads((out / "phantom.json").read_text())["spec"]
    spec["signal"] = tuple(spec["signal"].items())
    return cohort_model.make_cohort(cohort_parameters(PhantomSpec(**{**spec, **outcomes})))


def generate(spec: PhantomSpec, out: Path, workers: int | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, object]:
    """Write the whole phantom into ``out`` (which must not exist or be empty).

    Returns the content of ``phantom.json``.
    """
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: choose a new folder for the phantom")
    out.mkdir(parents=True, exist_ok=True)
    cohort = cohort_model.make_cohort(cohort_parameters(spec))
    jobs = [
        _PatientJob(
            index=i, patient_id=pid, seed=spec.seed, slide_px=spec.slide_px, mpp=spec.mpp,
            site=spec.site_of(i), traits={k: float(v[i]) for k, v in cohort.traits.items()},
            clinical={k: _scalar(v[i]) for k, v in cohort.clinical.items()},
            has_wsi=bool(cohort.has_wsi[i]), has_us=bool(cohort.has_us[i]),
            has_report=bool(cohort.has_report[i]), out=out)
        for i, pid in enumerate(cohort.ids)
    ]
    totals = {"dicom": 0, "hl7": 0}

    def collect(written: dict[str, int]) -> None:
        for key, value in written.items():
            totals[key] += value
        if progress is not None:
            progress(1)

    workers = max(1, workers or os.cpu_count() or 1)
    if workers == 1:
        for job in jobs:
            collect(_write_patient(job))
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for written in pool.map(_write_patient, jobs, chunksize=1):
                collect(written)

    _write_truth(out / "truth.csv", cohort, [job.site.code for job in jobs])
    test = cohort.split == "test"
    summary: dict[str, object] = {
        "generator": f"mrrp-pacs {__version__}",
        "spec": {**asdict(spec), "signal": dict(spec.signal)},
        "coefficients": cohort_model.COEFFICIENTS,
        "trait_modality": cohort_model.TRAITS,
        "interaction": {"traits": list(cohort_model.INTERACTION[:2]),
                        "coefficient": cohort_model.INTERACTION[2]},
        "weibull": {"shape": cohort_model.WEIBULL_SHAPE,
                    "scale_months": round(cohort.weibull_scale, 6)},
        "follow_up_months": list(cohort_model.FOLLOW_UP_MONTHS),
        "events": int(cohort.event.sum()),
        "event_fraction": round(float(cohort.event.mean()), 6),
        "n_train": int((~test).sum()),
        "n_test": int(test.sum()),
        "events_test": int(cohort.event[test].sum()),
        # null when the split holds no event (tiny cohorts): JSON has no NaN
        "oracle_c_index": _finite(cohort.oracle_c_index),
        "oracle_c_index_all": _finite(cohort_model.harrell_c(
            cohort.time_months, cohort.event, cohort.log_hazard)),
        "files": totals,
        "sites": {site.code: _site_summary(site) for site in SITES[: spec.sites]},
    }
    (out / "phantom.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _site_summary(site: Site) -> dict[str, object]:
    """How a site acquires, for phantom.json (so measurements can be read per site)."""
    machine = site.ultrasound
    return {
        "institution": site.institution,
        "stain": {"hematoxylin_od": list(site.stain.hematoxylin_od),
                  "eosin_od": list(site.stain.eosin_od),
                  "glass_rgb": [round(v, 2) for v in site.stain.glass_rgb],
                  "source": site.stain.source},
        "scanner": {"manufacturer": site.scanner.manufacturer, "model": site.scanner.model,
                    "mpp": site.scanner.mpp, "jpeg_quality": site.scanner.jpeg_quality},
        "ultrasound": {"manufacturer": machine.manufacturer, "model": machine.model,
                       "pixel_mm": machine.pixel_mm, "rows": machine.rows,
                       "columns": machine.columns, "gain_db": machine.gain_db,
                       "frames": machine.frames, "frame_rate_hz": machine.frame_rate_hz},
    }


def _write_truth(path: Path, cohort: cohort_model.Cohort, sites: list[str]) -> None:
    """``truth.csv``: the columns before ``latent_*`` describe each patient's draw; the
    ``clinical_*`` columns (last, added for issue 16) repeat the pathology result's values as
    its OBX-5 writes them, so the true hazard can be rebuilt from this file alone."""
    traits = list(cohort_model.TRAITS)
    clinical = list(cohort.clinical)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["patient_id", "time_months", "event", "true_log_hazard", "split",
                         "has_wsi", "has_us", "has_report", "site",
                         *[f"latent_{t}" for t in traits],
                         *[f"{TRUTH_CLINICAL_PREFIX}{name}" for name in clinical]])
        for i, pid in enumerate(cohort.ids):
            writer.writerow([
                pid, f"{cohort.time_months[i]:.1f}", int(cohort.event[i]),
                f"{cohort.log_hazard[i]:.6f}", cohort.split[i], int(cohort.has_wsi[i]),
                int(cohort.has_us[i]), int(cohort.has_report[i]), sites[i],
                *[f"{cohort.traits[t][i]:.6f}" for t in traits],
                *[value_text(cohort.clinical[name][i]) for name in clinical],
            ])
