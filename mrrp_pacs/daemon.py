"""The always-on daemon: listeners in, scheduled jobs through the pipeline, results out.

Jobs (APScheduler, persistent job store). Two executors of one thread each, each with its own
:class:`Pipeline` and store connection: scoring jobs (process, rescore) never overlap each
other, nor do pull and export, and an hours-long rescoring holds up neither pull nor export:

========  ==========================  =====================================================
pull      every ``pacs.interval_s``   C-FIND new studies, C-MOVE/C-GET them to us
process   every ``scoring.interval_s`` ready cases with new arrivals → extract → score →
                                      results into the outbox
export    every ``export.interval_s`` drain the outbox to the PACS
rescore   daily at ``rescore_time``   every ready case again (coalesced: a night missed
                                      while stopped runs once at start)
========  ==========================  =====================================================

Every job is idempotent and records a ``jobs`` row; a job found ``running`` at start was cut
short and is marked ``interrupted`` (its work is redone, never twice: scores are unique per
model and inputs, the outbox per object and destination). SIGTERM stops the listeners
accepting, kills the extraction worker (its patient is redone at the next start), lets the
current job stop at its next patient, and exits.

Extraction runs in a worker process (:mod:`mrrp_pacs.workers`) with a memory and time limit:
a patient that makes it raise, die or run over costs that patient only; it is retried with
backoff and quarantined after ``[scoring] max_failures`` (:mod:`mrrp_pacs.quarantine`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
import zoneinfo
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from model_store import ModelStore
from mrrp_pacs import audit, quarantine
from mrrp_pacs.cases import CaseInputs
from mrrp_pacs.clock import Clock, system_clock
from mrrp_pacs.config import Config
from mrrp_pacs.errors import ModelUnavailable
from mrrp_pacs.faults import fault_point
from mrrp_pacs.features.families import FAMILY_NAMES
from mrrp_pacs.features.pipeline import FamilyStatus
from mrrp_pacs.model.train import MODEL_KIND
from mrrp_pacs.results import RiskResult
from mrrp_pacs.scoring import (
    INCOMPLETE,
    READY,
    WAITING,
    ScoreOutcome,
    Scorer,
    ScoringRun,
    due_cases,
    judge_cases,
)
from mrrp_pacs.statelock import StateLock
from mrrp_pacs.store import Store
from mrrp_pacs.store.groupcommit import GroupCommitter
from mrrp_pacs.workers import (
    ExtractionWorker,
    InlineWorker,
    Worker,
    WorkerFailed,
    WorkerLimits,
    WorkerUnavailable,
)

if TYPE_CHECKING:  # the wiring imports listeners and exporters when it builds them
    from apscheduler.job import Job
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.triggers.base import BaseTrigger

    from exporters.outbox import DrainSummary, Sender
    from listeners.mllp import MllpServer, MllpServerThread
    from listeners.pacs_puller import PullSummary

LOGGER = logging.getLogger(__name__)


JobDetail = dict[str, object]
"""What a job records in ``jobs.detail`` (JSON): its summary's ``as_dict()`` and ``seconds``."""

Publisher = Callable[[Store, Sequence[ScoreOutcome]], dict[str, int]]
"""Builds and queues the objects of new scores; returns how many of each kind it queued
(:class:`exporters.publish.ResultPublisher`)."""


class Listener(Protocol):
    """Something that receives (storage SCP, MLLP listener, health endpoint): started and
    stopped with the daemon."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class JobRecord:
    """Counts a job reports (``jobs.detail``), and why it failed without raising (``error``)."""

    detail: JobDetail = field(default_factory=dict)
    error: str | None = None


@dataclass
class ProcessSummary:
    """What one process or rescore job did; its :meth:`as_dict` is the job's ``jobs.detail``."""

    model: str = ""  # label of the model scored with; '' when there is none
    due: int = 0  # ready cases looked at (without a model: ready cases)
    scored: int = 0  # new score rows (new or changed)
    unchanged: int = 0
    failed: int = 0
    waiting: int = 0  # for a second imaging modality, within the wait window
    incomplete: int = 0
    failed_families: int = 0  # feature families that failed for a patient
    # patients whose extraction or scoring raised, crashed its worker or ran over a limit
    # (retried later, quarantined after [scoring] max_failures: mrrp_pacs/quarantine.py)
    errors: int = 0
    deferred: int = 0  # skipped: failed before, next attempt later
    quarantined: int = 0  # skipped: quarantined
    queued: dict[str, int] = field(default_factory=dict)  # objects queued, by kind
    stopped: bool = False  # the daemon stopped the job between patients
    no_model: bool = False

    def as_dict(self) -> JobDetail:
        return dataclasses.asdict(self)


