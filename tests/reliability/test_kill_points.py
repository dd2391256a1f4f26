"""The daemon killed with SIGKILL at seeded points under real senders: nothing answered is
lost, nothing is scored or sent twice (tests/reliability/harness.py).

CI runs one chain of :data:`CI_POINTS` kill points on a small phantom; ``make soak`` runs
:data:`SOAK_CHAINS` chains covering every named point with other seeds (``MRRP_SOAK=1``).
"""

from __future__ import annotations

import os

import pytest
from daemon_proc import train_on_phantom
from harness import POINTS, Chain, new_ports, print_table, seeded_points
from orthanc import LOOPBACK, running_orthanc

from mrrp_pacs.phantom.generator import PhantomSpec, generate

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.needs_tool("Orthanc", "storescu")]

SOAK = os.environ.get("MRRP_SOAK") == "1"
TRAINING = PhantomSpec(patients=16, seed=4, slide_px=1024, missing_wsi=0.2, missing_us=0.2,
                       missing_report=0.2)
# the hospital's patients: each with a slide, an ultrasound study and both reports
HOSPITAL = PhantomSpec(patients=6 if SOAK else 4, seed=11, slide_px=1024, missing_wsi=0.0,
                       missing_us=0.0, missing_report=0.0)
CI_POINTS = 4
SOAK_CHAINS = 4  # of len(POINTS) kill points each: every named point 4 times, 32 kills


def _chains() -> list[list]:
    if not SOAK:
        return [sorted(seeded_points(seed=1, count=CI_POINTS), key=_phase)]
    return [sorted(seeded_points(seed=100 + n, count=len(POINTS)), key=_phase)
            for n in range(SOAK_CHAINS)]


def _phase(point) -> int:
    """Chains kill in pipeline order: a point of a phase already done is never reached."""
    return list(POINTS).index(point.point)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    _, models = train_on_phantom(root, TRAINING)
    hospital = root / "hospital"
    generate(HOSPITAL, hospital)
    return hospital, models


def test_sigkill_at_seeded_points_loses_nothing_and_does_nothing_twice(trained, tmp_path):
    hospital, models = trained
    chains, totals = [], []
    for number, kills in enumerate(_chains()):
        root = tmp_path / f"chain{number}"
        ports = new_ports()
        with running_orthanc(root / "orthanc",
                             modalities={"MRRP": ["MRRP", LOOPBACK, ports["dicom"]]}) as pacs:
            chain, senders = Chain.start(root, hospital, models, pacs, ports,
                                         HOSPITAL.patients)
            chains.append(chain)
            for kill in kills:
                done = chain.run(senders, kill)
                assert done.killed and not done.lost, (str(kill), done.lost)
            chain.run(senders, None)
            totals.append(chain.check(senders))
    print_table(chains, totals)
    assert sum(r.killed for c in chains for r in c.rounds) == sum(len(k) for k in _chains())
