"""Time :func:`mrrp_pacs.phantom.wsi_dicom.write_wsi_pyramid` on one CPU core.

Prints the median wall time of a few writes of a textured RGB slide per size, with the level
count and bytes written. Run: ``.venv/bin/python benchmarks/bench_wsi_dicom.py [repeats]``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mrrp_pacs.phantom.wsi_dicom import SlideIdentity, write_wsi_pyramid

SIZES_PX = (4096, 8192)
MPP = 0.25

IDENTITY = SlideIdentity(
    patient_id="P0001", issuer_of_patient_id="PHANTOM", patient_name="PHANTOM^P0001",
    patient_birth_date="19680412", patient_sex="F", study_instance_uid="1.2.3.4",
    accession_number="PA0001", study_id="1", study_date="20240311", study_time="093000",
    uid_seed="bench", container_identifier="P0001-A1",
)


def textured(side: int) -> np.ndarray:
    """A (side, side, 3) uint8 texture that compresses about as well as H&E tissue does."""
    axis = np.arange(side, dtype=np.float32)
    wave = np.sin(axis / 9.0)[None, :] * np.cos(axis / 13.0)[:, None]
    rgb = np.stack([200 + 40 * wave, 150 + 60 * wave.T, np.full_like(wave, 210)], axis=-1)
    noise = np.random.default_rng(0).normal(0.0, 3.0, rgb.shape).astype(np.float32)
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def main(repeats: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # the target is one core
    for side in SIZES_PX:
        image = textured(side)
        times = []
        with tempfile.TemporaryDirectory() as tmp:
            for run in range(repeats):
                start = time.perf_counter()
                paths = write_wsi_pyramid(image, MPP, IDENTITY, Path(tmp) / str(run))
                times.append(time.perf_counter() - start)
            size_mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{side}x{side}: median {statistics.median(times):.3f} s over {repeats} runs "
              f"(min {min(times):.3f}, max {max(times):.3f}), {len(paths)} levels, "
              f"{size_mb:.1f} MB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
