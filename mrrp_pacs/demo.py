"""``mrrp-pacs demo``: the main job end to end on a synthetic hospital, on this machine.

1. a phantom hospital (docs/phantom.md) is generated;
2. a private Orthanc starts on loopback and receives its images (C-STORE);
3. the daemon starts (storage SCP, MLLP listener, scheduler) and pulls the studies from
   Orthanc (C-FIND + C-MOVE) while the HL7 reports and pathology results arrive over MLLP;
4. the ultrasound encoder and the MRRP model are trained on the phantom's training split (a
   hospital would train on its own history) and the model is promoted;
5. the daemon scores every ready patient (compensating missing modalities) and stores an SR and
   a PDF per patient back in Orthanc;
6. the test split's C-index is compared with the phantom's oracle (each with its 95 %
   bootstrap interval, and only when the test split holds at least
   :data:`MIN_TEST_EVENTS` events); SRs, PDFs, plots and ``summary.json`` are copied into
   the output folder; everything started is stopped.

Without Orthanc the same pipeline runs in file-drop mode (files ingested directly, results kept
in the output folder only).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrrp_pacs.config import Config, load_config
from mrrp_pacs.errors import DemoError
from mrrp_pacs.store import Store

LOGGER = logging.getLogger(__name__)

DEMO_MARKER = ".mrrp-demo"
DEMO_AE = "MRRP"
PACS_AE = "ORTHANC"
WAIT_TIMEOUT_S = 1200
LOAD_ATTEMPTS = 3
MIN_TEST_EVENTS = 10  # fewer: a C-index too unstable to show (its CI spans most of [0, 1])
C_INDEX_RESAMPLES = 2000
# scores whose objects are all queued and sent
SENT_SCORES_SQL = ("SELECT COUNT(*) FROM scores s WHERE s.superseded_by IS NULL AND EXISTS "
                   "(SELECT 1 FROM exports e WHERE e.score_id = s.id) AND NOT EXISTS "
                   "(SELECT 1 FROM exports e WHERE e.score_id = s.id AND e.state != 'sent')")


@dataclass(frozen=True)
class DemoSettings:
    patients: int = 120
    seed: int = 1
    out_dir: Path = Path("demo-output")
    slide_px: int = 4096
    use_orthanc: bool = True  # False: file-drop mode even where Orthanc is installed


Progress = Callable[[str, int, int], None]  # (step, done, total)


def run_demo(settings: DemoSettings, say: Callable[[str], None],
             progress: Progress | None = None) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to ``summary.json``).

    Raises
    ------
    DemoError
        A step failed (the message names it) or the output folder is not the demo's.
    """
    from mrrp_pacs import private_orthanc
    from mrrp_pacs.phantom.generator import PhantomSpec, generate

    # absolute once: Orthanc takes relative paths against its configuration file's folder
    settings = dataclasses.replace(settings, out_dir=settings.out_dir.expanduser().absolute())
    out = _prepare(settings.out_dir)
    timings: dict[str, float] = {}
    step = _Steps(say, timings)
    tick = progress or (lambda *_: None)

    with step("phantom hospital", f"{settings.patients} patients, seed {settings.seed}"):
        phantom_dir = out / "phantom"
        generate(PhantomSpec(patients=settings.patients, seed=settings.seed,
                             slide_px=settings.slide_px), phantom_dir,
                 progress=lambda n: tick("phantom", n, settings.patients))
    dicom_files = sorted(p for p in (phantom_dir / "dicom").rglob("*") if p.is_file())
    hl7_files = sorted((phantom_dir / "hl7").glob("*.hl7"))
    use_orthanc = settings.use_orthanc and private_orthanc.installed()
    if settings.use_orthanc and not use_orthanc:
        say("Orthanc is not installed (apt-get install orthanc): running in file-drop mode, "
            "results are kept in the output folder only")
    ports = {name: private_orthanc.free_port() for name in ("dicom", "hl7", "http")}
    summary: dict[str, Any] = {"mode": "pacs" if use_orthanc else "file-drop"}
    with _maybe_orthanc(use_orthanc, out / "orthanc", ports["dicom"]) as orthanc:
        config = _config(out, ports, orthanc)
        if orthanc is not None:
            with step("PACS", f"{len(dicom_files)} DICOM objects into Orthanc (C-STORE)"):
                _load_pacs(orthanc, dicom_files, lambda n: tick("pacs", n, len(dicom_files)))
        summary.update(_run_hospital(config, orthanc, dicom_files, hl7_files, phantom_dir,
                                     settings, step, tick))
    summary["timings"] = {k: round(v, 1) for k, v in timings.items()}
    summary["database"] = str(config.paths.db_file)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _run_hospital(config: Config, orthanc: Any, dicom_files: list[Path], hl7_files: list[Path],
                  phantom_dir: Path, settings: DemoSettings, step: _Steps,
                  tick: Progress) -> dict[str, Any]:
    from exporters.mllp_client import send_files
    from listeners.file_drop import ingest_paths
    from mrrp_pacs.daemon import Daemon, Pipeline, components_from_config
    from mrrp_pacs.intake import Intake

    out = settings.out_dir
    components = components_from_config(config)
    daemon = Daemon(config, components) if orthanc is not None else None
    try:
        if daemon is not None:
            with step("daemon", "listeners up; pulling from Orthanc, HL7 over MLLP"):
                daemon.start()
                acks = send_files(hl7_files, "127.0.0.1", config.hl7.port, 60.0)
                refused = [a for _, a in acks if not a.accepted]
                if refused:
                    raise DemoError(f"{len(refused)} HL7 messages not accepted, e.g. "
                                    f"{refused[0].code or refused[0].error}")
                _wait_for(config, "every DICOM object pulled", "SELECT COUNT(*) FROM instances",
                          len(dicom_files), lambda n: tick("pull", n, len(dicom_files)))
        else:
            with (step("file drop", f"{len(dicom_files)} DICOM + {len(hl7_files)} HL7 files"),
                  Store(config.paths.db_file, config.paths.objects_dir) as store):
                ingest_paths(Intake(store, config), [phantom_dir / "dicom", phantom_dir / "hl7"])
        with step("training", "US encoder, features, MRRP on the training split"):
            model_label = _train(config, phantom_dir / "truth.csv", settings.seed,
                                 lambda n, total: tick("features", n, total))
        with Store(config.paths.db_file, config.paths.objects_dir) as store:
            ready = sum(_ready(store, config))
        if daemon is not None:
            with step("scoring", f"the daemon scores {ready} patients and stores SR + PDF"):
                _wait_for(config, "every ready patient scored",
                          "SELECT COUNT(DISTINCT patient_key) FROM scores", ready,
                          lambda n: tick("score", n, ready))
                # every current score has its objects queued, and none is left to send
                _wait_for(config, "every SR and PDF sent", SENT_SCORES_SQL, ready,
                          lambda n: tick("export", n, ready))
        else:
            with step("scoring", f"{ready} patients"):
                pipeline = Pipeline(config, exporter=components.exporter)
                try:
                    pipeline.process(progress=lambda n, total: tick("score", n, total))
                finally:
                    pipeline.close()
    finally:
        if daemon is not None:
            daemon.stop()
    with step("results", "evaluation, plots, copies of every SR and PDF"):
        results = _collect(config, phantom_dir / "truth.csv", out, orthanc, model_label)
    return results


