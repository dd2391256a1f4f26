"""Time the phantom hospital: the whole command, and each stage of one patient.

Run: ``.venv/bin/python benchmarks/bench_phantom.py [patients] [repeats]`` (defaults 40, 5).
Prints the wall time of ``generate`` for ``patients`` at the default slide size with one
worker per core, then per-stage medians over ``repeats`` single-process patients.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom

from mrrp_pacs.phantom.dicom_objects import (
    Demographics,
    StudyInfo,
    lesion_roi_report,
    tumour_region_annotation,
    ultrasound_image,
)
from mrrp_pacs.phantom.generator import PhantomSpec, generate
from mrrp_pacs.phantom.histology import render_slide
from mrrp_pacs.phantom.ultrasound import render_frame
from mrrp_pacs.phantom.wsi_dicom import SlideIdentity, write_wsi_pyramid

TRAITS = {"nuclear_size": 0.0, "pleomorphism": 0.0, "tumour_density": 0.0, "lymphocytes": 0.0,
          "lymph_clustering": 0.0, "us_margin": 0.0, "us_orientation": 0.0,
          "us_shadowing": 0.0, "us_heterogeneity": 0.0, "vascularity": 0.0}


def stage_medians(repeats: int, folder: Path) -> dict[str, float]:
    timings: dict[str, list[float]] = {}

    @contextmanager
    def timed(name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        timings.setdefault(name, []).append(time.perf_counter() - start)

    who = Demographics("B1", "PHANTOM", "PHANTOM^B1", "19700101", "F")
    study = StudyInfo("1.2.4", "US1", "1", "20200101", "090000", "US")
    for i in range(repeats):
        rng = np.random.default_rng(i)
        with timed("render slide 4096 px"):
            slide = render_slide(rng, TRAITS)
        identity = SlideIdentity("B1", "PHANTOM", "PHANTOM^B1", "19700101", "F", "1.2.3",
                                 "PA1", "1", "20200101", "090000", f"bench{i}", "B1-A1")
        with timed("write WSI pyramid"):
            levels = write_wsi_pyramid(slide.rgb, 0.5, identity, folder / f"slide{i}")
        level0 = pydicom.dcmread(levels[0], stop_before_pixels=True)
        with timed("annotation object"):
            tumour_region_annotation(level0, slide.tumour_polygon_px, "R", f"b{i}")
        with timed("render ultrasound"):
            frame = render_frame(rng, TRAITS, 20.0)
        with timed("US image object"):
            image = ultrasound_image(frame.pixels, frame.pixel_mm, who, study, "R", f"b{i}")
        with timed("ROI SR object"):
            lesion_roi_report(image, frame.lesion_box_px, f"b{i}")
    return {name: statistics.median(values) for name, values in timings.items()}


def main() -> None:
    patients = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = generate(PhantomSpec(patients=patients, seed=1), Path(tmp) / "phantom")
        elapsed = time.perf_counter() - start
        size_mb = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file()) / 1e6
        print(f"phantom --patients {patients} --seed 1 (slide 4096 px, {os.cpu_count()} "
              f"workers): {elapsed:.1f} s, {elapsed / patients:.2f} s/patient, "
              f"{size_mb:.0f} MB written")
        print(f"  oracle C-index (test) {summary['oracle_c_index']}, events {summary['events']}")
        for name, seconds in stage_medians(repeats, Path(tmp)).items():
            print(f"  median {name:<22} {seconds * 1000:7.0f} ms  (one process, {repeats} runs)")


if __name__ == "__main__":
    main()
