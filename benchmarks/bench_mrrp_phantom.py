"""The MRRP model on an extracted phantom: ablation arms, baselines and ceilings, paired.

Run::

    .venv/bin/python benchmarks/bench_mrrp_phantom.py --db STATE/mrrp.sqlite3 \\
        --phantom PHANTOM_DIR --out OUT [--event-fraction 0.4] [--test-fraction 0.3333] \\
        [--seeds 3] [--max-epochs 60] [--arms 'full,clinical only,...'] [--no-tune]

The phantom folder's ``phantom.json`` gives the cohort (patients, seed, signal, missing
fractions); the outcomes are re-drawn with ``--event-fraction`` and ``--test-fraction``, which
change no trait, clinical value or pixel (``mrrp_pacs.phantom.cohort``), so a phantom written
and extracted once serves any outcome setting. The US encoder must have been trained on the
training patients of that split only (``mrrp-pacs train-encoder us --outcomes OUT/outcomes.csv``;
the script refuses an encoder whose manifest does not say so).

Writes ``OUT/outcomes.csv``, ``OUT/ablation.md`` and ``OUT/ablation.json`` (every arm, the
Cox / elastic-net / random-forest baselines on the extracted features, the oracle and the
correctly specified Cox on the true traits, each with a paired bootstrap interval against
"full") and prints the table and the wall time.

The documented benchmark cohort (docs/model.md): 1,024 patients, seed 1, 1024-px slides,
40 % events, a third held out::

    mrrp-pacs phantom --patients 1024 --seed 1 --slide-px 1024 --out ph1
    mrrp-pacs ingest ph1 --db st1/mrrp.sqlite3
    python benchmarks/bench_mrrp_phantom.py --db st1/mrrp.sqlite3 --phantom ph1 --out b1 \\
        --outcomes-only
    mrrp-pacs train-encoder us --db st1/mrrp.sqlite3 --outcomes b1/outcomes.csv
    mrrp-pacs extract --db st1/mrrp.sqlite3
    python benchmarks/bench_mrrp_phantom.py --db st1/mrrp.sqlite3 --phantom ph1 --out b1
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from mrrp_pacs.config import load_config
from mrrp_pacs.model.ablation import ARMS, run_ablation, write_ablation
from mrrp_pacs.model.baselines import PhantomTruth, fit_baselines, truth_baselines
from mrrp_pacs.model.dataset import cohort_from_store, read_outcomes
from mrrp_pacs.model.train import TrainSettings
from mrrp_pacs.phantom.generator import written_cohort
from mrrp_pacs.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--phantom", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--event-fraction", type=float, default=0.4)
    parser.add_argument("--test-fraction", type=float, default=1 / 3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--arms", default="", help="comma-separated arm names (default all)")
    parser.add_argument("--no-tune", action="store_true",
                        help="one early-stopped fit per arm instead of inner CV + refit")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--extracted-only", action="store_true",
                        help="use only the patients whose every expected family is extracted "
                        "(a run while extraction is still going)")
    parser.add_argument("--outcomes-only", action="store_true",
                        help="write OUT/outcomes.csv and stop (before training the encoder)")
    args = parser.parse_args()

    drawn = written_cohort(args.phantom, event_fraction=args.event_fraction,
                           test_fraction=args.test_fraction)
    _check_same_patients(drawn, args.phantom / "truth.csv")
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes = args.out / "outcomes.csv"
    with outcomes.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["patient_id", "time_months", "event", "split"])
        for i, pid in enumerate(drawn.ids):
            writer.writerow([pid, f"{drawn.time_months[i]:.1f}", int(drawn.event[i]),
                             drawn.split[i]])
    test = drawn.split == "test"
    print(f"{drawn.n} patients, {drawn.event.mean():.1%} events; test {int(test.sum())} "
          f"patients, {int(drawn.event[test].sum())} events; oracle (test) "
          f"{drawn.oracle_c_index:.4f}; outcomes in {outcomes}")
    if args.outcomes_only:
        return

    config = load_config(None, environ={}).with_db(args.db)
    rows = read_outcomes(outcomes)
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        if args.extracted_only:
            done = _extracted(store, drawn)
            rows = {pid: row for pid, row in rows.items() if pid in done}
            print(f"{len(rows)} of {drawn.n} patients have every expected family extracted")
        cohort = cohort_from_store(store, config, rows)
    _check_encoder(config, int(test.sum()))
    split = cohort.split
    train_ids = [r.patient_id for r, s in zip(cohort.records, split, strict=True) if s != "test"]
    test_ids = [r.patient_id for r, s in zip(cohort.records, split, strict=True) if s == "test"]
    truth = PhantomTruth.from_phantom(drawn)
    references = truth_baselines(truth, train_ids, test_ids)
    wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
    arms = tuple(a for a in ARMS if not wanted or a.name in wanted)
    settings = replace(TrainSettings(max_epochs=args.max_epochs), tune=not args.no_tune)
    started = time.perf_counter()
    result = run_ablation(cohort, settings, seeds=args.seeds, arms=arms,
                          baselines=fit_baselines, references=references,
                          n_resamples=args.resamples,
                          progress=lambda n: print(".", end="", flush=True))
    result["wall_seconds"] = round(time.perf_counter() - started)
    spec = json.loads((args.phantom / "phantom.json").read_text())["spec"]
    result["phantom"] = {"patients": drawn.n, "seed": spec["seed"], "signal": spec["signal"],
                         "event_fraction": args.event_fraction,
                         "test_fraction": args.test_fraction,
                         "oracle_c_index_whole_test_split": round(drawn.oracle_c_index, 4),
                         "patients_with_features": len(cohort.records)}
    write_ablation(result, args.out)
    print()
    print((args.out / "ablation.md").read_text())
    print(f"{result['wall_seconds']} s for {len(arms)} arms x {args.seeds} seed(s)")


def _check_same_patients(drawn: object, truth_csv: Path) -> None:
    """The re-drawn cohort has the traits the phantom's pixels were rendered from."""
    with truth_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    traits = drawn.traits  # type: ignore[attr-defined]
    for name, values in traits.items():
        written = np.array([float(r[f"latent_{name}"]) for r in rows])
        if not np.allclose(written, values, atol=1e-5):
            raise SystemExit(f"{truth_csv}: trait {name} differs from the re-drawn cohort: "
                             "the phantom was written by other code")


