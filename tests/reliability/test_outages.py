"""Outages the daemon must sit out without losing or doubling anything (tests/reliability/
harness.py): a PACS that fails (error statuses, then well again without a restart), the data
folder's disk filled and freed, and a SIGKILL in the middle of a rescoring by a new model.

After each, :meth:`harness.Chain.check`: every HL7 message answered AA and every instance
answered 0x0000 is stored, each (patient, model, inputs) scored once, each patient one current
score, nothing pending or dead in the outbox, and every SR sent is in Orthanc (C-FIND) once.
The PACS that hangs and goes down is in test_kill_points.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from daemon_proc import query, serve, wait_for
from harness import (
    HOSPITAL,
    OUTAGE_SETTINGS,
    SOAK,
    Chain,
    KillPoint,
    Senders,
    new_ports,
    print_table,
    subset,
    wait_port,
)
from orthanc import LOOPBACK, Orthanc, free_port, running_orthanc
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from model_store import ModelStore
from mrrp_pacs.model.train import MODEL_KIND

pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.needs_tool("Orthanc", "storescu")]

# CI runs each scenario on two of the hospital's patients (each ≤ ~90 s); make soak on all
PATIENTS = HOSPITAL.patients if SOAK else 2

# Orthanc's Lua filters, failing while a flag file exists. Orthanc 1.10 answers a C-STORE
# whose ReceivedInstanceFilter raises with 0xA700 (out of resources: every exception while
# storing), a C-FIND whose IncomingFindRequestFilter raises with 0xC000; its
# ReceivedCStoreInstanceFilter cannot return an error status in 1.10.1 (it stores anyway).
FAILING_PACS_LUA = """
local function failing(what)
  local flag = io.open('{flags}/' .. what, 'r')
  if flag then flag:close() return true end
  return false
end
function ReceivedInstanceFilter(dicom, origin, info)
  if origin['RemoteAet'] == 'MRRP' and failing('store') then
    error('the PACS is failing (test flag store)')
  end
  return true
end
function IncomingFindRequestFilter(query, origin)
  if failing('find') then error('the PACS is failing (test flag find)') end
  return query
end
"""


def _destination(pacs: Orthanc, port: int) -> None:
    """Where Orthanc sends what we C-MOVE (REST, no restart): a closed port makes every C-MOVE
    end 0xC000 with its sub-operations failed."""
    request = urllib.request.Request(
        f"{pacs.url}/modalities/MRRP", method="PUT",
        data=json.dumps({"AET": "MRRP", "Host": LOOPBACK, "Port": port}).encode())
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def _count(db: Path, sql: str, args: tuple[object, ...] = ()) -> int:
    rows = query(db, sql, args)
    return int(rows[0][0]) if rows else 0


def _log_count(chain: Chain, words: str) -> int:
    return chain.log.read_text(errors="replace").count(words)


def _alive_and_answering(daemon: subprocess.Popen[bytes], chain: Chain) -> int:
    """The daemon still runs and /healthz answers (200, or 503 degraded); returns the code."""
    assert daemon.poll() is None, chain.log.read_text()[-3000:]
    try:
        with urllib.request.urlopen(
                f"http://{LOOPBACK}:{chain.ports['http']}/healthz", timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        assert exc.code == 503, exc.code
        return 503


def _wait_feeding(what: str, condition, chain: Chain, senders: Senders,
                  daemon: subprocess.Popen[bytes], timeout_s: float) -> None:
    """:func:`wait_for`, the senders resending what holds no positive answer meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert daemon.poll() is None, f"daemon exited waiting for {what}:\n" + \
            chain.log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + \
            chain.log.read_text()[-3000:]
        senders.feed(chain.ports, daemon)
        time.sleep(1)


def _stop(daemon: subprocess.Popen[bytes], chain: Chain) -> None:
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=120) == 0, chain.log.read_text()[-3000:]


# -- a PACS that fails --------------------------------------------------------------------


