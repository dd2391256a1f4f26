"""Radiomics shape features on drawn lesion outlines vs on their boxes, on a phantom cohort.

Run: ``.venv/bin/python benchmarks/bench_lesion_masks.py [patients] [sites] [seed]``
(defaults 32, 1, 15). Writes a phantom with ultrasound only (no slides, no reports) to a
temporary folder, then per patient reads what the daemon reads: ``us/image.dcm`` and the
sonographer's ROI SR ``us/lesion-roi.dcm`` (a traced outline as a closed POLYLINE), through
:func:`mrrp_pacs.features.us_roi.lesions_from_sr` and
:func:`mrrp_pacs.features.us_image.read_ultrasound` (the frame drawn on). PyRadiomics runs
twice per lesion with the default settings: on the outline mask, and on the mask's box (the
flagged fallback). Prints, for each, every shape2D feature's |Spearman ρ| with the truth
column ``latent_us_margin``, the best one, and the median seconds per extraction.

Done-when target (issue 15): best shape feature ρ ≥ 0.9 with outline masks.
"""

from __future__ import annotations

import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from scipy import stats

from mrrp_pacs.features.radiomics import radiomics_tokens
from mrrp_pacs.features.us_image import read_ultrasound
from mrrp_pacs.features.us_roi import box_lesion, largest_lesion, lesions_from_sr
from mrrp_pacs.phantom.generator import PhantomSpec, generate


def shape_features(gray: np.ndarray, mask: np.ndarray, pixel_mm: tuple[float, float]
                   ) -> tuple[dict[str, float], float]:
    start = time.perf_counter()
    tokens, token_names, feature_names = radiomics_tokens(gray, mask, pixel_mm)
    seconds = time.perf_counter() - start
    row = token_names.index("original_shape2D")
    names = feature_names[row]
    return ({name.removeprefix("original_shape2D_"): float(v)
             for name, v in zip(names, tokens[row, : len(names)], strict=True)}, seconds)


def main(patients: int = 32, sites: int = 1, seed: int = 15) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-lesion-") as folder:
        out = Path(folder) / "phantom"
        start = time.perf_counter()
        generate(PhantomSpec(patients=patients, seed=seed, slide_px=512, missing_wsi=1.0,
                             missing_us=0.0, missing_report=1.0, sites=sites), out, workers=1)
        print(f"phantom: {patients} patients, {sites} site(s), seed {seed}: "
              f"{time.perf_counter() - start:.1f} s")
        with (out / "truth.csv").open() as handle:
            truth = {row["patient_id"]: float(row["latent_us_margin"])
                     for row in csv.DictReader(handle)}
        margins: list[float] = []
        rows: dict[str, list[dict[str, float]]] = {"outline": [], "box": []}
        seconds: dict[str, list[float]] = {"outline": [], "box": []}
        fill = []
        for patient_dir in sorted((out / "dicom").iterdir()):
            image_ds = pydicom.dcmread(patient_dir / "us" / "image.dcm")
            sr = pydicom.dcmread(patient_dir / "us" / "lesion-roi.dcm")
            lesion = largest_lesion(lesions_from_sr(sr, image_ds))
            image = read_ultrasound(image_ds, frame=lesion.frame, roi=lesion.box)
            assert image.pixel_mm is not None
            box = box_lesion(lesion.box, lesion.mask.shape, "bench")
            fill.append(lesion.mask.sum() / box.mask.sum())
            for kind, mask in (("outline", lesion.mask), ("box", box.mask)):
                values, took = shape_features(image.gray, mask, image.pixel_mm)
                rows[kind].append(values)
                seconds[kind].append(took)
            margins.append(truth[patient_dir.name])
    print(f"lesions: {len(margins)}; outline fills {statistics.median(fill):.0%} of its box "
          "(median)")
    best = {}
    for kind in ("outline", "box"):
        names = list(rows[kind][0])
        rhos = {}
        for name in names:
            column = [row[name] for row in rows[kind]]
            rhos[name] = (abs(float(stats.spearmanr(column, margins).statistic))
                          if np.ptp(column) > 0 else 0.0)
        best[kind] = max(rhos.items(), key=lambda item: item[1])
        top = ", ".join(f"{n} {r:.2f}" for n, r in sorted(rhos.items(), key=lambda i: -i[1])[:5])
        print(f"{kind:8s} median {statistics.median(seconds[kind]):.2f} s/extraction; "
              f"top shape features |ρ|: {top}")
    print(f"best shape feature vs latent_us_margin: outline {best['outline'][0]} "
          f"|ρ| = {best['outline'][1]:.3f}   box fallback {best['box'][0]} "
          f"|ρ| = {best['box'][1]:.3f}   (target outline ≥ 0.9: "
          f"{'met' if best['outline'][1] >= 0.9 else 'NOT met'})")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