class Pipeline:
    """What the jobs do, against one store; also used by the batch commands.

    ``clock`` is the time every job decides by (the wait for a missing modality, the outbox's
    retries, the stamps it writes); the wall clock by default.

    Not thread-safe: the scheduler runs one job at a time in one worker thread.
    """

    def __init__(self, config: Config, stopping: threading.Event | None = None,
                 exporter: Publisher | None = None,
                 drain: Callable[[Store], DrainSummary] | None = None,
                 pull: Callable[[Store], PullSummary] | None = None,
                 clock: Clock = system_clock) -> None:
        self.config = config
        self.stopping = stopping or threading.Event()
        self.store = Store(config.paths.db_file, config.paths.objects_dir, clock=clock)
        self.models = ModelStore(config.paths.model_store_dir, clock=clock)
        self._worker: Worker | None = None
        self._scorer: Scorer | None = None
        self._exporter = exporter
        self._drain = drain
        self._pull = pull
        self._warned_no_model = False

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        self.store.close()

    def abort_extraction(self) -> None:
        """Kill the extraction worker now (from another thread, when stopping): the patient
        it was on is redone at the next run, not counted as failed."""
        if isinstance(self._worker, ExtractionWorker):
            self._worker.abort()

    def worker(self) -> Worker:
        """The extraction worker of ``[scoring] isolation`` (started at first use)."""
        if self._worker is None:
            if self.config.scoring.isolation == "inline":
                self._worker = InlineWorker(self.config, lambda: self.store)
            else:
                self._worker = ExtractionWorker(self.config, self.config.paths.db_file,
                                                self.config.paths.objects_dir,
                                                WorkerLimits.from_config(self.config))
        return self._worker

    # -- job bookkeeping ---------------------------------------------------------------------
    def mark_interrupted(self) -> int:
        """Jobs left ``running`` by a process that stopped without finishing them."""
        with self.store.transaction() as conn:
            return conn.execute("UPDATE jobs SET state = 'interrupted', finished_at = ? "
                                "WHERE state = 'running'", (self.store.stamp(),)).rowcount

    @contextmanager
    def job(self, kind: str) -> Iterator[JobRecord]:
        with self.store.transaction() as conn:
            job_id = self.store.insert(conn, "jobs", {"kind": kind, "state": "running",
                                                      "started_at": self.store.stamp()})
        record = JobRecord()
        started = time.monotonic()
        try:
            yield record
        except Exception as exc:
            # the message may quote a patient id: it goes to the database, the log gets the type
            LOGGER.error("job %s (%d) failed: %s", kind, job_id, type(exc).__name__)
            self._finish(job_id, "failed", record, started, f"{type(exc).__name__}: {exc}")
            raise
        if record.error is not None:  # a failure the job has logged its own way
            self._finish(job_id, "failed", record, started, record.error)
            return
        state = "interrupted" if self.stopping.is_set() and record.detail.get("stopped") \
            else "done"
        self._finish(job_id, state, record, started, None)

    def _finish(self, job_id: int, state: str, record: JobRecord, started: float,
                error: str | None) -> None:
        record.detail["seconds"] = round(time.monotonic() - started, 3)
        with self.store.transaction() as conn:
            conn.execute("UPDATE jobs SET state = ?, finished_at = ?, detail = ?, error = ? "
                         "WHERE id = ?", (state, self.store.stamp(), json.dumps(record.detail),
                                          error, job_id))

    # -- the jobs ----------------------------------------------------------------------------
    def scorer(self) -> Scorer:
        """The scorer of the promoted model, reloaded when another version is promoted.

        The promoted version is read once here, at the start of a run, and loaded by that id: a
        promotion during the run takes effect at the next run, never between two patients.
        """
        name = self.config.scoring.model
        # the version ModelStore.load gives: the promoted one, else the latest
        wanted = (self.models.promoted(MODEL_KIND, name)
                  or self.models.versions(MODEL_KIND, name)[-1])
        if self._scorer is None or wanted != self._scorer.model_version:
            # by version, not "the promoted one": a promotion since the read above must not
            # give a scorer of another version than the one compared
            self._scorer = Scorer(self.store, self.config, self.models, name, version=wanted)
            LOGGER.info("scoring with model %s", self._scorer.version.label)
        return self._scorer

    def process(self, everyone: bool = False,
                progress: Callable[[int, int], None] | None = None) -> ProcessSummary:
        """Extract and score the due cases, one patient at a time, and queue their results.

        ``everyone`` rescores every ready case (the nightly job). Stops between patients when
        the daemon is stopping; what was done stays done.
        """
        kind = "rescore" if everyone else "process"
        pruned = audit.prune(self.store, self.config.audit.keep_days, self.store.clock())
        if pruned:
            LOGGER.info("%d audit rows older than %d days deleted ([audit] keep_days)", pruned,
                        self.config.audit.keep_days)
        with self.job(kind) as record:
            name = self.config.scoring.model
            if not self.models.versions(MODEL_KIND, name):
                # a fresh installation receives data before its first model is trained: warn
                # once, but record every run as failed so that alerts on failed jobs fire
                if not self._warned_no_model:
                    LOGGER.warning("no model %s in the model store yet: cases are kept and "
                                   "scored once a model is trained", name)
                    self._warned_no_model = True
                summary = self._readiness_counts()
                record.detail.update(summary.as_dict())
                record.error = (f"no model {MODEL_KIND}/{name} in {self.models.root}: train "
                                "one first (docs/operator-guide.md §5); nothing was scored")
                return summary
            scorer = self.scorer()
            wait = timedelta(hours=self.config.scoring.wait_hours)
            due, digests, run = due_cases(self.store, self.config, scorer, self.store.clock(),
                                          wait, everyone)
            summary = self._score_each(scorer, due, digests, run, progress)
            record.detail.update(summary.as_dict())
            return summary

    def _readiness_counts(self) -> ProcessSummary:
        """Cases by readiness, as a scoring run counts them, for a run without a model
        (``due`` = ready: without a model every ready case is due)."""
        wait = timedelta(hours=self.config.scoring.wait_hours)
        judged = judge_cases(self.store, self.config, self.store.clock(), wait)
        states = [state.state for _, state in judged.values()]
        return ProcessSummary(due=states.count(READY), waiting=states.count(WAITING),
                              incomplete=states.count(INCOMPLETE), no_model=True)

    def _score_each(self, scorer: Scorer, due: dict[str, CaseInputs], digests: dict[str, str],
                    run: ScoringRun, progress: Callable[[int, int], None] | None
                    ) -> ProcessSummary:
        held = quarantine.failures(self.store)
        skipped = {quarantine.DEFERRED: 0, quarantine.QUARANTINED: 0}
        failed_families = errors = 0
        exported: dict[str, int] = {}
        stopped = False
        for done, (key, inputs) in enumerate(due.items()):
            if self.stopping.is_set():
                stopped = True
                break
            failure = held.get(key)
            why = failure.holds(digests[key], self.store.clock()) if failure else None
            if why is not None:
                skipped[why] += 1
            else:
                failed, error = self._score_one(scorer, key, inputs, digests[key], run,
                                                exported, failure is not None)
                failed_families += failed
                if error is not None and self.stopping.is_set():  # stopped under the patient
                    stopped = True
                    break
                errors += error is not None
            if progress is not None:
                progress(done + 1, len(due))
        if not stopped:
            self._publish(self._unpublished(), exported)
        return ProcessSummary(
            model=scorer.version.label, due=len(due), scored=run.count("scored"),
            unchanged=run.count("unchanged"), failed=run.count("failed"), waiting=run.waiting,
            incomplete=run.incomplete, failed_families=failed_families, errors=errors,
            deferred=skipped[quarantine.DEFERRED], quarantined=skipped[quarantine.QUARANTINED],
            queued=exported, stopped=stopped)

    def _score_one(self, scorer: Scorer, key: str, inputs: CaseInputs, digest: str,
                   run: ScoringRun, exported: dict[str, int], failed_before: bool
                   ) -> tuple[int, str | None]:
        """Extract, score and publish one patient: (feature families that failed, None), or
        (0, why the patient failed), then recorded in ``patient_failures`` unless the daemon
        is stopping."""
        try:
            outcomes = self.worker().extract(inputs, families_of(self.config))
            scored = scorer.score({key: inputs}, {key: digest})
        except (ModelUnavailable, WorkerUnavailable):
            if self.stopping.is_set():
                return 0, "stopped"
            raise  # every patient would fail alike: the job fails and says why
        except Exception as exc:
            if self.stopping.is_set():
                return 0, "stopped"
            error = str(exc) if isinstance(exc, WorkerFailed) else f"{type(exc).__name__}: {exc}"
            record = quarantine.record_failure(
                self.store, key, digest, error, self.store.clock(),
                backoff_s=self.config.scoring.retry_backoff_s,
                max_failures=self.config.scoring.max_failures)
            # the error may quote a patient id: it is kept for `cases`, the log gets its type
            LOGGER.error("a patient failed (%s, failure %d): %s", type(exc).__name__,
                         record.failures, "quarantined" if record.quarantined_at is not None
                         else f"retried after {record.next_attempt_at:%Y-%m-%d %H:%M} UTC")
            return 0, error
        if failed_before:
            quarantine.clear(self.store, key)
        run.outcomes.extend(scored)
        self._publish([o for o in scored if o.state == "scored"], exported)
        return sum(o.status == FamilyStatus.FAILED for o in outcomes), None

    def _publish(self, outcomes: list[ScoreOutcome], counts: dict[str, int]) -> None:
        """Queue the objects of new scores; a failure leaves the score to the next run."""
        if self._exporter is None:
            return
        for outcome in outcomes:
            try:
                queued = self._exporter(self.store, [outcome])
            except Exception as exc:  # one patient's report must not stop the others
                LOGGER.error("building the results of score %s failed: %s", outcome.score_id,
                             type(exc).__name__)
                counts["failed"] = counts.get("failed", 0) + 1
                continue
            fault_point("publish.committed")
            for name, count in queued.items():
                counts[name] = counts.get(name, 0) + count

    def _unpublished(self) -> list[ScoreOutcome]:
        """Current scores whose current revision is not published (its publication failed or
        was cut short; a score is published in one transaction that also sets
        ``published_revision``)."""
        if self._exporter is None:
            return []
        return [ScoreOutcome(key, "scored", score_id, result=RiskResult.from_json(outputs))
                for score_id, key, outputs in self.store.conn.execute(
                    "SELECT id, patient_key, outputs FROM scores WHERE superseded_by IS NULL "
                    "AND (published_revision IS NULL OR published_revision != revision) "
                    "ORDER BY id")]

    def export(self) -> DrainSummary:
        """Send what the outbox holds (once)."""
        from exporters.outbox import DrainSummary

        with self.job("export") as record:
            summary = self._drain(self.store) if self._drain is not None else DrainSummary()
            record.detail.update(summary.as_dict())
            return summary

    def pull(self) -> PullSummary:
        """Query the PACS and retrieve new studies (once)."""
        from listeners.pacs_puller import PullSummary

        with self.job("pull") as record:
            summary = self._pull(self.store) if self._pull is not None else PullSummary()
            record.detail.update(summary.as_dict())
            return summary