def test_a_failing_pacs_delays_pulls_and_results_and_loses_none(trained, tmp_path):
    """Orthanc up all along but failing: C-MOVE to us ends 0xC000 (its destination for us
    broken), then C-FIND ends 0xC000 too, and our results' C-STOREs are refused 0xA700 until
    every SR has been refused twice; then it is well again, without a restart. Nothing is
    dead meanwhile, and in the end every result is in Orthanc once."""
    hospital, models = subset(trained[0], tmp_path, PATIENTS), trained[1]
    ports = new_ports()
    flags = tmp_path / "pacs-flags"
    flags.mkdir()
    script = tmp_path / "failing-pacs.lua"
    script.write_text(FAILING_PACS_LUA.replace("{flags}", str(flags)))
    with running_orthanc(tmp_path / "orthanc", modalities={
            "MRRP": ["MRRP", LOOPBACK, ports["dicom"]]},
            extra={"LuaScripts": [str(script)]}) as pacs:
        chain, senders = Chain.start(tmp_path, hospital, models, pacs, ports, PATIENTS)
        chain.settings = OUTAGE_SETTINGS
        _destination(pacs, free_port())  # nothing listens there
        (flags / "store").touch()
        daemon = serve(chain.config, chain.log)
        try:
            senders.feed(ports, daemon)
            wait_for("a C-MOVE that failed", lambda: _count(
                chain.db, "SELECT COUNT(*) FROM retrievals WHERE failures > 0") > 0,
                120, daemon, chain.log)
            finds_before = _log_count(chain, "C-FIND ended with status 0xC000")
            (flags / "find").touch()
            wait_for("a C-FIND that failed", lambda: _log_count(
                chain, "C-FIND ended with status 0xC000") > finds_before, 60, daemon, chain.log)
            _destination(pacs, ports["dicom"])
            (flags / "find").unlink()
            wait_for("every SR refused twice", lambda: _count(
                chain.db, "SELECT COUNT(*) FROM exports WHERE kind = 'sr' AND attempts >= 2 "
                          "AND state = 'pending'") >= PATIENTS,
                300, daemon, chain.log)
            assert _count(chain.db, "SELECT COUNT(*) FROM exports WHERE state = 'dead'") == 0
            assert _alive_and_answering(daemon, chain) in (200, 503)
            (flags / "store").unlink()
            wait_for("everything stored, scored and sent once the PACS is well",
                     lambda: chain.quiet(senders), 300, daemon, chain.log)
            _stop(daemon, chain)
        finally:
            if daemon.poll() is None:
                daemon.kill()
        totals = chain.check(senders)
    totals["C-MOVE ended 0xC000"] = _log_count(chain, "ended with status 0xC000") - _log_count(
        chain, "C-FIND ended with status 0xC000")
    totals["C-FIND ended 0xC000"] = _log_count(chain, "C-FIND ended with status 0xC000")
    totals["results refused 0xA700"] = _log_count(chain, "status 0xA700")
    totals["results sent again after a failure"] = _count(
        chain.db, "SELECT COUNT(*) FROM exports WHERE attempts > 1")
    print_table([chain], [totals])
    assert totals["C-MOVE ended 0xC000"] > 0 and totals["C-FIND ended 0xC000"] > 0, totals
    assert totals["results refused 0xA700"] >= 2 * PATIENTS, totals


# -- the data folder's disk filled and freed ----------------------------------------------

DATA_DISK_MB = 48 if SOAK else 32  # the phantom's data folder takes ~10 MB at the end


def _fill(folder: Path) -> Path:
    """A file written in ``folder`` until the disk is full (ENOSPC)."""
    filler = folder / "filler"
    chunk = b"\0" * (1 << 20)
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        try:  # the last pages the chunks left
            while True:
                out.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def _refused_while_full(chain: Chain, senders: Senders, daemon: subprocess.Popen[bytes],
                        hold_s: float) -> None:
    """The senders send while the disk is full, for ``hold_s``: nothing they hold an AA or a
    0x0000 for is missing, and the daemon stays up and answers /healthz."""
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:
        senders.feed(chain.ports, daemon)
        assert not chain._lost(senders), chain._lost(senders)
        assert _alive_and_answering(daemon, chain) in (200, 503)
        time.sleep(1)


