"""Scoring: readiness, and stored risk results from a model trained on a small phantom."""

import csv
import dataclasses
import json
from datetime import timedelta

import pytest
from builders import Patient, encode, pathology_result, us_image
from click.testing import CliRunner
from clocks import START, SteppingClock
from phantoms import extracted_phantom

from model_store import ModelStore
from mrrp_pacs.cases import CaseInputs, ClinicalValue, InstanceRef, case_inputs
from mrrp_pacs.cli import main
from mrrp_pacs.config import load_config
from mrrp_pacs.daemon import Pipeline
from mrrp_pacs.model.train import MODEL_KIND
from mrrp_pacs.phantom.generator import PhantomSpec
from mrrp_pacs.results import RiskResult
from mrrp_pacs.scoring import (
    INCOMPLETE,
    READY,
    WAITING,
    Scorer,
    arrivals_digest,
    due_cases,
    readiness,
    wait_started,
)
from mrrp_pacs.store import Store

# enough ultrasound crops to train the US encoder, and some patients without each modality
SPEC = PhantomSpec(patients=16, seed=4, slide_px=1024, missing_wsi=0.2, missing_us=0.2,
                   missing_report=0.3)
NOW = START + timedelta(hours=2)  # the phantom is ingested at START
WAIT = timedelta(hours=72)


def _case(slide: bool, us: bool, clinical: bool) -> CaseInputs:
    ref = InstanceRef(1, "1.2.3", "1.2", "ab" * 32)
    return CaseInputs(
        "P1^^^H", "P1", "H",
        slides={"1.2": [ref]} if slide else {},
        us_images=[InstanceRef(2, "1.2.4", "1.3", "cd" * 32)] if us else [],
        clinical={"age": ClinicalValue(7, "55", 55.0, "a")} if clinical else {})


def test_a_case_scored_before_stays_ready_whatever_the_wait():
    found = readiness(_case(True, False, True), NOW, NOW, WAIT, scored=True)
    assert (found.state, found.compensating) == (READY, ("us",))
    assert readiness(_case(True, False, False), NOW, NOW, WAIT, scored=True).state == INCOMPLETE


@pytest.mark.parametrize(("slide", "us", "clinical", "age_h", "state", "compensating"), [
    (True, True, True, 0, READY, ()),
    (True, False, True, 1, WAITING, ("us",)),
    (True, False, True, 72, READY, ("us",)),
    (False, True, True, 80, READY, ("wsi",)),
    (True, True, False, 100, INCOMPLETE, ()),
    (False, False, True, 100, INCOMPLETE, ()),
])
def test_readiness_waits_for_a_missing_modality_then_compensates(
        slide, us, clinical, age_h, state, compensating):
    found = readiness(_case(slide, us, clinical), NOW - timedelta(hours=age_h), NOW, WAIT)
    assert found.state == state
    if state != INCOMPLETE:
        assert found.compensating == compensating


def test_arrivals_digest_changes_only_with_what_arrived():
    case = _case(True, False, True)
    before = arrivals_digest(case)
    assert arrivals_digest(_case(True, False, True)) == before
    case.us_images.append(InstanceRef(9, "1.2.9", "1.9", "ef" * 32))
    assert arrivals_digest(case) != before


def _receive_us_only(intake, clock, at):
    """One patient with an ultrasound image and final clinical values (no slide), received at
    ``at`` by the store's clock."""
    clock.set(at)
    patient = Patient("SKEW1")
    intake.receive_dicom(encode(us_image(patient)), "t")
    intake.receive_hl7(pathology_result(patient, "PA-SKEW1"), "t")


def _state_at(store, config, now):
    (case,) = case_inputs(store, config).values()
    return readiness(case, wait_started(store, case, now), now, WAIT).state


def test_an_image_stamped_ahead_of_the_clock_waits_the_window_from_first_sight(
        intake, store, config, clock):
    # the host clock ran a year fast when the image arrived, then was stepped back
    _receive_us_only(intake, clock, START + timedelta(days=365))
    assert _state_at(store, config, START) == WAITING  # not scored early...
    assert _state_at(store, config, START + WAIT - timedelta(seconds=1)) == WAITING
    # ...and not kept waiting for the year of the step: the window runs from first sight
    assert _state_at(store, config, START + WAIT) == READY


