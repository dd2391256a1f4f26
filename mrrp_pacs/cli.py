"""The ``mrrp-pacs`` command line. Each subcommand is thin: it wires config, store and the
module that does the work, and turns known failures into a message and an exit code."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from mrrp_pacs import __version__
from mrrp_pacs.config import Config, config_toml, load_config, local_address
from mrrp_pacs.errors import ConfigError, MrrpError, StateLocked
from mrrp_pacs.features.families import FAMILY_NAMES
from mrrp_pacs.logs import configure_logging
from mrrp_pacs.statelock import StateLock
from mrrp_pacs.store import Store

DB_OPTION = click.option(
    "--db", "db_path", type=click.Path(dir_okay=False, path_type=Path),
    help="SQLite database file (overrides [paths] db): its folder is the state folder, where "
         "objects/, models/ and scheduler.sqlite3 are found unless [paths] objects or "
         "model_store say otherwise.",
)


class _Context:
    def __init__(self, config_path: Path | None) -> None:
        self.config_path = config_path
        self._config: Config | None = None

    def config(self, db_path: Path | None = None) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config.with_db(db_path) if db_path is not None else self._config


@contextmanager
def _open_store(config: Config) -> Iterator[Store]:
    paths = config.paths
    with Store(paths.db_file, paths.objects_dir) as store:
        yield store


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    """Columns padded to their widest value, two spaces apart."""
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _progress(total: int, unit: str) -> tqdm:
    return tqdm(total=total, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty(),
                dynamic_ncols=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="MRRP_CONFIG", help="TOML configuration file (default: built-in defaults).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
              default=None, help="Override [logging] level.")
@click.version_option(__version__, prog_name="mrrp-pacs")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, log_level: str | None) -> None:
    """Recurrence-risk prediction (MRRP) for HR+/HER2- early breast cancer, wired to PACS and
    HL7. Every subcommand takes --db or a config file; see deploy/mrrp.example.toml."""
    state = _Context(config_path)
    ctx.obj = state
    try:
        logging_config = state.config().logging
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    configure_logging(log_level or logging_config.level, logging_config.json)


STATE_LOCKED_EXIT = 75
"""Exit status when another process holds the state folder (``EX_TEMPFAIL``: try later)."""


class _StateInUse(click.ClickException):
    """Another process holds the state folder: its message, exit status 75."""

    exit_code = STATE_LOCKED_EXIT


def _guarded(work: Callable[[], Any]) -> Any:
    """Run ``work``, turning the failures a user can act on into one clear message.

    Those are every :class:`~mrrp_pacs.errors.MrrpError` (its message says what and what to
    do; exit status 1, or :data:`STATE_LOCKED_EXIT` when the state folder is in use), a
    database that cannot be used, and operating-system errors. Anything else (a bug, a
    ``ValueError`` out of torch or numpy) keeps its traceback.
    """
    try:
        return work()
    except StateLocked as exc:
        raise _StateInUse(str(exc)) from None
    except MrrpError as exc:
        raise click.ClickException(str(exc)) from None
    except sqlite3.Error as exc:
        raise _unusable_database(exc) from None
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        raise click.ClickException(f"{where}{exc.strerror or exc}") from None
    except Exception as exc:
        # the scheduler's job store reaches SQLite through SQLAlchemy, which wraps its errors
        # (a daemon started on a full disk); sqlalchemy is not imported for this test
        if isinstance(getattr(exc, "orig", None), sqlite3.Error):
            raise _unusable_database(exc.orig) from None  # type: ignore[attr-defined]
        raise


def _unusable_database(exc: sqlite3.Error) -> click.ClickException:
    return click.ClickException(
        f"the database cannot be used ({exc}); check the path, free disk space and that "
        "no other program holds it locked")


@main.command()
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.pass_obj
def ingest(state: _Context, paths: tuple[Path, ...], db_path: Path | None, as_json: bool) -> None:
    """Import DICOM and HL7 files from files or folders.

    Files are recognised by content; importing the same files again adds nothing."""
    from listeners.file_drop import find_files, ingest_paths
    from mrrp_pacs.intake import Intake

    def work() -> None:
        config = state.config(db_path)
        total = sum(1 for _ in find_files(list(paths)))
        with _open_store(config) as store, _progress(total, "file") as bar:
            summary = ingest_paths(Intake(store, config), list(paths), progress=bar.update)
        if as_json:
            click.echo(json.dumps(summary.as_dict()))
            return
        kinds = ", ".join(f"{n} {k.upper()}" for k, n in sorted(summary.new_by_kind.items()))
        click.echo(f"{total} files: {summary.new} new{f' ({kinds})' if kinds else ''}, "
                   f"{summary.duplicate} duplicate, {len(summary.rejected)} rejected")
        for rejection in summary.rejected:
            click.echo(f"  rejected {rejection.path}: {rejection.reason}")

    _guarded(work)


@main.command()
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option("--release", "release", multiple=True, metavar="KEY",
              help="Release a failing or quarantined patient (by the key this command lists) "
                   "so that the next scoring run tries it again; repeatable.")
@click.pass_obj
def cases(state: _Context, db_path: Path | None, as_json: bool, release: tuple[str, ...]
          ) -> None:
    """List patients, their modalities and readiness: ready, waiting (for a second imaging
    modality, within [scoring] wait_hours), incomplete (no image or no final clinical
    values), as scoring decides it, or quarantined (its extraction or scoring failed
    [scoring] max_failures times; --release KEY tries it again)."""
    from datetime import timedelta

    from mrrp_pacs import quarantine
    from mrrp_pacs.cases import MODALITIES, CaseInputs, list_cases
    from mrrp_pacs.clinical_schema import load_schema
    from mrrp_pacs.features.cache import FeatureCache
    from mrrp_pacs.scoring import (
        INCOMPLETE,
        READY,
        WAITING,
        arrivals_digest,
        readiness,
        wait_started,
    )

    def work() -> None:
        config = state.config(db_path)
        n_variables = len(load_schema(config.clinical.schema_file).variables)
        wait = timedelta(hours=config.scoring.wait_hours)
        with _open_store(config) as store:
            for key in release:
                if not quarantine.clear(store, key):
                    raise click.UsageError(f"no failing or quarantined patient {key!r}: "
                                           "`mrrp-pacs cases` lists them")
                click.echo(f"released {key}: the next scoring run tries it again")
            if release:
                return
            now = store.clock()
            failed = quarantine.failures(store)

            def judge(case: CaseInputs) -> tuple[str, str]:
                found = readiness(case, wait_started(store, case, now, record=False), now,
                                  wait)
                failure = failed.get(case.patient_key)
                if failure is None:
                    return found.state, found.reason
                held = failure.holds(arrivals_digest(case), now)
                if held == quarantine.QUARANTINED:
                    return quarantine.QUARANTINED, failure.describe()
                return found.state, f"{found.reason}; {failure.describe()}"

            found = list_cases(store, config, judge)
            extracted = FeatureCache(store).summary()
        if as_json:
            click.echo(json.dumps([
                {**c.as_dict(), **extracted.get(c.patient_key, {"features": [], "flags": []})}
                for c in found], indent=2))
            return
        header = ["patient", *MODALITIES, "readiness", "features", "flags", "why"]
        rows = [[c.patient_key,
                 *[("yes" if m in c.modalities else "-") if m != "clinical"
                   else f"{len(c.clinical_variables)}/{n_variables}" for m in MODALITIES],
                 c.readiness.upper() if c.readiness == READY else c.readiness,
                 ",".join(extracted.get(c.patient_key, {}).get("features", [])) or "-",
                 ",".join(extracted.get(c.patient_key, {}).get("flags", [])) or "-",
                 c.reason]
                for c in found]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True))
                       .rstrip())
        counts = {s: sum(c.readiness == s for c in found)
                  for s in (READY, WAITING, INCOMPLETE, quarantine.QUARANTINED)
                  if s != quarantine.QUARANTINED or any(c.readiness == s for c in found)}
        click.echo(f"{len(found)} patients: " + ", ".join(f"{n} {s}" for s, n in counts.items()))

    _guarded(work)


@main.command()
@DB_OPTION
@click.option("--families", default=None,
              help=f"Comma-separated subset of {','.join(FAMILY_NAMES)} "
                   "(default: [features] families).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: [features] workers).")
@click.option("--force", is_flag=True, help="Recompute even what is cached.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def extract(state: _Context, db_path: Path | None, families: str | None, workers: int | None,
            force: bool, as_json: bool) -> None:
    """Compute features for every case (cached).

    A rerun computes only what changed."""
    from mrrp_pacs.features.pipeline import extract as run_extraction

    def work() -> None:
        config = state.config(db_path)
        chosen = tuple(f.strip() for f in families.split(",") if f.strip()) if families \
            else tuple(config.features.families)
        unknown = set(chosen) - set(FAMILY_NAMES)
        if unknown:
            raise click.BadParameter(f"unknown families {sorted(unknown)}; known: "
                                     f"{','.join(FAMILY_NAMES)}", param_hint="--families")
        with _open_store(config) as store:
            from mrrp_pacs.cases import case_inputs

            total = len(case_inputs(store, config))
            with _progress(total, "patient") as bar:
                summary = run_extraction(store, config, chosen, force=force,
                                         workers=workers or config.features.workers,
                                         progress=bar.update)
        result = summary.as_dict()
        if as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            click.echo(f"{result['patients']} patients: {result['computed']} computed, "
                       f"{result['cached']} cached, {result['no_input']} without input, "
                       f"{len(result['failed'])} failed")
            for failure in result["failed"]:
                click.echo(f"  failed {failure['family']} for {failure['patient']}: "
                           f"{failure['reason']}")
        if result["failed"]:
            sys.exit(3)

    _guarded(work)


@main.command("train-encoder")
@click.argument("modality", type=click.Choice(["us"]))
@DB_OPTION
@click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--promote/--no-promote", default=True, show_default=True,
              help="Make the new version the one extraction uses.")
@click.option("--outcomes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Outcomes CSV with a split column: its test patients' images "
              "are left out of the encoder's training (outcomes themselves are not used).")
@click.pass_obj
def train_encoder(state: _Context, modality: str, db_path: Path | None, epochs: int, seed: int,
                  promote: bool, outcomes: Path | None) -> None:
    """Train the ultrasound encoder (no outcome labels).

    With --outcomes, patients of its test split are left out, so a model evaluated on them
    never rests on an encoder that has seen their images."""
    from model_store import ModelStore
    from mrrp_pacs.features.pipeline import lesion_crops
    from mrrp_pacs.features.us_encoder import US_ENCODER_KIND, save_us_encoder, train_us_encoder

    def work() -> None:
        from mrrp_pacs.model.dataset import read_outcomes

        config = state.config(db_path)
        held_out = ({pid for pid, row in read_outcomes(outcomes).items() if row.split == "test"}
                    if outcomes is not None else set())
        if outcomes is not None:
            click.echo(f"leaving out the {len(held_out)} test patients of {outcomes.name}")
        with _open_store(config) as store:
            crops, skipped = lesion_crops(store, config, exclude=held_out)
        if len(crops) < 8:
            raise click.ClickException(
                f"only {len(crops)} ultrasound lesion crops in the store; ingest more images "
                "(with ROIs) before training the encoder")
        for reason in skipped:
            click.echo(f"  skipped: {reason}", err=True)
        models = ModelStore(config.paths.model_store_dir)
        model, history = train_us_encoder(crops, epochs=epochs, seed=seed)
        stored = save_us_encoder(models, model, history, {
            "source": "mrrp-pacs train-encoder us", "database": str(config.paths.db_file),
            "n_crops": len(crops), "rois": "annotated lesions only (SR or VOC)",
            "held_out_test_patients": len(held_out)},
            name=config.features.us_encoder)
        if promote:
            models.promote(US_ENCODER_KIND, config.features.us_encoder, stored.version)
        click.echo(f"trained {stored.label} on {len(crops)} crops "
                   f"({'promoted' if promote else 'not promoted'}); "
                   f"final pretext loss {stored.manifest.get('training', {}).get('final_loss')}")

    _guarded(work)


def _cohort(state: _Context, db_path: Path | None, outcomes: Path | None, table: Path | None,
            schema: Path | None) -> tuple[Config, Any]:
    """The cohort named on the command line: store + outcomes, or a clinical table + schema."""
    from mrrp_pacs.model.dataset import cohort_from_store, cohort_from_table, read_outcomes

    config = state.config(db_path)
    if table is not None:
        if schema is None:
            raise click.BadParameter("--table needs --schema", param_hint="--schema")
        return config, cohort_from_table(table, schema)
    if outcomes is None:
        raise click.BadParameter("give --db with --outcomes, or --table with --schema",
                                 param_hint="--outcomes")
    with _open_store(config) as store:
        return config, cohort_from_store(store, config, read_outcomes(outcomes))


def _cohort_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        DB_OPTION,
        click.option("--outcomes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="CSV patient_id,time_months,event[,split] (with --db)."),
        click.option("--table", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Clinical-only cohort CSV: patient_id,time_months,event + columns."),
        click.option("--schema", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="TOML declaring the --table columns (continuous / categorical)."),
    ]):
        command = option(command)
    return command


@main.command("train")
@_cohort_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model store folder (default: [paths] model_store).")
@click.option("--name", default="mrrp", show_default=True, help="Model name in the store.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-epochs", type=click.IntRange(min=1), default=150, show_default=True)
@click.option("--fusion", type=click.Choice(["cross-attention", "concat", "add", "multiply"]),
              default="cross-attention", show_default=True)
@click.option("--modality-dropout", type=click.FloatRange(0, 0.95), default=None,
              help="Training-time probability of hiding a modality.  [default: 0.2]")
@click.option("--stop-on", type=click.Choice(["loss", "c_index"]), default="loss",
              show_default=True, help="What the inner validation watches.")
@click.option("--tune/--no-tune", default=True, show_default=True,
              help="Choose the learning rate and epochs by inner cross-validation, then refit "
              "on every training patient (--no-tune: one inner validation split early-stops "
              "one fit at the first learning rate).")
@click.option("--learning-rates", default="3e-4,1e-3,3e-3", show_default=True,
              help="Comma-separated learning rates tried by --tune.")
@click.option("--batch-size", type=click.IntRange(min=0), default=64, show_default=True,
              help="Patients per step, stratified by event (0 = full batch).")
@click.option("--components", type=click.IntRange(min=0), default=0, show_default=True,
              help="Reduce each family to this many principal components first (0 = no).")
@click.option("--promote/--no-promote", default=True, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the test metrics as JSON.")
@click.pass_obj
def train_model(state: _Context, db_path: Path | None, outcomes: Path | None,
                table: Path | None, schema: Path | None, out_dir: Path | None, name: str,
                seed: int, max_epochs: int, fusion: str, modality_dropout: float | None,
                stop_on: str, tune: bool, learning_rates: str, batch_size: int,
                components: int, promote: bool, as_json: bool) -> None:
    """Train the MRRP model (Cox) and store a new version.

    With a split column the model is fitted on "train" rows and its metrics on "test" rows go
    into the manifest; otherwise it is fitted on every row."""
    import numpy as np

    from model_store import ModelStore
    from mrrp_pacs.model.evaluate import evaluate_predictions
    from mrrp_pacs.model.train import MODEL_KIND, TrainSettings, config_for, predict, save, train

    def work() -> None:
        config, cohort = _cohort(state, db_path, outcomes, table, schema)
        split = cohort.split
        train_idx = np.flatnonzero(split != "test")
        test_idx = np.flatnonzero(split == "test")
        fit_part = cohort.subset(train_idx)
        try:
            rates = tuple(float(r) for r in learning_rates.split(",") if r.strip())
            settings = TrainSettings(max_epochs=max_epochs, seed=seed, stop_on=stop_on,
                                     tune=tune, learning_rates=rates, learning_rate=rates[0],
                                     batch_size=batch_size)
        except (ValueError, IndexError):
            raise click.BadParameter(f"{learning_rates!r}: give one or more numbers, e.g. "
                                     "3e-4,1e-3", param_hint="--learning-rates") from None
        dropout = {} if modality_dropout is None else {"modality_dropout": modality_dropout}
        architecture = config_for(fit_part, fusion=fusion, input_components=components,
                                  **dropout)
        click.echo(f"training on {len(fit_part.records)} patients "
                   f"({int(fit_part.event.sum())} events)", err=True)
        trained = train(fit_part, architecture, settings)
        metrics: dict[str, Any] = {}
        if len(test_idx):
            test_part = cohort.subset(test_idx)
            metrics["test"] = evaluate_predictions(
                test_part.time, test_part.event, predict(trained.model, test_part),
                fit_part.time, fit_part.event, trained.train_risk, seed=seed)
        store = ModelStore(out_dir or config.paths.model_store_dir)
        stored = save(store, name, trained, fit_part, settings, metrics)
        if promote:
            store.promote(MODEL_KIND, name, stored.version)
        if as_json:
            click.echo(json.dumps({"model": stored.label, "path": str(stored.path),
                                   **metrics}, indent=2))
            return
        history = trained.history
        chosen = (f"learning rate {history.learning_rate:g} and {history.stopped_epoch} epochs "
                  f"chosen by {settings.inner_folds}-fold inner cross-validation, refitted on "
                  "every training patient" if history.tuning else
                  f"best epoch {history.best_epoch} of {history.stopped_epoch}")
        click.echo(f"stored {stored.label} at {stored.path} "
                   f"({'promoted' if promote else 'not promoted'}); {chosen}")
        if "test" in metrics:
            test = metrics["test"]
            ci = test.get("c_index_ci95") or [None, None]
            click.echo(f"test: n {test['n']}, events {test['events']}, C-index "
                       f"{test['c_index']} (95% CI {ci[0]}-{ci[1]})")

    _guarded(work)


def _version_at(path: Path, kind: str | None = None) -> Any:
    """The verified model version ``path`` stands for (:func:`model_store.locate`: a version
    folder, a model's folder, or a model store such as ``train --out`` wrote); says on stderr
    which version a folder above a version folder was resolved to."""
    from model_store import locate

    located = locate(path, kind)
    version = located.load()
    if located.how != "given":
        why = ("promoted" if located.how == "promoted"
               else "the newest: none is promoted")
        click.echo(f"{path}: using {version.label} ({why})", err=True)
    return version


@main.command("evaluate")
@_cohort_options
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False,
                                                      path_type=Path), required=True,
              help="Model store folder (as given to `train --out`: its promoted MRRP "
              "model), a model's folder in it, or a version folder.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Report folder (metrics.json, predictions.csv, plots).")
@click.option("--cv", "folds", type=click.IntRange(min=2), default=None,
              help="Cross-validate the model's architecture with K folds instead.")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_obj
def evaluate_model(state: _Context, db_path: Path | None, outcomes: Path | None,
                   table: Path | None, schema: Path | None, model_dir: Path, out_dir: Path,
                   folds: int | None, repeats: int, seed: int) -> None:
    """Evaluate a model: metrics, predictions and plots.

    Without --cv the stored model scores the cohort (its "test" rows when there is a split
    column). With --cv K the model's architecture is retrained per fold on the other rows
    (those of split "test" are left out)."""
    import numpy as np

    from mrrp_pacs.model.assessment import assess_stored, cross_validate
    from mrrp_pacs.model.fusion import FusionConfig
    from mrrp_pacs.model.train import MODEL_KIND, TrainSettings

    def work() -> None:
        _, cohort = _cohort(state, db_path, outcomes, table, schema)
        version = _version_at(model_dir, MODEL_KIND)
        if folds is None:
            split = cohort.split
            if (split == "test").any():
                cohort = cohort.subset(np.flatnonzero(split == "test"))
            metrics = assess_stored(version, cohort, out_dir, seed=seed)
        else:
            manifest = version.manifest
            settings = TrainSettings(**manifest["training"]["settings"])
            architecture = FusionConfig.from_dict(manifest["architecture"])
            left_out = int((cohort.split == "test").sum())
            click.echo(f"cross-validating on {len(cohort.records) - left_out} patients; "
                       f"{left_out} of split=test left out", err=True)
            with _progress(folds * repeats, "fold") as bar:
                metrics = cross_validate(cohort, architecture, settings, out_dir, folds=folds,
                                         repeats=repeats, seed=seed, progress=bar.update)
        left = (f", {metrics['left_out_test']} split=test rows left out"
                if "left_out_test" in metrics else "")
        click.echo(f"{out_dir / 'metrics.json'}: n {metrics['n']}, events {metrics['events']}, "
                   f"C-index {metrics['c_index']}{left}")

    _guarded(work)


@main.group()
def models() -> None:
    """List, show, verify and promote stored models."""


def _store_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path),
                        default=None, help="Model store folder (default: [paths] model_store)."
                        )(command)


@models.command("list")
@_store_option
@click.pass_obj
def models_list(state: _Context, store_dir: Path | None) -> None:
    """Every stored model version, the promoted one marked."""
    from model_store import ModelStore

    def work() -> None:
        store = ModelStore(store_dir or state.config().paths.model_store_dir)
        found = False
        for kind in sorted(p.name for p in store.root.iterdir() if p.is_dir()) \
                if store.root.is_dir() else []:
            for name in store.names(kind):
                promoted = store.promoted(kind, name)
                for version in store.versions(kind, name):
                    found = True
                    mark = "*" if version == promoted else " "
                    click.echo(f"{mark} {kind}/{name}@{version}")
        if not found:
            click.echo(f"no models in {store.root}")

    _guarded(work)


@models.command("show")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def models_show(path: Path) -> None:
    """Print a version's manifest (PATH: its folder, a model's folder or a store holding one
    model: the promoted version, else the newest)."""

    def work() -> None:
        version = _version_at(path)
        shown = {k: v for k, v in version.manifest.items()
                 if k not in ("training_outcomes", "baseline_hazard",
                              "training_risk_percentiles")}
        click.echo(json.dumps(shown, indent=2, sort_keys=True))

    _guarded(work)


@models.command("verify")
@_store_option
@click.pass_obj
def models_verify(state: _Context, store_dir: Path | None) -> None:
    """Check every stored version: its manifest against manifest.sha256, then the SHA-256 of
    every file it lists."""
    from model_store import ModelStore
    from mrrp_pacs.errors import ModelStoreError

    store = ModelStore(store_dir or state.config().paths.model_store_dir)
    failed = 0
    kinds = sorted(p.name for p in store.root.iterdir() if p.is_dir()) if store.root.is_dir() \
        else []
    for kind in kinds:
        for name in store.names(kind):
            for version in store.versions(kind, name):
                try:
                    store.load(kind, name, version)
                    click.echo(f"ok    {kind}/{name}@{version}")
                except ModelStoreError as exc:
                    failed += 1
                    click.echo(f"FAIL  {kind}/{name}@{version}: {exc}")
    if failed:
        sys.exit(1)


@models.command("promote")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def models_promote(path: Path) -> None:
    """Make the version in PATH the one scoring uses (a model's folder: its newest version
    unless one is promoted)."""
    from model_store import ModelStore

    def work() -> None:
        version = _version_at(path)
        ModelStore(version.path.parents[2]).promote(version.kind, version.name, version.version)
        click.echo(f"promoted {version.label}")

    _guarded(work)


@main.command()
@DB_OPTION
@click.option("--outcomes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="CSV patient_id,time_months,event,split.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Folder for ablation.md and ablation.json.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-epochs", type=click.IntRange(min=1), default=60, show_default=True)
@click.option("--arms", default="", help="Comma-separated arm names to run (default: every "
              "arm; see docs/model.md), e.g. 'full,clinical only'.")
@click.option("--baselines/--no-baselines", default=True, show_default=True,
              help="Also fit the Cox, elastic-net and random-forest baselines on the same split.")
@click.pass_obj
def ablate(state: _Context, db_path: Path | None, outcomes: Path, out_dir: Path, seeds: int,
           max_epochs: int, arms: str, baselines: bool) -> None:
    """Rerun the paper's ablations on a train/test split, with paired intervals."""
    from mrrp_pacs.model.ablation import ARMS, run_ablation, trainings, write_ablation
    from mrrp_pacs.model.baselines import fit_baselines
    from mrrp_pacs.model.train import TrainSettings

    wanted = [name.strip() for name in arms.split(",") if name.strip()]
    known = {arm.name: arm for arm in ARMS}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise click.BadParameter(f"unknown arm(s) {unknown}; known: {', '.join(known)}",
                                 param_hint="--arms")
    chosen = tuple(known[name] for name in wanted) if wanted else ARMS

    def work() -> None:
        _, cohort = _cohort(state, db_path, outcomes, None, None)
        with _progress(trainings(chosen) * seeds, "model") as bar:
            try:
                result = run_ablation(cohort, TrainSettings(max_epochs=max_epochs),
                                      seeds=seeds, arms=chosen,
                                      baselines=fit_baselines if baselines else None,
                                      progress=bar.update)
            except ValueError as exc:
                raise click.ClickException(str(exc)) from None
        write_ablation(result, out_dir)
        click.echo((out_dir / "ablation.md").read_text())

    _guarded(work)