def _echo(port: int) -> bool:
    """Whether the daemon's DICOM listener accepts an association (C-ECHO) now."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, port, ae_title="MRRP")
    if not assoc.is_established:
        return False
    try:
        return getattr(assoc.send_c_echo(), "Status", None) == 0x0000
    finally:
        assoc.release()


def _listening_again(chain: Chain, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not _echo(chain.ports["dicom"]):
        assert daemon.poll() is None, chain.log.read_text()[-3000:]
        assert time.monotonic() < deadline, (
            "the DICOM listener refuses every association (30 s)")
        time.sleep(1)


def test_a_full_data_disk_refuses_what_it_cannot_store_and_loses_nothing(trained, tmp_path):
    """The daemon's data folder (database, object store) on a small tmpfs; the log on another
    disk. The disk is filled once the daemon is up, before the senders send (every message
    and instance refused, AR / 0xA700), held 10 s, freed; filled again at the first score
    (scoring, publication and the outbox fail), held 10 s, freed. The senders resend; in the
    end everything is stored, scored once and sent once.

    tmpfs, not a loop-mounted ext4: it answers ENOSPC the moment it is full (ext4 keeps 5 %
    for root, and CI runs as root), and SQLite pre-writes each page of its WAL index (-shm) so
    a full tmpfs gives SQLITE_FULL rather than SIGBUS."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs for the daemon's data folder and must run as "
                    "root (CI does): run it with sudo, or as root in the test container")
    hospital, models = subset(trained[0], tmp_path, PATIENTS), trained[1]
    ports = new_ports()
    data = tmp_path / "daemon"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DATA_DISK_MB}m,mode=0700", "tmpfs",
                    str(data)], check=True, capture_output=True, timeout=30)
    try:
        with running_orthanc(tmp_path / "orthanc", modalities={
                "MRRP": ["MRRP", LOOPBACK, ports["dicom"]]}) as pacs:
            chain, senders = Chain.start(tmp_path, hospital, models, pacs, ports,
                                         PATIENTS)
            chain.settings = OUTAGE_SETTINGS
            daemon = serve(chain.config, chain.log)
            try:
                # up: listening, its scheduler's job store made and a first poll recorded
                wait_for("the daemon up", lambda: _count(
                    chain.db, "SELECT COUNT(*) FROM jobs WHERE kind = 'pull' AND state != "
                              "'running'") > 0, 120, daemon, chain.log)
                assert wait_port(ports["hl7"], daemon)
                _listening_again(chain, daemon)
                filler = _fill(data)
                _refused_while_full(chain, senders, daemon, 10)
                refused_at_intake = (len(senders.hl7) - len(senders.acked),
                                     len(senders.instances) - len(senders.stored))
                filler.unlink()
                _listening_again(chain, daemon)
                _wait_feeding("the first score", lambda: _count(
                    chain.db, "SELECT COUNT(*) FROM scores") > 0, chain, senders, daemon, 300)
                filler = _fill(data)
                _refused_while_full(chain, senders, daemon, 10)
                filler.unlink()
                _listening_again(chain, daemon)
                _wait_feeding("everything stored, scored and sent after the disk was freed",
                              lambda: chain.quiet(senders), chain, senders, daemon, 300)
                _stop(daemon, chain)
            finally:
                if daemon.poll() is None:
                    daemon.kill()
            totals = chain.check(senders)
            totals["results sent again after a failure"] = _count(
                chain.db, "SELECT COUNT(*) FROM exports WHERE attempts > 1")
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False, capture_output=True,
                       timeout=60)
    totals["HL7 refused while full"], totals["instances refused while full"] = refused_at_intake
    print_table([chain], [totals])
    assert refused_at_intake[0] > 0 and refused_at_intake[1] > 0, refused_at_intake