def test_a_sighting_stamped_ahead_of_the_clock_is_taken_back_to_now(intake, store, config,
                                                                    clock):
    _receive_us_only(intake, clock, START + timedelta(days=30))
    assert _state_at(store, config, START + timedelta(days=30)) == WAITING  # sighting stored
    # the clock is stepped back 30 days: both stamps lie ahead, the window restarts now
    assert _state_at(store, config, START) == WAITING
    seen = store.conn.execute("SELECT seen_at FROM case_waits").fetchone()[0]
    assert seen == "2031-03-09T09:30:00Z"
    assert _state_at(store, config, START + WAIT) == READY


def test_read_only_callers_record_no_sighting(intake, store, config, clock):
    _receive_us_only(intake, clock, START)
    (case,) = case_inputs(store, config).values()
    assert wait_started(store, case, START + timedelta(hours=1), record=False) == START
    assert store.conn.execute("SELECT COUNT(*) FROM case_waits").fetchone()[0] == 0


@pytest.fixture(scope="module")
def phantom_model(tmp_path_factory):
    """A small phantom, extracted, with a model trained for a few epochs."""
    root = tmp_path_factory.mktemp("scoring")
    db, env, _ = extracted_phantom(root, SPEC, max_tiles=4, clock=SteppingClock(START))
    with (root / "phantom" / "truth.csv").open() as handle:
        truth = {row["patient_id"]: row for row in csv.DictReader(handle)}
    outcomes = root / "outcomes.csv"
    with outcomes.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["patient_id", "time_months", "event"])
        for pid, row in truth.items():
            writer.writerow([pid, row["time_months"], row["event"]])
    trained = CliRunner().invoke(main, ["train", *db, "--outcomes", str(outcomes),
                                        "--max-epochs", "3", "--json"], env=env)
    assert trained.exit_code == 0, trained.output
    config = load_config(None, environ=env).with_db(root / "state" / "db.sqlite3")
    return config, truth, root, env, db, outcomes


def test_scores_are_stored_once_per_model_and_inputs(phantom_model):
    config, truth, *_ = phantom_model
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        scorer = Scorer(store, config, ModelStore(config.paths.model_store_dir))
        due, digests, run = due_cases(store, config, scorer, NOW, timedelta(0))
        assert run.incomplete == 0 and run.waiting == 0
        assert set(due) == set(case_inputs(store, config))
        outcomes = scorer.score(due, digests)
        assert [o.state for o in outcomes] == ["scored"] * len(due)
        manifest = scorer.version.manifest
        for outcome in outcomes:
            row = store.conn.execute("SELECT outputs FROM scores WHERE id = ?",
                                     (outcome.score_id,)).fetchone()
            result = RiskResult.from_json(row[0])
            assert result == outcome.result
            pid = due[result.patient_key].patient_id
            expected_missing = [m for m, flag in (("wsi", "has_wsi"), ("us", "has_us"))
                                if truth[pid][flag] != "1"]
            assert result.compensated == expected_missing
            assert set(result.modalities_used) == {"wsi", "us", "clinical"} - set(
                expected_missing)
            probabilities = [result.rfs_probability[h] for h in ("36", "60", "84")]
            assert 1 >= probabilities[0] >= probabilities[1] >= probabilities[2] >= 0
            assert 0 <= result.percentile <= 100
            assert result.group == ("high" if result.risk > manifest["risk_cutoff"] else "low")
            assert abs(sum(w for _, w in result.clinical_attention) - 1) < 1e-3
            roles = {e.role for e in result.evidence}
            assert ("wsi" in roles) == ("wsi" not in expected_missing)
            assert ("us_image" in roles) == ("us" not in expected_missing)
            if "us" in expected_missing:
                assert result.us_region is None
            else:
                assert result.us_region is not None
                x0, y0, x1, y1 = result.us_region.box_px
                assert x1 > x0 and y1 > y0
                # the phantom's ROI SR holds a traced outline: features describe the outline
                assert (result.us_region.source, result.us_region.roi_shape) == ("sr",
                                                                                 "outline")
                assert result.us_region.frame is not None and result.us_region.frame >= 1
                assert result.us_region.sop_instance_uid in {
                    e.sop_instance_uid for e in result.evidence if e.role == "us_image"}
        # same model, same inputs: nothing new, nothing due
        again = scorer.score(due, digests)
        assert [o.state for o in again] == ["unchanged"] * len(due)
        assert store.conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0] == len(due)
        # one audit row per score (none for "unchanged"), naming model version and patient
        scored = store.conn.execute("SELECT who, what, patient_key FROM audit WHERE event = "
                                    "'scored' ORDER BY id").fetchall()
        assert [tuple(r) for r in scored] == [
            (f"model:{scorer.model_version}", f"score:{o.score_id}", o.patient_key)
            for o in outcomes]
        assert not due_cases(store, config, scorer, NOW, timedelta(0))[0]
        # nightly rescoring looks at everyone and still writes nothing
        everyone = due_cases(store, config, scorer, NOW, timedelta(0), everyone=True)[0]
        assert [o.state for o in scorer.score(everyone)] == ["unchanged"] * len(due)