def families_of(config: Config) -> tuple[str, ...]:
    """The feature families scoring extracts (``[features] families``, in pipeline order)."""
    return tuple(f for f in FAMILY_NAMES if f in config.features.families)


# -- scheduler -------------------------------------------------------------------------------

_ACTIVE: dict[str, Pipeline] = {}
IO_JOBS = {"pull": "io", "export": "io"}  # jobs on the io executor and pipeline


def run_job(kind: str) -> None:
    """Entry point the persistent job store names (``mrrp_pacs.daemon:run_job``)."""
    pipeline = _ACTIVE.get(IO_JOBS.get(kind, "pipeline"))
    if pipeline is None or pipeline.stopping.is_set():
        return
    try:
        if kind == "pull":
            pipeline.pull()
        elif kind == "process":
            pipeline.process()
        elif kind == "rescore":
            pipeline.process(everyone=True)
        elif kind == "export":
            pipeline.export()
    except Exception:  # recorded in the jobs table; the scheduler keeps the next run
        LOGGER.debug("job %s raised", kind, exc_info=True)


def scheduler_db(config: Config) -> Path:
    """The persistent job store, in the state folder (:class:`mrrp_pacs.config.PathsConfig`)."""
    return config.paths.scheduler_db


HEARTBEAT_S = 10.0
"""How often the scheduler stamps its heartbeat (a job of its own, on an executor of its own,
so that a rescoring running for hours does not delay it)."""

