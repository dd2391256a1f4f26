"""Throughput of the tile encoders on this machine's CPU, batch 16.

Prints median tiles/s over ``repeats`` batches (after one warm-up batch) for the embedded
hed-texture descriptor and for random-weight timm ViTs of the registry (ViT-S/16, ViT-B/16;
ViT-L/16 (UNI) with ``--large``), in float32 and under bfloat16 autocast, with the thread
count and the load average so a busy machine shows. hed-texture also gets tiles per CPU
second, which a busy machine does not change much.

Run: ``.venv/bin/python benchmarks/bench_tile_encoders.py [repeats] [--large]`` (default 5).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from mrrp_pacs.features.encoders import (
    TimmEncoder,
    build_encoder,
    create_timm_model,
    load_registry,
)
from mrrp_pacs.phantom.histology import render_slide

BATCH = 16
TRAITS = {"nuclear_size": 0.0, "pleomorphism": 0.0, "tumour_density": 0.0, "lymphocytes": 0.0,
          "lymph_clustering": 0.0}


def phantom_batch() -> np.ndarray:
    """16 tiles of 224 px on a 4 × 4 grid over the centre of a 1024-px phantom slide."""
    rgb = render_slide(np.random.default_rng(0), TRAITS, size_px=1024).rgb
    corners = range(150, 750, 150)
    return np.stack([rgb[r : r + 224, c : c + 224] for r in corners for c in corners])


def median_rates(encode: Callable[[np.ndarray, float], np.ndarray], tiles: np.ndarray,
                 repeats: int) -> tuple[float, float]:
    """Median tiles per wall second and per CPU second of ``encode(tiles, 0.5)``."""
    encode(tiles, 0.5)  # warm-up: allocator, oneDNN kernels, FFT plans
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        encode(tiles, 0.5)
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return len(tiles) / statistics.median(wall), len(tiles) / statistics.median(cpu)


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    repeats = int(args[0]) if args else 5
    names = ["kaiko-vits16", "kaiko-vitb16"] + (["uni"] if "--large" in sys.argv else [])
    tiles = phantom_batch()
    print(f"batch {BATCH} tiles of 224 px at 0.5 µm/px; {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; median of "
          f"{repeats}")

    hed = build_encoder("hed-texture")
    wall, cpu = median_rates(hed.encode, tiles, repeats)
    print(f"{'hed-texture':14s} {hed.dim:5d}-d  {wall:7.1f} tiles/s  ({cpu:.1f} per CPU second)")

    registry = load_registry()
    for name in names:
        spec = registry[name]
        torch.manual_seed(0)
        model = create_timm_model(spec)
        rates = []
        for bf16 in (False, True):
            encoder = TimmEncoder(spec, model, "random", bf16=bf16, batch_size=BATCH)
            rates.append(median_rates(encoder.encode, tiles, repeats)[0])
        print(f"{name:14s} {spec.dim:5d}-d  {rates[0]:7.1f} tiles/s fp32  {rates[1]:7.1f} bf16  "
              f"({spec.architecture}, random weights)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
