from pathlib import Path

import pytest
from phantoms import SMALL

from mrrp_pacs.phantom.generator import generate


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory) -> Path:
    """Six patients with small slides, some modalities missing; written once per session."""
    out = tmp_path_factory.mktemp("phantom") / "out"
    generate(SMALL, out, workers=2)
    return out
