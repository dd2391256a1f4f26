"""A real ``mrrp-pacs serve`` in a subprocess against a private Orthanc: what the end-to-end
test and the reliability harness (tests/reliability) share: the model trained on a phantom's
history, the daemon's config, starting it, waiting on its database, and C-FIND in Orthanc."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

from orthanc import LOOPBACK
from phantoms import extracted_phantom
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from mrrp_pacs.phantom.generator import EARLIEST_STUDY_DATE, PhantomSpec

MRRP = [sys.executable, "-m", "mrrp_pacs"]
# the history a model is trained on (tests/conftest.py ``trained_phantom``)
TRAINING = PhantomSpec(patients=16, seed=4, slide_px=1024, missing_wsi=0.2, missing_us=0.2,
                       missing_report=0.2)
# the puller queries study dates from today back: far enough for the phantom's oldest study,
# counted from the day the test runs, so the window never runs out
PHANTOM_WINDOW_DAYS = (date.today() - EARLIEST_STUDY_DATE).days + 1


def train_on_phantom(root: Path, spec: PhantomSpec, max_epochs: int = 3) -> tuple[Path, Path]:
    """A phantom's folder, and the model store a model was trained into on it (file-drop
    ingest into a separate database, as a hospital trains on its own history)."""
    db, env, _ = extracted_phantom(root / "training", spec, max_tiles=4)
    truth = root / "training" / "phantom" / "truth.csv"
    outcomes = root / "outcomes.csv"
    with truth.open() as source, outcomes.open("w", newline="") as target:
        writer = csv.writer(target)
        writer.writerow(["patient_id", "time_months", "event", "split"])
        for row in csv.DictReader(source):
            writer.writerow([row["patient_id"], row["time_months"], row["event"], row["split"]])
    trained = subprocess.run([*MRRP, "train", *db, "--outcomes", str(outcomes),
                              "--max-epochs", str(max_epochs)], env={**os.environ, **env},
                             capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    return root / "training" / "phantom", Path(db[1]).parent / "models"


def daemon_config(root: Path, models: str, ports: dict[str, int], pacs_port: int,
                  allowed_aes: tuple[str, ...] = (),
                  settings: dict[str, dict[str, object]] | None = None) -> Path:
    """A config for a daemon in ``root / 'daemon'`` that pulls from and exports to the
    Orthanc at ``pacs_port``, every job every 2 s, no wait for a second modality;
    ``allowed_aes`` the senders besides the PACS, ``settings`` further keys by section."""
    sections: dict[str, dict[str, object]] = {
        "paths": {"data_dir": str(root / "daemon"), "model_store": models},
        "features": {"max_tiles": 4},
        "dicom": {"port": ports["dicom"], "allowed_aes": list(allowed_aes)},
        "hl7": {"port": ports["hl7"]},
        "http": {"port": ports["http"]},
        "pacs": {"host": LOOPBACK, "port": pacs_port, "ae_title": "ORTHANC", "interval_s": 2,
                 "window_days": PHANTOM_WINDOW_DAYS},
        "scoring": {"interval_s": 2, "wait_hours": 0},
        "export": {"interval_s": 2, "backoff_s": 1, "uid_secret": "test-site-secret"},
    }
    for section, values in (settings or {}).items():
        sections.setdefault(section, {}).update(values)
    path = root / "mrrp.toml"
    path.write_text("".join(
        f"[{section}]\n" + "".join(f"{key} = {json.dumps(value)}\n"
                                    for key, value in values.items())
        for section, values in sections.items()))
    return path


def serve(config: Path, log: Path, env: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    """``mrrp-pacs serve`` with ``config``, its output appended to ``log``."""
    return subprocess.Popen([*MRRP, "--config", str(config), "serve"],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float,
             process: subprocess.Popen[bytes] | None, log: Path) -> None:
    """Poll ``condition`` until true; fail naming ``what`` on timeout or if ``process`` exits."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process is None or process.poll() is None, \
            f"daemon exited while waiting for {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, \
            f"timed out waiting for {what}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def query(db: Path, sql: str, args: tuple[object, ...] = ()) -> list[tuple]:
    """Rows of ``sql`` in the daemon's database; [] while it does not exist or is unmigrated."""
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=30) as conn:
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # not migrated yet
            return []


def find_series(port: int) -> list[Dataset]:
    """C-FIND (study root, SERIES level) for every series in Orthanc."""
    return _find(port, "SERIES", {"SeriesDescription": "", "Modality": "",
                                  "NumberOfSeriesRelatedInstances": ""})


def find_instances(port: int) -> list[Dataset]:
    """C-FIND (study root, IMAGE level) for every instance in Orthanc, with its series'
    description."""
    found = []
    series = {str(s.SeriesInstanceUID): s for s in find_series(port)}
    ae = AE(ae_title="MRRP")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(LOOPBACK, port, ae_title="ORTHANC")
    assert assoc.is_established, "Orthanc refused the C-FIND association"
    try:
        for uid, one in series.items():
            request = Dataset()
            request.QueryRetrieveLevel = "IMAGE"
            request.StudyInstanceUID = one.StudyInstanceUID
            request.SeriesInstanceUID = uid
            request.SOPInstanceUID = ""
            for status, answer in assoc.send_c_find(
                    request, StudyRootQueryRetrieveInformationModelFind):
                if status and status.Status in (0xFF00, 0xFF01) and answer is not None:
                    answer.SeriesDescription = one.get("SeriesDescription", "")
                    found.append(answer)
    finally:
        assoc.release()
    return found


def _find(port: int, level: str, keys: dict[str, str]) -> list[Dataset]:
    ae = AE(ae_title="MRRP")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    found: list[Dataset] = []
    assoc = ae.associate(LOOPBACK, port, ae_title="ORTHANC")
    assert assoc.is_established, "Orthanc refused the C-FIND association"
    try:
        for study_uid in _study_uids(assoc):
            request = Dataset()
            request.QueryRetrieveLevel = level
            request.StudyInstanceUID = study_uid
            request.SeriesInstanceUID = ""
            for key, value in keys.items():
                setattr(request, key, value)
            for status, answer in assoc.send_c_find(
                    request, StudyRootQueryRetrieveInformationModelFind):
                if status and status.Status in (0xFF00, 0xFF01) and answer is not None:
                    found.append(answer)
    finally:
        assoc.release()
    return found


def _study_uids(assoc) -> list[str]:
    request = Dataset()
    request.QueryRetrieveLevel = "STUDY"
    request.StudyInstanceUID = ""
    uids = []
    for status, answer in assoc.send_c_find(request, StudyRootQueryRetrieveInformationModelFind):
        if status and status.Status in (0xFF00, 0xFF01) and answer is not None:
            uids.append(str(answer.StudyInstanceUID))
    return uids