def test_pipeline_waits_then_compensates_and_rescores_with_a_new_model(phantom_model):
    config, truth, _, env, db, outcomes = phantom_model
    incomplete = sum(row["has_wsi"] != "1" or row["has_us"] != "1" for row in truth.values())
    assert 0 < incomplete < len(truth)
    clock = SteppingClock(NOW)
    pipeline = Pipeline(config, clock=clock)
    try:
        with pipeline.store.transaction() as conn:  # forget the previous test's scores
            conn.execute("DELETE FROM scores")
            conn.execute("DELETE FROM case_waits")
        first = pipeline.process()
        assert (first.scored, first.waiting) == (len(truth) - incomplete, incomplete)
        assert first.failed == 0
        clock.set(START + timedelta(hours=config.scoring.wait_hours) - timedelta(seconds=1))
        assert pipeline.process().waiting == incomplete  # not a second early
        clock.advance(seconds=1)
        waited = pipeline.process()
        assert (waited.scored, waited.waiting) == (incomplete, 0)
        retrained = CliRunner().invoke(main, ["train", *db, "--outcomes", str(outcomes),
                                              "--max-epochs", "2", "--seed", "1"], env=env)
        assert retrained.exit_code == 0, retrained.output
        second = pipeline.process()
        assert second.scored == len(truth)
        assert pipeline.process().due == 0
        rows = pipeline.store.conn.execute(
            "SELECT patient_key, COUNT(*), SUM(superseded_by IS NULL) FROM scores "
            "GROUP BY patient_key").fetchall()
        assert len(rows) == len(truth)
        assert all(total == 2 and current == 1 for _, total, current in rows)
        jobs = pipeline.store.conn.execute(
            "SELECT kind, state, detail FROM jobs ORDER BY id").fetchall()
        assert [(k, s) for k, s, _ in jobs] == [("process", "done")] * 5
        promoted = ModelStore(config.paths.model_store_dir).promoted("mrrp", "mrrp")
        assert promoted and json.loads(jobs[3][2])["model"].endswith(promoted)
    finally:
        pipeline.close()


def test_a_stopping_pipeline_scores_nobody_and_says_so(phantom_model):
    config, *_ = phantom_model
    pipeline = Pipeline(config, clock=SteppingClock(NOW))
    try:
        pipeline.stopping.set()
        detail = pipeline.process(everyone=True)
        assert detail.stopped is True and detail.scored + detail.unchanged == 0
        state = pipeline.store.conn.execute(
            "SELECT state FROM jobs ORDER BY id DESC LIMIT 1").fetchone()[0]
        assert state == "interrupted"
    finally:
        pipeline.close()