# -- steps -----------------------------------------------------------------------------------

class _Steps:
    """Numbered, timed steps announced through ``say``."""

    def __init__(self, say: Callable[[str], None], timings: dict[str, float]) -> None:
        self.say = say
        self.timings = timings
        self.number = 0

    @contextmanager
    def __call__(self, name: str, detail: str) -> Iterator[None]:
        self.number += 1
        self.say(f"{self.number}. {name}: {detail}")
        started = time.perf_counter()
        yield
        self.timings[f"{name.replace(' ', '_')}_s"] = time.perf_counter() - started


def _prepare(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise DemoError(f"{out} is not empty and was not made by the demo: choose another "
                            "--out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("made by mrrp-pacs demo; replaced on every run\n")
    return out


@contextmanager
def _maybe_orthanc(wanted: bool, workdir: Path, our_port: int) -> Iterator[Any]:
    if not wanted:
        yield None
        return
    from mrrp_pacs.private_orthanc import running_orthanc

    # Orthanc stores what it is sent, answers our queries and moves studies to our SCP
    with running_orthanc(workdir, PACS_AE, modalities={
            DEMO_AE: [DEMO_AE, "127.0.0.1", our_port]},
            extra={"DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False}) as server:
        yield server


def _config(out: Path, ports: dict[str, int], orthanc: Any) -> Config:
    # the state folder holds database, objects, models and job store, as for every command:
    # `mrrp-pacs <command> --db <out>/state/mrrp.sqlite3` finds them all
    config = load_config(None, environ={}).with_db(out / "state" / "mrrp.sqlite3")
    config = config.replace("features", workers=os.cpu_count() or 1)
    config = config.replace("dicom", ae_title=DEMO_AE, port=ports["dicom"])
    config = config.replace("hl7", port=ports["hl7"])
    config = config.replace("http", port=0)
    # every phantom patient is complete or missing a modality for good: no wait
    config = config.replace("scoring", interval_s=3, wait_hours=0.0)
    if orthanc is not None:
        from mrrp_pacs.clock import system_clock
        from mrrp_pacs.phantom.generator import EARLIEST_STUDY_DATE

        # the puller queries study dates from today back: far enough for the phantom's oldest
        # study, counted from today so that the window never runs out
        window_days = (system_clock().astimezone().date() - EARLIEST_STUDY_DATE).days + 1
        config = config.replace("pacs", host="127.0.0.1", port=orthanc.dicom_port,
                                ae_title=PACS_AE, interval_s=3, window_days=window_days)
        config = config.replace("export", interval_s=3, backoff_s=2)
    else:
        config = config.replace("export", enabled=True)
    return config.check()


def _load_pacs(orthanc: Any, files: list[Path], tick: Callable[[int], None]) -> None:
    from exporters.dicom_sender import DicomSender
    from mrrp_pacs.errors import SendError

    sender = DicomSender("127.0.0.1", orthanc.dicom_port, PACS_AE, DEMO_AE, timeout_s=120)
    with sender.session() as session:
        for done, path in enumerate(files, 1):
            for attempt in range(1, LOAD_ATTEMPTS + 1):
                try:
                    session.send(path.read_bytes())
                    break
                except SendError as exc:
                    # a busy machine can lose a response: the next send opens a new association
                    if not exc.transient or attempt == LOAD_ATTEMPTS:
                        raise DemoError(f"Orthanc refused {path.name}: {exc}") from exc
                    LOGGER.warning("loading Orthanc: %s; sending again", exc)
            tick(done)


def _wait_for(config: Config, what: str, sql: str, expected: int,
              tick: Callable[[int], None]) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    with Store(config.paths.db_file, config.paths.objects_dir, migrate=False) as store:
        while True:
            found = int(store.conn.execute(sql).fetchone()[0])
            tick(found)
            if found >= expected:
                return
            if time.monotonic() > deadline:
                raise DemoError(f"timed out waiting for {what}: {found} of {expected} after "
                                f"{WAIT_TIMEOUT_S} s; see the log above")
            time.sleep(1.0)


def _ready(store: Store, config: Config) -> list[bool]:
    from mrrp_pacs.cases import case_inputs

    return [case.ready for case in case_inputs(store, config).values()]


def _train(config: Config, truth_csv: Path, seed: int,
           tick: Callable[[int, int], None]) -> str:
    from model_store import ModelStore
    from mrrp_pacs.features.pipeline import extract, lesion_crops
    from mrrp_pacs.features.us_encoder import US_ENCODER_KIND, save_us_encoder, train_us_encoder
    from mrrp_pacs.model.dataset import cohort_from_store, read_outcomes
    from mrrp_pacs.model.evaluate import evaluate_predictions
    from mrrp_pacs.model.train import MODEL_KIND, TrainSettings, config_for, predict, save, train

    models = ModelStore(config.paths.model_store_dir)
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        held_out = {pid for pid, row in read_outcomes(truth_csv).items() if row.split == "test"}
        crops, _ = lesion_crops(store, config, exclude=held_out)  # never the test patients
        if len(crops) < 8:
            raise DemoError(f"only {len(crops)} ultrasound lesions: use more --patients")
        encoder, history = train_us_encoder(crops, epochs=6, seed=seed)
        stored = save_us_encoder(models, encoder, history, {"source": "mrrp-pacs demo"},
                                 name=config.features.us_encoder)
        models.promote(US_ENCODER_KIND, config.features.us_encoder, stored.version)
        patients = len(_ready(store, config))
        done = 0

        def counted(n: int) -> None:
            nonlocal done
            done += n
            tick(done, patients)

        extract(store, config, tuple(config.features.families),
                workers=config.features.workers, progress=counted)
        cohort = cohort_from_store(store, config, read_outcomes(truth_csv))
    split = cohort.split
    fit = cohort.subset(np.flatnonzero(split != "test"))
    test = cohort.subset(np.flatnonzero(split == "test"))
    settings = TrainSettings(seed=seed)
    trained = train(fit, config_for(fit), settings)
    metrics = {"test": evaluate_predictions(test.time, test.event, predict(trained.model, test),
                                            fit.time, fit.event, trained.train_risk,
                                            seed=seed)}
    version = save(models, config.scoring.model, trained, fit, settings, metrics)
    models.promote(MODEL_KIND, config.scoring.model, version.version)
    return version.label


def _collect(config: Config, truth_csv: Path, out: Path, orthanc: Any,
             model_label: str) -> dict[str, Any]:
    from exporters.sr import SERIES_DESCRIPTION
    from mrrp_pacs.cases import case_inputs
    from mrrp_pacs.results import RiskResult

    with truth_csv.open() as handle:
        truth = {row["patient_id"]: row for row in csv.DictReader(handle)}
    reports = out / "reports"
    reports.mkdir()
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        inputs = case_inputs(store, config)
        results = [RiskResult.from_json(text) for (text,) in store.conn.execute(
            "SELECT outputs FROM scores WHERE superseded_by IS NULL")]
        for export_id, kind, sha in store.conn.execute(
                "SELECT id, kind, object_sha256 FROM exports ORDER BY id"):
            shutil.copyfile(store.objects.path_for(sha), reports / f"{kind}-{export_id:04d}.dcm")
        example = _example_pdf(store, reports)
        (srs_queued,) = store.conn.execute(
            "SELECT COUNT(*) FROM exports WHERE kind = 'sr'").fetchone()
    test = [r for r in results if truth[inputs[r.patient_key].patient_id]["split"] == "test"]
    rows = [truth[inputs[r.patient_key].patient_id] for r in test]
    months = np.array([float(row["time_months"]) for row in rows])
    recurred = np.array([row["event"] == "1" for row in rows], dtype=bool)
    test_c = held_out_c_index(months, recurred, np.array([r.risk for r in test]))
    oracle = held_out_c_index(months, recurred,
                              np.array([float(row["true_log_hazard"]) for row in rows]))
    _evaluation_plots(config, truth_csv, out / "evaluation", model_label)
    srs_stored = 0
    if orthanc is not None:
        # one model in the demo: each SR series holds one SR
        srs_stored = _count_series(orthanc, SERIES_DESCRIPTION)
    return {
        "received": len(inputs),
        "scored": len(results),
        "compensated": sum(bool(r.compensated) for r in results),
        "srs_stored": srs_stored,
        "srs_queued": srs_queued,
        "test_patients": len(test),
        "test_events": int(recurred.sum()),
        "test_c_index": test_c.value,
        "test_c_index_ci95": test_c.ci95,
        "oracle_c_index": oracle.value,
        "oracle_c_index_ci95": oracle.ci95,
        "model": model_label,
        "reports": str(reports),
        "example_pdf": str(example) if example else None,
    }


@dataclass(frozen=True)
class CIndex:
    """A test-split C-index as the demo reports it.

    Attributes
    ----------
    value, ci95
        Harrell's C (4 decimals) and its 95 % percentile bootstrap interval; None when there
        are fewer than :data:`MIN_TEST_EVENTS` events or the C-index is undefined.
    events
        Events in the test split.
    """

    value: float | None
    ci95: list[float] | None
    events: int


def held_out_c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray, *,
                 n_resamples: int = C_INDEX_RESAMPLES, seed: int = 0) -> CIndex:
    """Harrell's C of ``risk`` (higher = worse) with its 95 % bootstrap interval, computed only
    when the patients hold at least :data:`MIN_TEST_EVENTS` events."""
    from mrrp_pacs.errors import MetricUndefined
    from mrrp_pacs.model.evaluate import bootstrap_ci, harrell_c

    events = int(np.asarray(event, dtype=bool).sum())
    if events < MIN_TEST_EVENTS:
        return CIndex(None, None, events)
    try:
        value = harrell_c(time, event, risk)
        low, high = bootstrap_ci(harrell_c, time, event, risk, n_resamples=n_resamples,
                                 seed=seed)
    except MetricUndefined:
        return CIndex(None, None, events)
    return CIndex(round(value, 4), [round(low, 4), round(high, 4)], events)


def c_index_text(value: float | None, ci95: list[float] | None, events: int) -> str:
    """The demo's line for a test-split C-index: the value with its 95 % CI when it rests on at
    least :data:`MIN_TEST_EVENTS` events, otherwise why none is shown."""
    if events < MIN_TEST_EVENTS:
        return f"C-index not shown: {events} test events (< {MIN_TEST_EVENTS})"
    if value is None:
        return f"C-index undefined on the {events} test events (no comparable pair)"
    if ci95 is None:
        return f"{value:.3f} (95% CI not available; {events} test events)"
    return f"{value:.3f} (95% CI {ci95[0]:.3f}-{ci95[1]:.3f}; {events} test events)"


def _evaluation_plots(config: Config, truth_csv: Path, folder: Path, model_label: str) -> None:
    """Metrics and plots (Kaplan-Meier by group, td-AUC, calibration, decision curve) on the
    test split."""
    from model_store import ModelStore
    from mrrp_pacs.model.assessment import assess_stored
    from mrrp_pacs.model.dataset import cohort_from_store, read_outcomes
    from mrrp_pacs.model.train import MODEL_KIND

    outcomes = {pid: o for pid, o in read_outcomes(truth_csv).items() if o.split == "test"}
    name, _, version = model_label.partition("@")
    stored = ModelStore(config.paths.model_store_dir).load(MODEL_KIND, name.split("/")[-1],
                                                           version)
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        cohort = cohort_from_store(store, config, outcomes)
    folder.mkdir()
    assess_stored(stored, cohort, folder, n_resamples=500)


def _example_pdf(store: Store, reports: Path) -> Path | None:
    import pydicom

    row = store.conn.execute("SELECT object_sha256 FROM exports WHERE kind = 'pdf' "
                             "ORDER BY id LIMIT 1").fetchone()
    if row is None:
        return None
    document = pydicom.dcmread(store.objects.path_for(row[0]))
    data = bytes(document.EncapsulatedDocument)[: int(document.EncapsulatedDocumentLength)]
    path = reports / "example.pdf"
    path.write_bytes(data)
    return path


def _count_series(orthanc: Any, description: str) -> int:
    """Series with ``description`` in Orthanc, found by C-FIND."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelFind as Find,
    )

    ae = AE(ae_title=DEMO_AE)
    ae.add_requested_context(Find)
    assoc = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=PACS_AE)
    if not assoc.is_established:
        raise DemoError("Orthanc refused the C-FIND association")
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = ""
        query.SeriesInstanceUID = ""
        query.SeriesDescription = description
        found = sum(1 for status, answer in assoc.send_c_find(query, Find)
                    if status and status.Status in (0xFF00, 0xFF01) and answer is not None)
    finally:
        assoc.release()
    return found