@main.group()
def benchmark() -> None:
    """Benchmarks on public data."""


@benchmark.command("gbsg2")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-epochs", type=click.IntRange(min=1), default=60, show_default=True,
              help="Most epochs MRRP's inner cross-validation tries.")
@click.option("--export", "export_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Also write gbsg2.csv + gbsg2_schema.toml (for train --table).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON result.")
def benchmark_gbsg2(folds: int, repeats: int, seed: int, max_epochs: int,
                    export_dir: Path | None, as_json: bool) -> None:
    """GBSG2: clinical-only MRRP vs Cox PH vs random survival forest, same CV splits."""
    from mrrp_pacs.model import gbsg2
    from mrrp_pacs.model.train import TrainSettings, config_for, predict, train

    def fit(train_part: Any, test_part: Any) -> Any:
        trained = train(train_part, config_for(train_part),
                        TrainSettings(seed=seed, max_epochs=max_epochs))
        return predict(trained.model, test_part)

    def work() -> None:
        if export_dir is not None:
            table, schema = gbsg2.export_table(export_dir)
            click.echo(f"wrote {table} and {schema}", err=True)
        with _progress(folds * repeats, "split") as bar:
            result = gbsg2.run_benchmark(folds, repeats, seed, fit_mrrp=fit,
                                         progress=bar.update)
        if as_json:
            click.echo(json.dumps(result, indent=2))
            return
        click.echo(f"GBSG2, {result['splits']['n']} patients, {result['splits']['events']} "
                   f"events, {repeats}x{folds}-fold CV (seed {seed}), Harrell C on held-out folds")
        for name, values in result["models"].items():
            click.echo(f"  {name:<6} {values['c_index_mean']:.4f} ± {values['c_index_sd']:.4f}")
        for name, values in result["paired"].items():
            click.echo(f"  {name}: {values['mean']:+.4f} ± {values['sd']:.4f} per split, MRRP "
                       f"at least as high on {values['mrrp_at_least_as_high']} of "
                       f"{values['splits']} splits")

    _guarded(work)