def test_rescore_with_db_finds_the_model_beside_the_database_and_writes_nothing_new(
        phantom_model, tmp_path, monkeypatch):
    """One rule for state: `--db FILE` makes FILE's folder the state folder, so the model
    trained with `--db` is found there by `rescore --db` from any current folder."""
    _, truth, root, env, db, _ = phantom_model
    assert "MRRP__PATHS__MODEL_STORE" not in env
    models = root / "state" / "models"
    assert ModelStore(models).promoted("mrrp", "mrrp")
    monkeypatch.chdir(tmp_path)  # a folder with no state in it
    runs = []
    for _ in range(2):  # the first run scores what earlier tests left unscored, if anything
        # the default 72 h wait: cases scored before without a modality stay ready
        result = CliRunner().invoke(main, ["rescore", *db, "--json"], env=env)
        assert result.exit_code == 0, result.output
        runs.append(json.loads(result.stdout))
    first, second = runs
    assert first["model"].endswith(ModelStore(models).promoted("mrrp", "mrrp"))
    assert first["scored"] + first["unchanged"] == len(truth)
    assert (second["due"], second["unchanged"], second["scored"]) == (len(truth),) * 2 + (0,)
    assert second["failed"] == second["waiting"] == second["incomplete"] == 0
    assert not any(second["queued"].values())  # no new SR or PDF
    assert list(tmp_path.iterdir()) == []


@pytest.mark.clock_free
def test_a_patient_that_breaks_or_overfills_its_worker_costs_that_patient_only(
        phantom_model, monkeypatch):
    """Extraction raising for one patient, going over the worker's memory limit for another
    and killing its worker for a third (fault points, mrrp_pacs/faults.py; the allocation is
    real and the limit is enforced by reading the worker's resident memory): everyone else is
    scored in the same run; two are retried after the backoff, then quarantined, shown by `cases`,
    /metrics and `doctor`, and scored once released."""
    from mrrp_pacs.doctor import run_checks
    from mrrp_pacs.health import metrics_text
    from mrrp_pacs.quarantine import failures

    config, _, _, env, db, _ = phantom_model
    config = config.replace("scoring", wait_hours=0.0, worker_memory_mb=1500,
                            max_failures=2, retry_backoff_s=600)
    clock = SteppingClock(NOW)
    pipeline = Pipeline(config, clock=clock)
    try:
        with pipeline.store.transaction() as conn:  # forget the other tests' scores
            conn.execute("DELETE FROM exports")
            conn.execute("DELETE FROM scores")
            conn.execute("DELETE FROM case_waits")
        ready = [key for key, case in case_inputs(pipeline.store, config).items()
                 if case.clinical and (case.slides or case.us_images)]
        raising, hog, killed = ready[0], ready[1], ready[2]
        monkeypatch.setenv("MRRP_FAULTS", f"extract@{raising}=raise,extract@{hog}=alloc:2500,"
                                          f"extract@{killed}=kill")
        first = pipeline.process()
        assert (first.scored, first.errors) == (len(ready) - 3, 3)
        held = failures(pipeline.store)
        assert set(held) == {raising, hog, killed}
        assert "InjectedFault" in held[raising].last_error
        assert "memory limit of 1500 MiB" in held[hog].last_error
        assert "killed by SIGKILL" in held[killed].last_error
        with pipeline.store.transaction() as conn:  # the crash is tested; go on with two
            conn.execute("DELETE FROM patient_failures WHERE patient_key = ?", (killed,))
        monkeypatch.setenv("MRRP_FAULTS", f"extract@{raising}=raise,extract@{hog}=alloc:2500")
        pipeline.close()
        pipeline = Pipeline(config, clock=clock)
        assert pipeline.process().scored == 1  # the killed one, now without its fault
        assert pipeline.store.conn.execute(
            "SELECT COUNT(*) FROM scores WHERE patient_key IN (?, ?)", (raising, hog)
        ).fetchone()[0] == 0
        # not tried again before the backoff, tried after it, then quarantined
        early = pipeline.process()
        assert (early.deferred, early.errors, early.scored) == (2, 0, 0)
        clock.advance(seconds=601)
        again = pipeline.process()
        assert (again.errors, again.scored) == (2, 0)
        assert all(f.quarantined_at is not None for f in failures(pipeline.store).values())
        clock.advance(hours=48)
        assert pipeline.process().quarantined == 2
        metrics = metrics_text(pipeline.store)
        assert 'mrrp_patients_failing{state="quarantined"} 2' in metrics
    finally:
        pipeline.close()
    doctor = {c.name: c for c in run_checks(config, check_ports=False)}
    assert doctor["failed patients"].warning and "2 quarantined" in doctor["failed patients"].detail
    listed = CliRunner().invoke(main, ["cases", *db], env=env)
    assert listed.exit_code == 0, listed.output
    assert sum("quarantined after 2 failures" in line for line in listed.output.splitlines()) == 2
    monkeypatch.delenv("MRRP_FAULTS")
    released = CliRunner().invoke(main, ["cases", *db, "--release", raising, "--release", hog],
                                  env=env)
    assert released.exit_code == 0, released.output
    pipeline = Pipeline(config, clock=clock)
    try:
        assert pipeline.process().scored == 2
        assert not failures(pipeline.store)
    finally:
        pipeline.close()


