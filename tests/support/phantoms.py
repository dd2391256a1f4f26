"""Phantom specifications shared by tests (small: seconds to write)."""

from mrrp_pacs.phantom.generator import PhantomSpec

SMALL = PhantomSpec(patients=6, seed=3, slide_px=1024, missing_wsi=0.3, missing_us=0.3,
                    missing_report=0.3)


def extracted_phantom(root, spec, max_tiles, clock=None):
    """Write ``spec`` under ``root``, ingest it, train the US encoder, extract every family.

    ``clock`` stamps the ingest (``received_at``); default the wall clock.

    Returns ``(db_args, env, extract_summary)``: ``db_args`` = ["--db", file] for CLI calls,
    ``env`` the environment that sets this run's tiling. Models go to the model store of the
    state folder, ``models/`` beside the database, where every ``--db`` command finds them.
    """
    import json

    from click.testing import CliRunner

    from listeners.file_drop import ingest_paths
    from mrrp_pacs.cli import main
    from mrrp_pacs.config import load_config
    from mrrp_pacs.intake import Intake
    from mrrp_pacs.phantom.generator import generate
    from mrrp_pacs.store import Store

    generate(spec, root / "phantom", workers=2)
    config = load_config(None, environ={}).with_db(root / "state" / "db.sqlite3")
    with Store(config.paths.db_file, config.paths.objects_dir,
               **({"clock": clock} if clock is not None else {})) as store:
        ingest_paths(Intake(store, config), [root / "phantom" / "dicom", root / "phantom" / "hl7"])
    env = {"MRRP__FEATURES__MAX_TILES": str(max_tiles), "MRRP__FEATURES__WORKERS": "2"}
    db = ["--db", str(config.paths.db_file)]
    runner = CliRunner()
    encoder = runner.invoke(main, ["train-encoder", "us", "--epochs", "2", *db], env=env)
    assert encoder.exit_code == 0, encoder.output
    extracted = runner.invoke(main, ["extract", "--json", *db], env=env)
    assert extracted.exit_code == 0, extracted.output
    return db, env, json.loads(extracted.stdout)
