"""Phantom ultrasound frames and their DICOM images, for the tests of the ultrasound branch."""

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from mrrp_pacs.phantom.dicom_objects import Demographics, StudyInfo, ultrasound_image
from mrrp_pacs.phantom.ultrasound import UltrasoundFrame, render_frame

US_TRAITS = ("us_margin", "us_orientation", "us_shadowing", "us_heterogeneity")
WHO = Demographics("T1", "TEST", "TEST^ONE", "19700101", "F")
STUDY = StudyInfo("1.2.826.0.1.3680043.8.498.1", "ACC1", "1", "20240101", "101010", "US breast")


def random_traits(rng: np.random.Generator) -> dict[str, float]:
    return {name: float(rng.standard_normal()) for name in US_TRAITS}


def neutral_frame() -> UltrasoundFrame:
    """A 640 × 480 frame at 0.1 mm/px, every trait at 0, an 18 mm lesion."""
    return render_frame(np.random.default_rng(7), dict.fromkeys(US_TRAITS, 0.0), 18.0)


def us_dataset(frame: UltrasoundFrame) -> Dataset:
    """``frame`` as an Ultrasound Image with a calibrated region."""
    return ultrasound_image(frame.pixels, frame.pixel_mm, WHO, STUDY, "L", "test")


def saved(ds: Dataset, tmp_path: Path, name: str = "us.dcm") -> Path:
    """``ds`` written as a DICOM file (with file meta) under ``tmp_path``."""
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path