@pytest.mark.clock_free
def test_stopping_kills_the_worker_and_counts_no_failure(phantom_model, monkeypatch):
    """The daemon's stop kills a worker stuck in a patient (every extraction hangs 10 min
    here): the run ends as stopped within seconds, and nobody is recorded as failed."""
    import threading
    import time

    from mrrp_pacs.quarantine import failures

    config, *_ = phantom_model
    monkeypatch.setenv("MRRP_FAULTS", "extract=sleep:600")
    pipeline = Pipeline(config.replace("scoring", wait_hours=0.0), clock=SteppingClock(NOW))
    found = {}
    runner = threading.Thread(target=lambda: found.update(run=pipeline.process(everyone=True)))
    try:
        runner.start()
        deadline = time.monotonic() + 120
        while pipeline._worker is None or not pipeline._worker.started:
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.2)
        time.sleep(1.0)
        pipeline.stopping.set()
        pipeline.abort_extraction()
        runner.join(60)
        assert not runner.is_alive(), "the run did not stop"
        assert found["run"].stopped and found["run"].errors == 0
        assert not failures(pipeline.store)
    finally:
        pipeline.stopping.set()
        pipeline.abort_extraction()
        runner.join(60)
        pipeline.close()


def test_a_promotion_during_a_run_takes_effect_at_the_next_run_never_between_patients(
        phantom_model):
    """The run reads the promoted version once, at its start: a model promoted while it
    scores (here, right after its first patient) scores nobody in that run."""
    config, truth, _, env, db, outcomes = phantom_model
    models = ModelStore(config.paths.model_store_dir)
    before = models.promoted("mrrp", "mrrp")
    trained = CliRunner().invoke(main, ["train", *db, "--outcomes", str(outcomes),
                                        "--max-epochs", "2", "--seed", "7", "--no-promote"],
                                 env=env)
    assert trained.exit_code == 0, trained.output
    newer = next(v for v in reversed(models.versions("mrrp", "mrrp")) if v != before)
    models.promote("mrrp", "mrrp", newer)  # every patient is due: no score of this one yet
    # every case ready (the wait for a missing modality is over)
    pipeline = Pipeline(config, clock=SteppingClock(
        START + timedelta(hours=config.scoring.wait_hours)))
    promoted_after: list[int] = []

    def promote_back_after_the_first(done: int, total: int) -> None:
        if done == 1:
            models.promote("mrrp", "mrrp", before)
            promoted_after.append(total)

    try:
        last = pipeline.store.conn.execute("SELECT COALESCE(MAX(id), 0) FROM scores").fetchone()
        during = pipeline.process(progress=promote_back_after_the_first)
        assert promoted_after == [len(truth)] and during.due == during.scored == len(truth)
        assert during.model.endswith(newer)
        versions = [tuple(row) for row in pipeline.store.conn.execute(
            "SELECT model_version, COUNT(*) FROM scores WHERE id > ? GROUP BY model_version",
            last)]
        assert versions == [(newer, len(truth))]
        assert pipeline.process().model.endswith(before)  # the next run: the promoted one
    finally:
        pipeline.close()
        models.promote("mrrp", "mrrp", before)


