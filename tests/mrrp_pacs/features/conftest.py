"""Fixtures of the ultrasound tests (test_us_image, test_us_roi)."""

import pytest
from pydicom.dataset import Dataset
from us_phantom import neutral_frame, us_dataset

from mrrp_pacs.phantom.ultrasound import UltrasoundFrame


@pytest.fixture(scope="module")
def frame() -> UltrasoundFrame:
    """A phantom ultrasound frame (every trait 0, an 18 mm lesion)."""
    return neutral_frame()


@pytest.fixture
def image(frame: UltrasoundFrame) -> Dataset:
    """``frame`` as an Ultrasound Image (a fresh dataset each test: tests alter it)."""
    return us_dataset(frame)