HEARTBEAT_LIMIT_S = 60.0
"""A scheduler whose heartbeat is older than this is dead for ``/healthz``."""


class Heartbeat:
    """When the scheduler last ran its heartbeat job, on a monotonic clock.

    ``monotonic`` is the clock (seconds, never going back; :func:`time.monotonic` by default):
    liveness is an age, which the wall clock, set back or forward by NTP, would falsify.
    """

    def __init__(self, interval_s: float = HEARTBEAT_S, limit_s: float = HEARTBEAT_LIMIT_S,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.limit_s = limit_s
        self.monotonic = monotonic
        self.last: float | None = None

    def beat(self) -> None:
        self.last = self.monotonic()

    def fresh(self) -> bool:
        """Beaten at least once, and not longer than ``limit_s`` ago."""
        return self.last is not None and self.monotonic() - self.last <= self.limit_s


def build_scheduler(config: Config, clock: Clock = system_clock,
                    heartbeat: Heartbeat | None = None) -> BackgroundScheduler:
    """A BackgroundScheduler with a persistent SQLite job store and the daemon's jobs.

    The scheduler fires jobs by the wall clock (APScheduler reads it itself); ``clock`` sets
    when the interrupted work resumes (at once). The nightly rescoring is a cron trigger in
    ``[scoring] timezone`` (a named zone, so it stays at the same local time across daylight
    saving changes, and fires once on the night whose hour repeats:
    :class:`mrrp_pacs.schedule.LocalCronTrigger`). A job stored by an earlier start in
    another zone (e.g. a fixed UTC offset) is replaced, keeping a missed run due.

    ``heartbeat`` is stamped every ``heartbeat.interval_s`` (:data:`HEARTBEAT_S`) by a job kept
    in memory and run by an executor of its own.
    """
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler
    from apscheduler.schedulers.base import STATE_STOPPED
    from apscheduler.triggers.interval import IntervalTrigger

    from mrrp_pacs.schedule import LocalCronTrigger, same_trigger

    class Scheduler(BackgroundScheduler):  # type: ignore[misc]
        def _process_jobs(self) -> float | None:
            # shutdown() wakes the scheduler thread for one last pass after stopping the
            # executors: that pass fails to submit every due job yet moves it to its next run
            # time, so a missed nightly rescoring would be lost (and errors logged)
            if self.state == STATE_STOPPED:
                return None
            try:
                return super()._process_jobs()  # type: ignore[no-any-return]
            except Exception as exc:
                # APScheduler lets a failure to write its job store (SQLITE_FULL on a full
                # disk, a lock held too long) end its only thread: every job would stop for
                # good in a process that stays up. Try again later instead; meanwhile the
                # heartbeat goes stale and /healthz says 503.
                LOGGER.error("the scheduler could not update its job store (%s: %s); trying "
                             "again in %g s", type(exc).__name__, str(exc).splitlines()[0],
                             self.jobstore_retry_interval)
                return float(self.jobstore_retry_interval)

    scheduler = Scheduler(
        jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{scheduler_db(config)}"),
                   "memory": MemoryJobStore()},
        # scoring (process, rescore) on one thread, pull and export on another, the
        # liveness heartbeat on a third
        executors={"default": ThreadPoolExecutor(max_workers=1),
                   "io": ThreadPoolExecutor(max_workers=1),
                   "heartbeat": ThreadPoolExecutor(max_workers=1)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 6 * 3600},
        timezone="UTC")
    hour, minute = (int(part) for part in config.scoring.rescore_time.split(":"))
    wanted: dict[str, BaseTrigger] = {
        "process": IntervalTrigger(seconds=config.scoring.interval_s),
        "rescore": LocalCronTrigger(hour=hour, minute=minute, timezone=rescore_zone(config)),
    }
    if config.pacs.host:
        wanted["pull"] = IntervalTrigger(seconds=config.pacs.interval_s)
    if config.export.enabled:
        wanted["export"] = IntervalTrigger(seconds=config.export.interval_s)
    scheduler.start(paused=True)
    for job in scheduler.get_jobs():
        if job.id not in wanted:
            job.remove()
    soon = clock()
    for kind, trigger in wanted.items():
        existing: Job | None = scheduler.get_job(kind)
        executor = "io" if kind in IO_JOBS else "default"
        if existing is not None and same_trigger(existing.trigger, trigger) \
                and existing.executor == executor:
            continue  # keep its next run time: a missed nightly rescoring then runs at start
        # the same times in another zone or class (a trigger stored by an older version):
        # a run it missed stays due; a time the operator changed starts afresh
        missed = (existing.next_run_time if existing is not None
                  and str(existing.trigger) == str(trigger)
                  and existing.next_run_time is not None and existing.next_run_time <= soon
                  else None)
        scheduler.add_job("mrrp_pacs.daemon:run_job", trigger, args=[kind], id=kind,
                          name=kind, executor=executor, replace_existing=True)
        if missed is not None:
            scheduler.modify_job(kind, next_run_time=missed)
    # resume interrupted work at once rather than one interval later
    for kind in ("pull", "process", "export"):
        if kind in wanted:
            scheduler.modify_job(kind, next_run_time=soon)
    if heartbeat is not None:
        # never too late to beat (no misfire limit): a scheduler paused, then resumed, beats
        # at once; the first beat is one interval after the start (Daemon.start beats itself)
        scheduler.add_job(heartbeat.beat, IntervalTrigger(seconds=heartbeat.interval_s),
                          id="heartbeat", name="heartbeat", jobstore="memory",
                          executor="heartbeat", misfire_grace_time=None)
    return scheduler


