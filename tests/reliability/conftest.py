"""Shared by the fault harness's tests: the hospital's phantom and a trained model."""

from __future__ import annotations

import pytest
from harness import HOSPITAL

from mrrp_pacs.phantom.generator import generate


@pytest.fixture(scope="package")
def trained(tmp_path_factory, trained_phantom):
    """The hospital's phantom, and the model store of a model trained on another history
    (generated once for every test of tests/reliability)."""
    root = tmp_path_factory.mktemp("reliability")
    _, models = trained_phantom
    hospital = root / "hospital"
    generate(HOSPITAL, hospital)
    return hospital, models