def _scoring_run(state: _Context, db_path: Path | None, everyone: bool, as_json: bool) -> None:
    from mrrp_pacs.daemon import Pipeline, components_from_config

    def work() -> None:
        config = state.config(db_path)
        components = components_from_config(config)
        with StateLock(config.paths.lock_file, "rescore" if everyone else "score"):
            pipeline = Pipeline(config, exporter=components.exporter)
            try:
                bar = _progress(0, "patient")

                def progress(done: int, total: int) -> None:
                    bar.total = total
                    bar.update(done - bar.n)

                with bar:
                    summary = pipeline.process(everyone=everyone, progress=progress)
            finally:
                pipeline.close()
        if summary.no_model:  # recorded as a failed job, so it fails here too
            message = (f"no model {config.scoring.model} in the model store "
                       f"{config.paths.model_store_dir} yet: nothing was scored ({summary.due} "
                       f"ready, {summary.waiting} waiting for a modality, "
                       f"{summary.incomplete} incomplete); train one first "
                       "(docs/operator-guide.md §5)")
            if not as_json:
                raise click.ClickException(message)
            click.echo(json.dumps({**summary.as_dict(), "error": message}, indent=2))
            sys.exit(1)
        if as_json:
            click.echo(json.dumps(summary.as_dict(), indent=2))
            return
        queued = summary.queued
        click.echo(f"model {summary.model}: {summary.due} due, {summary.scored} scored "
                   f"(new or changed), {summary.unchanged} unchanged, {summary.failed} "
                   f"failed; {summary.waiting} waiting for a modality, {summary.incomplete} "
                   f"incomplete; queued {queued.get('sr', 0)} SR, {queued.get('pdf', 0)} PDF")

    _guarded(work)