def rescore_zone(config: Config) -> tzinfo:
    """The zone of the nightly rescoring: ``[scoring] timezone``, else this machine's.

    A named zone, not the current UTC offset: a fixed offset would move the run by an hour
    at every daylight saving change.
    """
    if config.scoring.timezone:
        return zoneinfo.ZoneInfo(config.scoring.timezone)
    import tzlocal  # APScheduler's own dependency: /etc/localtime or $TZ as a named zone

    return tzlocal.get_localzone()


# -- the daemon ------------------------------------------------------------------------------

class Daemon:
    """Listeners + scheduler + health endpoint, started and stopped together.

    One daemon per state folder: :meth:`start` takes the folder's lock
    (:class:`mrrp_pacs.statelock.StateLock`) before anything else, so a second daemon on the
    same database is refused (:class:`~mrrp_pacs.errors.StateLocked`) before it could mark the
    first one's running jobs interrupted; :meth:`stop` gives it back.
    """

    def __init__(self, config: Config, components: Components,
                 heartbeat: Heartbeat | None = None) -> None:
        self.config = config
        self.stopping = threading.Event()
        self.components = components
        components.stopping = self.stopping
        # two pipelines, each with its own store connection and scheduler thread: a rescoring
        # that runs for hours must not hold up pulling studies or sending results
        self.pipeline = Pipeline(config, self.stopping, exporter=components.exporter,
                                 clock=components.clock)
        self.io_pipeline = Pipeline(config, self.stopping, drain=components.drain,
                                    pull=components.pull, clock=components.clock)
        self.scheduler: BackgroundScheduler | None = None
        self.heartbeat = heartbeat or Heartbeat()
        self.lock = StateLock(config.paths.lock_file, "serve")
        self._started: list[Listener] = []
        components.checks.setdefault("scheduler", self.scheduler_alive)

    def scheduler_alive(self) -> bool:
        """The scheduler runs, its thread is alive and its heartbeat is fresh (a scheduler
        paused or stuck stops beating)."""
        scheduler = self.scheduler
        if scheduler is None or not scheduler.running:
            return False
        thread = getattr(scheduler, "_thread", None)  # BackgroundScheduler's main loop
        return thread is not None and thread.is_alive() and self.heartbeat.fresh()

    def start(self) -> None:
        """Take the state folder's lock, then start the listeners and the scheduler.

        Raises
        ------
        StateLocked
            Another process runs on this state folder; nothing was started or changed.
        """
        try:
            self.lock.acquire()
            interrupted = self.pipeline.mark_interrupted()
            if interrupted:
                LOGGER.warning("%d job(s) were interrupted by the last stop; their work is "
                               "redone", interrupted)
            for listener in self.components.listeners:
                listener.start()
                self._started.append(listener)
            _ACTIVE["pipeline"] = self.pipeline
            _ACTIVE["io"] = self.io_pipeline
            self.scheduler = build_scheduler(self.config, self.components.clock,
                                             self.heartbeat)
            self.heartbeat.beat()  # the scheduler's job takes over one interval later
            self.scheduler.resume()
        except BaseException:
            self._shut(started=False)
            raise
        LOGGER.info("daemon started: %d listener(s), jobs %s", len(self.components.listeners),
                    ", ".join(job.id for job in self.scheduler.get_jobs()))

    def stop(self) -> None:
        """Stop accepting, let the running job reach its next checkpoint, close.

        The scheduler stops first: a pull in progress needs our SCP to receive the studies it
        moves (it ends after the current study), and scoring stops after its current patient.
        """
        self._shut(started=True)
        LOGGER.info("daemon stopped")

    def _shut(self, started: bool) -> None:
        """Stop what :meth:`start` started (all of it, or as far as it got), give the lock
        back last: until then, this process may still write."""
        self.stopping.set()
        self.pipeline.abort_extraction()  # its patient is redone at the next start
        try:
            if self.scheduler is not None and self.scheduler.running:
                self.scheduler.pause()  # nothing new is submitted while the job ends
                self.scheduler.shutdown(wait=True)
            for listener in (self.components.listeners if started else self._started):
                listener.stop()
            self._started.clear()
            if _ACTIVE.get("pipeline") is self.pipeline:
                _ACTIVE.pop("pipeline", None)
            if _ACTIVE.get("io") is self.io_pipeline:
                _ACTIVE.pop("io", None)
            self.pipeline.close()
            self.io_pipeline.close()
        finally:
            self.lock.release()

    def run_until_signalled(self, announce: Callable[[], None] | None = None) -> None:
        """Start, call ``announce`` (once started), wait for SIGTERM or SIGINT, stop."""
        def handle(signum: int, _frame: object) -> None:
            LOGGER.info("signal %d received: stopping", signum)
            self.stopping.set()

        previous = {signum: signal.signal(signum, handle)
                    for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
        except BaseException:  # e.g. refused: the state folder is in use
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            raise
        try:
            if announce is not None:
                announce()
            while not self.stopping.wait(1.0):
                pass
        finally:
            self.stop()


@dataclass
class Components:
    """What the daemon wires together (built by :func:`components_from_config`)."""

    listeners: list[Listener] = field(default_factory=list)
    exporter: Publisher | None = None
    drain: Callable[[Store], DrainSummary] | None = None
    pull: Callable[[Store], PullSummary] | None = None
    stopping: threading.Event = field(default_factory=threading.Event)  # the daemon's
    clock: Clock = system_clock  # what every component stamps and decides by
    # what /healthz asks, by component: each listener's thread, and (added by the Daemon)
    # the scheduler's thread and heartbeat; the health server holds this same dict
    checks: dict[str, Callable[[], bool]] = field(default_factory=dict)


class _MllpListener:
    """Start/stop adapter for the asyncio MLLP server running in a thread of its own."""

    def __init__(self, server: MllpServer) -> None:
        self.server = server
        self.handle: MllpServerThread | None = None

    @property
    def port(self) -> int:
        if self.handle is not None:
            return self.handle.port
        return int(self.server.port if self.server.port is not None else self.server.tls_port
                   or 0)

    @property
    def running(self) -> bool:
        """Started, and its thread (the asyncio loop serving MLLP) is alive."""
        return self.handle is not None and self.handle.thread.is_alive()

    def start(self) -> None:
        self.handle = self.server.run_in_thread()

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.stop()
            self.handle = None


class _IntakeWriter:
    """Start/stop adapter for the listeners' :class:`GroupCommitter`."""

    def __init__(self, committer: GroupCommitter) -> None:
        self.committer = committer

    @property
    def running(self) -> bool:
        """Started by the daemon, and its thread alive (a committer not started yet would
        start at its first write: that is not a running daemon's listener)."""
        return self.committer.started and self.committer.running

    def start(self) -> None:
        self.committer.start()

    def stop(self) -> None:
        self.committer.stop()


def allowed_calling_aes(config: Config) -> set[str]:
    """Calling AE titles our storage SCP accepts: ``[dicom] allowed_aes`` and always the
    PACS's ``[pacs] ae_title``, since the studies we C-MOVE arrive on associations it opens
    with that title (listing another sender must not lock out the PACS we pull from)."""
    return {*config.dicom.allowed_aes, config.pacs.ae_title}


def components_from_config(config: Config, clock: Clock = system_clock) -> Components:
    """The listeners, puller, exporter and sender the configuration asks for, on ``clock``."""
    from exporters.dicom_sender import DicomSender
    from exporters.hl7_result import MllpSender
    from exporters.outbox import Outbox
    from exporters.publish import (
        DESTINATION,
        HL7_DESTINATION,
        ResultPublisher,
        settings_from_config,
    )
    from listeners.dicom_scp import StorageScp, intake_opener
    from listeners.mllp import MllpServer
    from listeners.pacs_puller import PacsPuller, RemotePacs
    from mrrp_pacs.clinical_schema import load_schema
    from mrrp_pacs.health import HealthServer
    from mrrp_pacs.intake import Intake
    from mrrp_pacs.tls import client_context, parse_networks, server_context

    dicom, hl7 = config.dicom, config.hl7
    listening_tls = server_context(config.tls) if dicom.tls or hl7.tls else None
    calling_tls = client_context(config.tls) \
        if config.pacs.tls or config.export.tls or config.export.hl7_tls else None
    schema = load_schema(config.clinical.schema_file)
    # every listener's rows go through one writer: a transaction and a WAL fsync per batch of
    # what arrived meanwhile, not per object (docs/daemon.md "Load"); listed last, so that it
    # stops after the listeners that hand it writes
    writer = _IntakeWriter(GroupCommitter(lambda: Store(
        config.paths.db_file, config.paths.objects_dir, migrate=False, clock=clock)))
    open_intake = intake_opener(config, schema, clock, writer.committer)
    scp = StorageScp(open_intake, dicom.ae_title, dicom.port if dicom.plain else None,
                     host=dicom.bind, allowed_aes=allowed_calling_aes(config),
                     max_associations=dicom.max_associations,
                     association_request_timeout_s=dicom.association_request_timeout_s,
                     max_unassociated_per_address=dicom.max_unassociated_per_address,
                     pdu_timeout_s=dicom.pdu_timeout_s,
                     spool_dir=config.paths.objects_dir / "tmp",
                     tls_port=dicom.tls_port if dicom.tls else None,
                     ssl_context=listening_tls if dicom.tls else None,
                     ae_addresses={title: parse_networks(addresses, f"dicom.ae_addresses.{title}")
                                   for title, addresses in dicom.ae_addresses.items()})

    def new_intake() -> Intake:
        return Intake(Store(config.paths.db_file, config.paths.objects_dir, migrate=False,
                            clock=clock), config, schema, writer.committer)

    mllp = _MllpListener(MllpServer(
        new_intake, host=hl7.bind, port=hl7.port if hl7.plain else None,
        max_message_bytes=config.ingest.max_hl7_bytes, idle_timeout_s=hl7.idle_timeout_s,
        max_connections=hl7.max_connections, workers=hl7.workers,
        frame_timeout_s=hl7.frame_timeout_s,
        max_connections_per_address=hl7.max_connections_per_address,
        tls_port=hl7.tls_port if hl7.tls else None,
        ssl_context=listening_tls if hl7.tls else None,
        allowed_addresses=parse_networks(hl7.allowed_addresses, "hl7.allowed_addresses")
        if hl7.allowed_addresses else None))
    components = Components(listeners=[scp, mllp], clock=clock,
                            checks={"dicom": lambda: scp.running, "hl7": lambda: mllp.running,
                                    "intake-writer": lambda: writer.running})
    if config.http.port:
        components.listeners.append(HealthServer(
            config.paths.db_file, config.paths.objects_dir, config.http.bind, config.http.port,
            components.checks, config.http.metrics_token))
    components.listeners.append(writer)
    pacs = config.pacs
    if pacs.host:
        remote = RemotePacs(pacs.host, pacs.port, pacs.ae_title)

        def pull(store: Store) -> PullSummary:
            puller = PacsPuller(store, remote, config.dicom.ae_title,
                                our_port=scp.port if scp.port is not None else scp.tls_port,
                                ssl_context=calling_tls if pacs.tls else None,
                                open_intake=open_intake, modalities=tuple(pacs.modalities),
                                window_days=pacs.window_days, method=pacs.method,
                                query_timeout_s=pacs.timeout_s,
                                retrieve_timeout_s=pacs.retrieve_timeout_s,
                                lookback_days=pacs.lookback_days,
                                lookback_patients=pacs.lookback_patients,
                                lookback_interval_s=pacs.lookback_interval_h * 3600,
                                retry_backoff_s=pacs.retry_backoff_s,
                                retry_max_backoff_s=pacs.retry_max_backoff_s,
                                retry_budget_s=pacs.retry_budget_h * 3600,
                                stop_requested=components.stopping)
            # StudyDate is a local date: the PACS's day, taken as this machine's zone
            return puller.poll(store.clock().astimezone())

        components.pull = pull
    export = config.export
    if export.enabled:
        components.exporter = ResultPublisher(ModelStore(config.paths.model_store_dir, clock=clock),
                                              settings_from_config(export))
        senders: dict[str, Sender] = {}
        host = export.host or pacs.host
        if host:
            senders[DESTINATION] = DicomSender(host, export.port or pacs.port,
                                               export.ae_title or pacs.ae_title,
                                               export.calling_ae_title or config.dicom.ae_title,
                                               timeout_s=export.timeout_s,
                                               ssl_context=calling_tls if export.tls else None)
        if export.hl7_host:
            senders[HL7_DESTINATION] = MllpSender(
                export.hl7_host, export.hl7_port, timeout_s=export.timeout_s,
                ssl_context=calling_tls if export.hl7_tls else None)
        if senders:

            def drain(store: Store) -> DrainSummary:
                return Outbox(store).drain(
                    senders, retry_hours=export.retry_hours, max_attempts=export.max_attempts,
                    backoff_s=export.backoff_s, max_backoff_s=export.max_backoff_s)

            components.drain = drain
        else:
            LOGGER.warning("export is enabled but has no destination ([export] host or [pacs] "
                           "host): results are queued in the outbox and not sent")
    return components