# -- SIGKILL mid-rescore ------------------------------------------------------------------


def _second_version(models: Path) -> str:
    """A copy of the promoted model saved again as a new version (same weights, a later
    version id), promoted with ``mrrp-pacs models promote``: every patient is due again."""
    store = ModelStore(models, clock=lambda: datetime.now(UTC) + timedelta(minutes=5))
    (name,) = store.names(MODEL_KIND)
    first = store.load(MODEL_KIND, name)
    files = {p.name: p.read_bytes() for p in first.path.iterdir()
             if p.is_file() and p.name in first.manifest["files"]}
    written = {"kind", "name", "version", "created_at", "files"}
    second = store.save(MODEL_KIND, name, files,
                        {k: v for k, v in first.manifest.items() if k not in written})
    promoted = subprocess.run([sys.executable, "-m", "mrrp_pacs", "models", "promote",
                               str(second.path)], capture_output=True, text=True, timeout=120)
    assert promoted.returncode == 0, promoted.stderr
    assert store.promoted(MODEL_KIND, name) == second.version
    return second.version


# the second v2 score committed, its results not queued; then (make soak) the next v2
# score's objects queued: on two patients (CI) only the first, after the first v2 score
RESCORE_KILLS = ([KillPoint("score.committed", 2), KillPoint("publish.committed", 1)] if SOAK
                 else [KillPoint("score.committed", 1)])


def test_sigkill_mid_rescore_scores_each_patient_once_with_the_new_model(trained, tmp_path):
    """Everything scored and sent with model v1; v2 promoted; the daemon rescoring every
    patient with v2 is killed after its second v2 score commits (before its results are
    queued), then after the next v2 score's objects are queued; restarted, each patient has
    one v2 score, current, and every v2 SR is in Orthanc once."""
    hospital, shared = subset(trained[0], tmp_path, PATIENTS), trained[1]
    models = tmp_path / "models"
    shutil.copytree(shared, models)  # the shared store is not ours to promote in
    ports = new_ports()
    with running_orthanc(tmp_path / "orthanc", modalities={
            "MRRP": ["MRRP", LOOPBACK, ports["dicom"]]}) as pacs:
        chain, senders = Chain.start(tmp_path, hospital, models, pacs, ports, PATIENTS)
        chain.run(senders, None)
        first = {v for (v,) in query(chain.db, "SELECT DISTINCT model_version FROM scores")}
        chain.version = _second_version(models)
        assert chain.version not in first
        for kill in RESCORE_KILLS:
            done = chain.run(senders, kill)
            assert done.killed and not done.lost, (str(kill), done.lost)
            rescored = _count(chain.db, "SELECT COUNT(*) FROM scores WHERE model_version = ?",
                              (chain.version,))
            assert 0 < rescored < PATIENTS, f"{kill} was not mid-rescore: {rescored}"
        chain.run(senders, None)
        totals = chain.check(senders)
        per_patient = query(chain.db, "SELECT patient_key, COUNT(*), SUM(superseded_by IS NULL) "
                                      "FROM scores WHERE model_version = ? GROUP BY patient_key",
                            (chain.version,))
        v2_srs = query(chain.db, "SELECT COUNT(*) FROM exports e JOIN scores s ON "
                                 "s.id = e.score_id WHERE e.kind = 'sr' AND e.state = 'sent' "
                                 "AND s.model_version = ?", (chain.version,))[0][0]
    totals["patients rescored with v2 (once each)"] = sum(
        n == 1 and current == 1 for _, n, current in per_patient)
    totals["v2 SRs sent"] = v2_srs
    print_table([chain], [totals])
    assert totals["patients rescored with v2 (once each)"] == PATIENTS, per_patient
    assert len(per_patient) == PATIENTS, per_patient
    assert v2_srs >= PATIENTS, totals