@main.command()
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.pass_obj
def score(state: _Context, db_path: Path | None, as_json: bool) -> None:
    """Score the ready cases that received something new (what the daemon does on its
    interval): extract their features, score with the promoted model, queue the SR and PDF.

    Exit status 1, with the counts, when there is no model yet."""
    _scoring_run(state, db_path, everyone=False, as_json=as_json)


@main.command()
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.pass_obj
def rescore(state: _Context, db_path: Path | None, as_json: bool) -> None:
    """Run the nightly rescoring once: every ready case with the promoted model.

    Only patients whose score changes (new model, new data) get a new score and SR. Exit
    status 1, with the counts, when there is no model yet."""
    _scoring_run(state, db_path, everyone=True, as_json=as_json)


@main.command()
@DB_OPTION
@click.option("--dicom-port", type=click.IntRange(1, 65535), default=None,
              help="Override [dicom] port.")
@click.option("--mllp-port", type=click.IntRange(1, 65535), default=None,
              help="Override [hl7] port.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=None,
              help="Override [http] port (0 = off).")
@click.option("--ae-title", default=None, help="Override [dicom] ae_title.")
@click.option("--allow-ae", "allow_aes", multiple=True,
              help="Calling AE title allowed to send besides [pacs] ae_title (repeatable; "
                   "replaces [dicom] allowed_aes).")
