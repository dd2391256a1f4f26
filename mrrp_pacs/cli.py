"""The ``mrrp-pacs`` command line. Each subcommand is thin: it wires config, store and the
module that does the work, and turns known failures into a message and an exit code."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from mrrp_pacs import __version__
from mrrp_pacs.config import SECTIONS, Config, ConfigError, load_config
from mrrp_pacs.logs import configure_logging
from mrrp_pacs.store import SchemaError, Store

DB_OPTION = click.option(
    "--db", "db_path", type=click.Path(dir_okay=False, path_type=Path),
    help="SQLite database file (overrides [paths] db; objects are kept beside it).",
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


def _guarded(work: Callable[[], Any]) -> Any:
    """Run ``work``, turning expected operational failures into one clear message."""
    try:
        return work()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except SchemaError as exc:
        raise click.ClickException(f"database schema: {exc}") from None
    except sqlite3.Error as exc:
        raise click.ClickException(
            f"the database cannot be used ({exc}); check the path, free disk space and that "
            "no other program holds it locked") from None
    except OSError as exc:
        raise click.ClickException(f"{exc.filename or 'a file'}: {exc.strerror}") from None


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
@click.pass_obj
def cases(state: _Context, db_path: Path | None, as_json: bool) -> None:
    """List patients, their modalities and readiness."""
    from mrrp_pacs.cases import MODALITIES, list_cases
    from mrrp_pacs.clinical_schema import load_schema

    def work() -> None:
        config = state.config(db_path)
        n_variables = len(load_schema(config.clinical.schema_file).variables)
        with _open_store(config) as store:
            found = list_cases(store, config)
        if as_json:
            click.echo(json.dumps([c.as_dict() for c in found], indent=2))
            return
        header = ["patient", *MODALITIES, "ready"]
        rows = [[c.patient_key,
                 *[("yes" if m in c.modalities else "-") if m != "clinical"
                   else f"{len(c.clinical_variables)}/{n_variables}" for m in MODALITIES],
                 "READY" if c.ready else "waiting"] for c in found]
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
        click.echo(f"{len(found)} patients, {sum(c.ready for c in found)} ready")

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
    """Validate the configuration and print it."""

    def work() -> None:
        config = state.config(db_path)
        click.echo(f"# from {config.source} and MRRP__* environment variables")
        for name in SECTIONS:
            section = getattr(config, name)
            click.echo(f"[{name}]")
            for f in fields(section):
                click.echo(f"{f.name} = {_toml_value(getattr(section, f.name))}")
            click.echo("")
        paths = config.paths
        click.echo(f"# database: {paths.db_file}\n# objects:  {paths.objects_dir}\n"
                   f"# models:   {paths.model_store_dir}")

    _guarded(work)


def _toml_value(value: Any) -> str:
    if value is None:
        return '""  # default'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


if __name__ == "__main__":  # pragma: no cover
    main()