def test_a_rolled_back_model_makes_its_scores_current_again(phantom_model):
    """v1 → v2 → v1: v1's rows (unique per model and inputs) become current again, with their
    revision raised and outcome ``scored`` so that they are published anew; before, they were
    found "unchanged" while superseded, and v2's scores stayed current for good."""
    config, _, _, env, db, outcomes = phantom_model
    models = ModelStore(config.paths.model_store_dir)
    if len(models.versions(MODEL_KIND, "mrrp")) < 2:  # this test run alone
        retrained = CliRunner().invoke(main, ["train", *db, "--outcomes", str(outcomes),
                                              "--max-epochs", "1", "--seed", "2"], env=env)
        assert retrained.exit_code == 0, retrained.output
    v1, v2 = models.versions(MODEL_KIND, "mrrp")[:2]
    clock = SteppingClock(NOW)
    with Store(config.paths.db_file, config.paths.objects_dir, clock=clock) as store:
        with store.transaction() as conn:  # forget the previous tests' scores and exports
            conn.execute("DELETE FROM exports")
            conn.execute("DELETE FROM scores")

        def run(version: str, everyone: bool = False) -> list:
            scorer = Scorer(store, config, models, version=version)
            due, digests, _ = due_cases(store, config, scorer, clock(), timedelta(0), everyone)
            clock.advance(hours=1)
            return scorer.score(due, digests)

        first = run(v1)
        assert first and {o.state for o in first} == {"scored"}
        assert {o.state for o in run(v2)} == {"scored"}
        back = run(v1)
        assert [(o.patient_key, o.state, o.score_id) for o in back] == [
            (o.patient_key, "scored", o.score_id) for o in first]
        for before, after in zip(first, back, strict=True):
            assert after.result == dataclasses.replace(before.result,
                                                       scored_at=after.result.scored_at)
            assert after.result.scored_at > before.result.scored_at
        rows = store.conn.execute(
            "SELECT model_version, superseded_by IS NULL, revision, COUNT(*) FROM scores "
            "GROUP BY 1, 2, 3 ORDER BY 1").fetchall()
        assert sorted(tuple(r) for r in rows) == sorted(
            [(v1, 1, 1, len(first)), (v2, 0, 0, len(first))])
        assert run(v1) == []  # nothing due any more
        assert {o.state for o in run(v1, everyone=True)} == {"unchanged"}  # nothing twice
        stored = {row[0]: RiskResult.from_json(row[1]) for row in store.conn.execute(
            "SELECT id, outputs FROM scores WHERE superseded_by IS NULL")}
        assert stored == {o.score_id: o.result for o in back}


@pytest.mark.clock_free
def test_a_worker_that_cannot_start_fails_the_run_not_the_patients(phantom_model):
    """A memory limit below what loading torch and the encoders takes: the worker never
    starts, so every patient would fail alike. The job fails and says why; nobody is
    recorded as failed or quarantined."""
    from mrrp_pacs.quarantine import failures
    from mrrp_pacs.workers import WorkerUnavailable

    config, *_ = phantom_model
    pipeline = Pipeline(config.replace("scoring", wait_hours=0.0, worker_memory_mb=40),
                        clock=SteppingClock(NOW))
    try:
        with pytest.raises(WorkerUnavailable, match="memory limit of 40 MiB while starting"):
            pipeline.process(everyone=True)
        assert not failures(pipeline.store)
        state, error = pipeline.store.conn.execute(
            "SELECT state, error FROM jobs ORDER BY id DESC LIMIT 1").fetchone()
        assert state == "failed" and "did not start" in error
    finally:
        pipeline.close()