@click.pass_obj
def serve(state: _Context, db_path: Path | None, dicom_port: int | None,
          mllp_port: int | None, http_port: int | None, ae_title: str | None,
          allow_aes: tuple[str, ...]) -> None:
    """Run the daemon: DICOM and MLLP listeners, PACS pull, scoring, export, nightly rescore.

    Without a config file it runs on built-in defaults (state under ./mrrp-data). Stops
    cleanly on SIGTERM or Ctrl-C; a restart resumes where it stopped."""
    from mrrp_pacs.daemon import Daemon, components_from_config

    def work() -> None:
        config = state.config(db_path)
        overrides: dict[str, dict[str, Any]] = {
            "dicom": {"port": dicom_port, "ae_title": ae_title,
                      "allowed_aes": list(allow_aes) or None},
            "hl7": {"port": mllp_port}, "http": {"port": http_port}}
        for section, values in overrides.items():
            given = {k: v for k, v in values.items() if v is not None}
            if given:
                config = config.replace(section, **given)
        config.check()
        if config.exports_with_public_secret:
            raise click.ClickException(
                f"{config.source}: [export] uid_secret is the public default "
                f"{config.export.uid_secret!r}: anyone who knows a patient key could compute "
                "the Tracking UID of the results this daemon exports. Set [export] uid_secret "
                "(or MRRP__EXPORT__UID_SECRET) to a long random string, e.g. `python3 -c "
                "'import secrets; print(secrets.token_hex(32))'`, and keep it with the "
                "backups; or set [export] enabled = false")
        daemon = Daemon(config, components_from_config(config))

        def announce() -> None:
            click.echo(f"mrrp-pacs serving: DICOM {config.dicom.ae_title}@{config.dicom.bind}:"
                       f"{config.dicom.port}, MLLP {config.hl7.bind}:{config.hl7.port}"
                       + (f", http {config.http.bind}:{config.http.port}" if config.http.port
                          else "") + f"; database {config.paths.db_file}", err=True)

        daemon.run_until_signalled(announce)

    _guarded(work)


@main.command("export")
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.pass_obj
def export_results(state: _Context, db_path: Path | None, as_json: bool) -> None:
    """Send what the outbox holds to the PACS, once (what the daemon does on its interval)."""
    from mrrp_pacs.daemon import Pipeline, components_from_config

    def work() -> None:
        config = state.config(db_path)
        components = components_from_config(config)
        if components.drain is None:
            raise click.ClickException("no export destination: set [export] host or [pacs] "
                                       "host (and export.enabled = true)")
        # no state lock: the outbox claims each row before sending it, so a drain beside the
        # daemon's sends nothing twice (mrrp_pacs/statelock.py)
        pipeline = Pipeline(config, drain=components.drain)
        try:
            summary = pipeline.export()
        finally:
            pipeline.close()
        click.echo(json.dumps(summary.as_dict()) if as_json else
                   f"sent {summary.sent}, retried later {summary.retried}, dead "
                   f"{summary.dead}, skipped {summary.skipped}")

    _guarded(work)


