"""The daemon killed with SIGKILL at seeded points under real senders: nothing answered is
lost, nothing is scored or sent twice (tests/reliability/harness.py).

CI runs one chain of :data:`CI_POINTS` kill points on a small phantom; ``make soak`` runs
:data:`SOAK_CHAINS` chains covering every named point with other seeds (``MRRP_SOAK=1``).
"""

from __future__ import annotations

import os

import pytest
from daemon_proc import query
from harness import (
    HOSPITAL,
    OUTAGE_SETTINGS,
    POINTS,
    SOAK,
    Chain,
    new_ports,
    print_table,
    seeded_points,
)
from orthanc import LOOPBACK, running_orthanc

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.needs_tool("Orthanc", "storescu")]

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


def test_a_pacs_that_hangs_then_goes_down_delays_results_and_loses_none(trained, tmp_path):
    """Orthanc paused (SIGSTOP: connections open, nothing answers) for 20 s from the first
    score on (while slides are pulled and results sent), then stopped for 20 s, then started
    again on the same ports and storage: the daemon stays up, and in the end every result is
    in Orthanc once."""
    import signal
    import time
    import urllib.request

    from daemon_proc import serve, wait_for
    from orthanc import free_port

    hospital, models = trained
    ports = new_ports()
    pacs_ports = (free_port(), free_port())
    modalities = {"MRRP": ["MRRP", LOOPBACK, ports["dicom"]]}
    with running_orthanc(tmp_path / "orthanc", modalities=modalities, ports=pacs_ports) as pacs:
        chain, senders = Chain.start(tmp_path, hospital, models, pacs, ports, HOSPITAL.patients)
        chain.settings = OUTAGE_SETTINGS
        daemon = serve(chain.config, chain.log)
        try:
            senders.feed(ports, daemon)
            wait_for("the first score", lambda: query(
                chain.db, "SELECT COUNT(*) FROM scores")[:1] not in ([], [(0,)]),
                600, daemon, chain.log)
            os.kill(pacs.pid, signal.SIGSTOP)
            time.sleep(20)
            os.kill(pacs.pid, signal.SIGCONT)
        except BaseException:
            daemon.kill()
            raise
    try:
        time.sleep(20)  # the PACS is down: connections refused
        assert daemon.poll() is None, chain.log.read_text()[-3000:]
        health = urllib.request.urlopen(f"http://{LOOPBACK}:{ports['http']}/healthz",
                                        timeout=10)
        assert health.status == 200
        with running_orthanc(tmp_path / "orthanc", modalities=modalities,
                             ports=pacs_ports) as pacs:
            chain.orthanc = pacs
            senders.feed(ports, daemon)
            wait_for("everything stored, scored and sent after the outage",
                     lambda: chain.quiet(senders), 600, daemon, chain.log)
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=120) == 0, chain.log.read_text()[-3000:]
            totals = chain.check(senders)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    retried = query(chain.db, "SELECT COUNT(*) FROM exports WHERE attempts > 1")[0][0]
    pulls = query(chain.db, "SELECT COUNT(*) FROM jobs WHERE kind = 'pull' AND "
                            "(state = 'failed' OR json_extract(detail, '$.failed') > 0)")[0][0]
    totals["results sent again after a failure"] = retried
    totals["pulls that failed"] = pulls
    print_table([chain], [totals])
    assert retried + pulls > 0, "the outage touched neither pull nor export: it proved nothing"