def _extracted(store: Store, drawn: object) -> set[str]:
    """Patient ids whose every family their phantom inputs allow is in the store."""
    found: dict[str, set[str]] = {}
    for key, family in store.conn.execute(
            "SELECT patient_key, family FROM features WHERE superseded_by IS NULL"):
        found.setdefault(key.split("^")[0], set()).add(family)
    done = set()
    for i, pid in enumerate(drawn.ids):  # type: ignore[attr-defined]
        expected = {"clinical"}
        if drawn.has_wsi[i]:  # type: ignore[attr-defined]
            expected |= {"wsi", "nuclei"}
        if drawn.has_us[i]:  # type: ignore[attr-defined]
            expected |= {"us", "radiomics"}
        if drawn.has_report[i]:  # type: ignore[attr-defined]
            expected.add("text")
        if expected <= found.get(pid, set()):
            done.add(pid)
    return done


def _check_encoder(config: object, test_patients: int) -> None:
    from model_store import ModelStore
    from mrrp_pacs.features.us_encoder import US_ENCODER_KIND

    paths = config.paths  # type: ignore[attr-defined]
    name = config.features.us_encoder  # type: ignore[attr-defined]
    version = ModelStore(paths.model_store_dir).load(US_ENCODER_KIND, name)
    provenance = version.manifest.get("training", {}).get("provenance", {})
    held_out = provenance.get("held_out_test_patients")
    if held_out != test_patients:
        raise SystemExit(f"the US encoder {version.label} left out {held_out} test patients, "
                         f"the split has {test_patients}: train it with --outcomes "
                         "OUT/outcomes.csv and extract again")


if __name__ == "__main__":
    main()