@main.group()
def outbox() -> None:
    """The queue of results to send: list it, retry dead rows."""


@outbox.command("list")
@DB_OPTION
@click.option("--state", "states", multiple=True, type=click.Choice(["pending", "sent", "dead"]),
              help="Only rows in this state (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_obj
def outbox_list(state: _Context, db_path: Path | None, states: tuple[str, ...],
                as_json: bool) -> None:
    """One line per queued object: id, state, kind, destination, attempts, last error."""
    from dataclasses import asdict

    from exporters.outbox import Outbox

    def work() -> None:
        with _open_store(state.config(db_path)) as store:
            box = Outbox(store)
            rows = box.rows(states or None)
            counts = box.counts()
        if as_json:
            click.echo(json.dumps([asdict(r) for r in rows], indent=2))
            return
        for row in rows:
            click.echo(row.summary())
        click.echo(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "outbox empty")

    _guarded(work)


@outbox.command("retry")
@DB_OPTION
@click.option("--id", "ids", multiple=True, type=int, help="Row id to send again (repeatable).")
@click.option("--all-dead", is_flag=True, help="Every dead row.")
@click.pass_obj
def outbox_retry(state: _Context, db_path: Path | None, ids: tuple[int, ...],
                 all_dead: bool) -> None:
    """Queue rows again (attempts reset); the next export sends them."""
    from exporters.outbox import Outbox

    if bool(ids) == all_dead:
        raise click.UsageError("give --id N (repeatable) or --all-dead")

    def work() -> None:
        with _open_store(state.config(db_path)) as store:
            try:
                queued = Outbox(store).retry(list(ids) or None)
            except ValueError as exc:
                raise click.ClickException(str(exc)) from None
        click.echo(f"queued again: {', '.join(map(str, queued)) or 'nothing'}")

    _guarded(work)


@main.group()
def hl7() -> None:
    """HL7 v2 tools."""


@hl7.command("send")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--host", default=None,
              help="Listener address (default: [hl7] bind, 127.0.0.1 when that is a wildcard).")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="Listener port (default: [hl7] port of the configuration).")
@click.option("--timeout", "timeout_s", type=float, default=30.0, show_default=True,
              help="Seconds to wait for each acknowledgement.")
@click.option("--tls/--no-tls", "use_tls", default=None,
              help="MLLP over TLS, with the [tls] certificates (default: when the configured "
                   "listener is TLS only; then the default port is [hl7] tls_port).")
@click.pass_obj
def hl7_send(state: _Context, files: tuple[Path, ...], host: str | None, port: int | None,
             timeout_s: float, use_tls: bool | None) -> None:
    """Send HL7 files (one or more messages each) over MLLP on one connection; print each
    acknowledgement. Exit status 1 when any message is not accepted (AA).

    Without --host/--port it sends to the MLLP listener of the configuration (--config)."""
    from exporters.mllp_client import send_files

    def work() -> None:
        from mrrp_pacs.tls import client_context

        config = state.config()
        listener = config.hl7
        over_tls = use_tls if use_tls is not None else listener.tls and not listener.plain
        results = send_files(list(files), host or local_address(listener.bind),
                             port or (listener.tls_port if over_tls else listener.port),
                             timeout_s, client_context(config.tls) if over_tls else None)
        for path, ack in results:
            line = f"{path.name}: {ack.control_id or '-'} {ack.code or 'no answer'}"
            click.echo(f"{line} {ack.error}" if ack.error else line)
        if not all(ack.accepted for _, ack in results):
            sys.exit(1)

    _guarded(work)


@main.command()
@click.option("--orthanc", "orthanc_url", default=None,
              help="DICOMweb-enabled Orthanc to show, e.g. http://127.0.0.1:8042 (default: "
                   "start one on the demo's storage, see --demo).")
@click.option("--demo", "demo_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("demo-output"), show_default=True,
              help="Folder of a `mrrp-pacs demo` run whose Orthanc storage is served.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=3000, show_default=True)
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A name browsers use for this viewer besides 127.0.0.1/localhost and "
                   "--host (repeatable); requests naming any other Host are refused.")
def viewer(orthanc_url: str | None, demo_dir: Path, host: str, port: int,
           allowed_hosts: tuple[str, ...]) -> None:
    """Serve the OHIF viewer (same origin as Orthanc's DICOMweb) to look at the results: the
    SR drawn on the ultrasound lesion and the PDF report. Ctrl-C stops it."""
    import signal
    import threading
    from contextlib import ExitStack

    from mrrp_pacs.private_orthanc import DICOMWEB_PLUGIN, running_orthanc
    from mrrp_pacs.viewer import ViewerServer, viewer_files

    try:
        files = viewer_files()
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    with ExitStack() as stack:
        if orthanc_url is None:
            storage = demo_dir.absolute() / "orthanc"
            if not (storage / "index").exists():
                raise click.ClickException(f"{storage} holds no Orthanc storage: run `make demo` "
                                           "first, or give --orthanc URL")
            orthanc = _guarded(lambda: stack.enter_context(running_orthanc(
                storage, "ORTHANC", plugins=[DICOMWEB_PLUGIN])))
            orthanc_url = orthanc.url
        server = ViewerServer(files.dist_dir, files.app_config, orthanc_url, host, port,
                              allowed_hosts)
        server.start()
        stack.callback(server.stop)
        click.echo(f"OHIF viewer on {server.study_list_url} (Orthanc {orthanc_url}); "
                   "Ctrl-C stops it")
        stop.wait()


@main.command()
@DB_OPTION
@click.pass_obj
def doctor(state: _Context, db_path: Path | None) -> None:
    """Check every precondition of the daemon: configuration, disk, database, models, encoder
    weights, ports, PACS (C-ECHO). One line each with what to do; exit status 1 if any fails
    (warnings, e.g. the default uid_secret, do not)."""
    from mrrp_pacs.doctor import run_checks

    def work() -> None:
        checks = run_checks(state.config(db_path))
        for check in checks:
            click.echo(check.line())
        failed = sum(not c.ok for c in checks)
        warned = sum(c.ok and c.warning for c in checks)
        click.echo(f"{len(checks) - failed - warned} ok, {warned} warnings, {failed} failed")
        if failed:
            sys.exit(1)

    _guarded(work)


@main.command()
@DB_OPTION
@click.pass_obj
def migrate(state: _Context, db_path: Path | None) -> None:
    """Create or upgrade the database schema.

    Every command also does this when it opens the database."""

    def work() -> None:
        config = state.config(db_path)
        with _open_store(config) as store:
            click.echo(f"{config.paths.db_file}: schema version {store.schema_version}")

    _guarded(work)


@main.command("config")
@DB_OPTION
@click.pass_obj
def show_config(state: _Context, db_path: Path | None) -> None:
    """Validate the configuration and print it as TOML (secrets redacted).

    The output loads back with --config to the same configuration, secrets aside."""

    def work() -> None:
        config = state.config(db_path)
        click.echo(f"# from {config.source} and MRRP__* environment variables; valid TOML for "
                   "--config (paths resolved).\n# Secrets are redacted (commented out): put "
                   "them back before using this as a configuration file.")
        click.echo(config_toml(config))
        paths = config.paths
        click.echo(f"# database: {paths.db_file}\n# objects:  {paths.objects_dir}\n"
                   f"# models:   {paths.model_store_dir}\n# scheduler job store: "
                   f"{paths.scheduler_db}")

    _guarded(work)


@main.command()
@click.option("--patients", type=click.IntRange(min=1), required=True, help="Cohort size.")
@click.option("--seed", type=int, required=True, help="Random seed (same seed, same bytes).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="New or empty folder to write into.")
@click.option("--slide-px", type=int, default=4096, show_default=True,
              help="Slide width and height in pixels at 0.5 µm/px (a 0.25 µm/px site scans "
              "the same section with twice as many).")
@click.option("--missing-wsi", type=float, default=0.1, show_default=True,
              help="Fraction of patients without a slide.")
@click.option("--missing-us", type=float, default=0.1, show_default=True,
              help="Fraction without an ultrasound image and ROI.")
@click.option("--missing-report", type=float, default=0.1, show_default=True,
              help="Fraction without an ultrasound report.")
@click.option("--event-fraction", type=float, default=None,
              help="Fraction of patients with a recurrence observed within follow-up (the "
              "Weibull scale is calibrated to it; images do not change).  [default: 0.16]")
@click.option("--test-fraction", type=float, default=None,
              help="Fraction held out as the test split (stratified by event; images do not "
              "change).  [default: 1/6]")
@click.option("--signal", default="", help="Modality weights of the true hazard, e.g. "
              "wsi=1,us=0.6,text=0.5,clinical=0.6 (those are the defaults).")
@click.option("--sites", type=click.IntRange(min=1), default=1, show_default=True,
              help="Hospitals the patients are spread over, each with its own stain, glass, "
              "scanner (0.25 or 0.5 µm/px), JPEG quality and ultrasound machine.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: one per CPU core).")
@click.option("--json", "as_json", is_flag=True, help="Print phantom.json's content.")
def phantom(patients: int, seed: int, out_dir: Path, slide_px: int, missing_wsi: float,
            missing_us: float, missing_report: float, event_fraction: float | None,
            test_fraction: float | None, signal: str, sites: int, workers: int | None,
            as_json: bool) -> None:
    """Generate a synthetic hospital (DICOM, HL7, truth).

    Outcomes follow a known hazard whose signal is rendered into the slides, ultrasound
    images, report words and clinical values; phantom.json records the oracle C-index."""
    import time

    from mrrp_pacs.phantom.generator import PhantomSpec, generate, parse_signal

    outcomes = {name: value for name, value in (("event_fraction", event_fraction),
                                                 ("test_fraction", test_fraction))
                if value is not None}  # unset: the cohort model's defaults
    try:
        spec = PhantomSpec(patients=patients, seed=seed, slide_px=slide_px,
                           missing_wsi=missing_wsi, missing_us=missing_us,
                           missing_report=missing_report, signal=parse_signal(signal),
                           sites=sites, **outcomes)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    started = time.perf_counter()
    try:
        with _progress(patients, "patient") as bar:
            summary = generate(spec, out_dir, workers=workers, progress=bar.update)
    except FileExistsError as exc:
        raise click.ClickException(str(exc)) from None
    elapsed = time.perf_counter() - started
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    files = summary["files"]
    assert isinstance(files, dict)
    click.echo(f"phantom of {patients} patients (seed {seed}) written to {out_dir} in "
               f"{elapsed:.1f} s: {files['dicom']} DICOM files, {files['hl7']} HL7 messages")
    oracle = summary["oracle_c_index"]
    click.echo(f"events {summary['events']} ({summary['event_fraction']:.1%}); test split "
               f"{summary['n_test']} patients, {summary['events_test']} events; oracle C-index "
               f"(test) {'n/a (no test events)' if oracle is None else f'{oracle:.3f}'}")


@main.command()
@click.option("--patients", type=click.IntRange(min=16), default=120, show_default=True,
              help="Size of the synthetic hospital.")
@click.option("--seed", type=int, default=1, show_default=True, help="Phantom seed.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("demo-output"), show_default=True,
              help="Folder for everything the demo writes (replaced on a re-run).")
@click.option("--slide-px", type=click.IntRange(min=512), default=4096, show_default=True,
              help="Phantom slide size in pixels at 0.5 µm/px.")
@click.option("--file-drop", is_flag=True,
              help="Skip Orthanc and the network: ingest the files directly.")
@click.option("--json", "as_json", is_flag=True, help="Print summary.json's content.")
def demo(patients: int, seed: int, out_dir: Path, slide_px: int, file_drop: bool,
         as_json: bool) -> None:
    """Run the main job end to end on a synthetic hospital: a private Orthanc, the daemon
    pulling studies and receiving HL7, training, scoring, SR + PDF back into Orthanc."""
    from mrrp_pacs.demo import DemoSettings, c_index_text, run_demo

    bars: dict[str, tqdm] = {}

    def progress(step: str, done: int, total: int) -> None:
        bar = bars.get(step)
        if bar is None:
            bar = bars[step] = _progress(total, "item")
            bar.set_description(step)
        bar.total = max(total, done)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    settings = DemoSettings(patients=patients, seed=seed, out_dir=out_dir, slide_px=slide_px,
                            use_orthanc=not file_drop)
    if click.get_current_context().find_root().params.get("log_level") is None:
        # numbered steps and progress bars tell the story; --log-level INFO shows the detail
        logging.getLogger().setLevel(logging.WARNING)

    def work() -> dict[str, Any]:
        try:
            return run_demo(settings, lambda line: click.echo(line, err=True), progress)
        finally:
            for bar in bars.values():
                bar.close()

    summary = _guarded(work)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    events = summary["test_events"]
    rows = [("mode", summary["mode"]),
            ("patients received", summary["received"]),
            ("patients scored", summary["scored"]),
            ("scored with a missing modality compensated", summary["compensated"]),
            ("SRs stored in the PACS (found by C-FIND)",
             f"{summary['srs_stored']} of {summary['srs_queued']} written (one per study "
             "reported on)"),
            (f"test C-index ({summary['test_patients']} held-out patients)",
             c_index_text(summary["test_c_index"], summary["test_c_index_ci95"], events)),
            ("phantom oracle C-index (true hazard, same patients)",
             c_index_text(summary["oracle_c_index"], summary["oracle_c_index_ci95"], events)),
            ("model", summary["model"])]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name.ljust(width)}  {value}")
    click.echo(f"reports (every SR and PDF): {summary['reports']}\n"
               f"example PDF: {summary['example_pdf']}\n"
               f"plots: {Path(summary['reports']).parent / 'evaluation'}\n"
               f"summary: {out_dir / 'summary.json'}; database: {summary['database']}")


@main.group("quarantine")
def quarantine_group() -> None:
    """Input refused for its content (HL7 answered AE, a DICOM object replacing one stored
    from another source): list, show, reprocess.

    Not the patients held back after failed scoring (those are in `mrrp-pacs cases`)."""


@quarantine_group.command("list")
@DB_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Show only the newest N rows.")
@click.pass_obj
def quarantine_list(state: _Context, db_path: Path | None, as_json: bool,
                    limit: int | None) -> None:
    """Refused input kept, newest first: id, time, kind, peer, reason, size (no content)."""
    from mrrp_pacs.intake import refused

    def work() -> None:
        with _open_store(state.config(db_path)) as store:
            items = refused.listing(store, limit)
        if as_json:
            click.echo(json.dumps([
                {"id": i.id, "received_at": i.received_at, "kind": i.kind,
                 "listener": i.listener, "peer": i.peer, "reason": i.reason,
                 "size_bytes": i.size_bytes, "kept_bytes": i.kept_bytes,
                 "reprocessed_at": i.reprocessed_at, "reprocess_outcome": i.reprocess_outcome}
                for i in items], indent=2))
            return
        header = ["id", "received", "kind", "peer", "size", "state", "reason"]
        rows = [[str(i.id), i.received_at, f"{i.kind}/{i.listener}", i.peer or "-",
                 str(i.size_bytes) + ("" if i.complete else f" (first {i.kept_bytes} kept)"),
                 f"reprocessed: {i.reprocess_outcome}" if i.reprocess_outcome else "held",
                 i.reason] for i in items]
        _print_table(header, rows)
        click.echo(f"{len(items)} refused inputs kept")

    _guarded(work)


@quarantine_group.command("show")
@click.argument("row_id", metavar="ID", type=int)
@DB_OPTION
@click.option("--raw", is_flag=True,
              help="Also print the message as received (it may hold patient data).")
@click.pass_obj
def quarantine_show(state: _Context, row_id: int, db_path: Path | None, raw: bool) -> None:
    """One refused input: why, from where, when; with --raw the bytes themselves."""
    from mrrp_pacs.intake import refused

    def work() -> None:
        with _open_store(state.config(db_path)) as store:
            item = refused.get(store, row_id)
            data = refused.raw_bytes(store, item) if raw else b""
        click.echo(f"id:       {item.id}\nkind:     {item.kind} (via {item.listener})\n"
                   f"peer:     {item.peer or '-'}\nreceived: {item.received_at}\n"
                   f"size:     {item.size_bytes} bytes"
                   + ("" if item.complete else f", only the first {item.kept_bytes} kept")
                   + f"\nreason:   {item.reason}")
        if item.reprocessed_at:
            click.echo(f"reprocessed: {item.reprocessed_at}: {item.reprocess_outcome} "
                       f"({item.reprocess_note})")
        if not raw:
            click.echo("(the message itself may hold patient data: --raw prints it)")
            return
        click.echo("--- raw message ---")
        if item.kind == "hl7":
            text = data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
            click.echo(text.rstrip("\n"))
        else:
            click.echo(f"({len(data)} bytes of DICOM; not printed as text)")

    _guarded(work)


@quarantine_group.command("reprocess")
@click.argument("row_id", metavar="ID", type=int, required=False)
@click.option("--all", "every", is_flag=True, help="Every row not yet reprocessed.")
@DB_OPTION
@click.pass_obj
def quarantine_reprocess(state: _Context, row_id: int | None, every: bool,
                         db_path: Path | None) -> None:
    """Run refused input through intake again with the current configuration (e.g. after
    fixing [identity] hl7_assigning_authority). Each row is reprocessed once, and marked
    with its outcome."""
    from mrrp_pacs.intake import Intake, refused

    if (row_id is None) == (not every):
        raise click.UsageError("give one ID or --all")

    def work() -> None:
        config = state.config(db_path)
        with _open_store(config) as store:
            intake = Intake(store, config)
            ids = refused.pending(store) if every else [row_id]
            counts: dict[str, int] = {}
            for each in ids:
                assert each is not None
                result = refused.reprocess(intake, each)
                counts[str(result.outcome)] = counts.get(str(result.outcome), 0) + 1
                done = refused.get(store, each)
                click.echo(f"{each}: {result.outcome}: {done.reprocess_note}")
        click.echo(f"{len(ids)} reprocessed" + (": " + ", ".join(
            f"{n} {o}" for o, n in sorted(counts.items())) if counts else ""))

    _guarded(work)

@main.command("audit")
@DB_OPTION
@click.option("--since", metavar="ISO", default=None,
              help="Only rows at or after this time (ISO 8601; without a zone: UTC), e.g. "
                   "2026-01-31 or 2026-01-31T08:00:00Z.")
@click.option("--patient", metavar="KEY", default=None,
              help="Only rows of this patient key (as `mrrp-pacs cases` lists it).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Only the newest N rows.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.pass_obj
def audit_command(state: _Context, db_path: Path | None, since: str | None,
                  patient: str | None, limit: int | None, as_json: bool) -> None:
    """The audit trail, oldest first: when, event (received, refused, scored, exported,
    export-failed), who, what, patient key. Kept for [audit] keep_days (0 = forever)."""
    from datetime import UTC, datetime

    from mrrp_pacs import audit

    since_at = None
    if since is not None:
        try:
            since_at = datetime.fromisoformat(since)
        except ValueError:
            raise click.BadParameter(f"{since!r} is not an ISO 8601 date or time",
                                     param_hint="--since") from None
        if since_at.tzinfo is None:
            since_at = since_at.replace(tzinfo=UTC)

    def work() -> None:
        with _open_store(state.config(db_path)) as store:
            rows = audit.listing(store, since=since_at, patient=patient, limit=limit)
        if as_json:
            click.echo(json.dumps([vars(r) for r in rows], indent=2))
            return
        _print_table(["id", "at", "event", "who", "what", "patient", "detail"],
                     [[str(r.id), r.at, r.event, r.who, r.what, r.patient_key or "-",
                       r.detail or ""] for r in rows])
        click.echo(f"{len(rows)} audit rows")

    _guarded(work)


if __name__ == "__main__":  # pragma: no cover
    main()
