"""Time and check the ultrasound branch on phantom frames.

Run: ``.venv/bin/python benchmarks/bench_us_radiomics.py [frames] [crops] [epochs]``
(defaults 48, 200, 6). Prints

- radiomics: median wall and CPU seconds per ROI (default settings, ROI box), and the planted
  signal: the best single feature's Spearman ρ with the latent ``us_margin`` trait and the top 5,
  for the ROI box and for a thresholded lesion mask;
- automatic ROI: share of frames whose automatic box overlaps the true one with IoU ≥ 0.3;
- encoder: crops/s of :func:`encode_crops` and the training time on ``crops`` crops.

Frames: ``render_frame(np.random.default_rng(i), traits, size_mm)``, the four US traits drawn
from N(0, 1) and the size from the cohort's log-normal (median 20 mm), true box as ROI.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
from scipy import ndimage, stats
from skimage.filters import threshold_otsu

from mrrp_pacs.errors import FeatureError
from mrrp_pacs.features.radiomics import radiomics_tokens
from mrrp_pacs.features.us_encoder import crop_roi, encode_crops, train_us_encoder
from mrrp_pacs.features.us_roi import automatic_lesion_candidate
from mrrp_pacs.phantom.ultrasound import UltrasoundFrame, render_frame

US_TRAITS = ("us_margin", "us_orientation", "us_shadowing", "us_heterogeneity")


def phantom_frame(i: int) -> tuple[UltrasoundFrame, dict[str, float]]:
    draw = np.random.default_rng(10_000 + i)
    traits = {name: float(draw.standard_normal()) for name in US_TRAITS}
    size_mm = float(np.clip(np.exp(np.log(20.0) + 0.45 * draw.standard_normal()), 5, 80))
    return render_frame(np.random.default_rng(i), traits, size_mm), traits


def lesion_mask(gray: np.ndarray, box: tuple[int, int, int, int], pixel_mm: float) -> np.ndarray:
    """Dark region inside the box: Otsu on the box smoothed with σ = 0.5 mm, largest component."""
    x0, y0, x1, y1 = box
    inside = ndimage.gaussian_filter(gray[y0 : y1 + 1, x0 : x1 + 1], 0.5 / pixel_mm)
    labels, count = ndimage.label(inside < threshold_otsu(inside))
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, range(1, count + 1))
    keep = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))
    mask = np.zeros(gray.shape, dtype=bool)
    mask[y0 : y1 + 1, x0 : x1 + 1] = keep
    return mask


def iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return w * h / (area - w * h)


def best_features(values: np.ndarray, names: list[str], target: list[float]
                  ) -> list[tuple[float, str]]:
    rhos = []
    for column, name in zip(values.T, names, strict=True):
        rho = stats.spearmanr(column, target).statistic if np.ptp(column) > 0 else 0.0
        rhos.append((0.0 if np.isnan(rho) else float(rho), name))
    return sorted(rhos, key=lambda r: -abs(r[0]))


def main(n_frames: int, n_crops: int, epochs: int) -> None:
    margins, auto_iou, auto_s, no_candidate = [], [], [], 0
    wall, cpu = [], []
    rows: dict[str, list[np.ndarray]] = {"box": [], "lesion mask": []}
    names: list[str] = []
    for i in range(n_frames):
        frame, traits = phantom_frame(i)
        gray = frame.pixels.astype(np.float32)
        margins.append(traits["us_margin"])
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        tokens, _, feature_names = radiomics_tokens(gray, frame.lesion_box_px, (0.1, 0.1))
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
        names = [n for token in feature_names for n in token]
        rows["box"].append(np.concatenate([t[: len(f)] for t, f in zip(tokens, feature_names,
                                                                         strict=True)]))
        mask = lesion_mask(gray, frame.lesion_box_px, frame.pixel_mm)
        tokens, _, _ = radiomics_tokens(gray, mask, (0.1, 0.1))
        rows["lesion mask"].append(np.concatenate([t[: len(f)] for t, f in
                                                   zip(tokens, feature_names, strict=True)]))
        start_wall = time.perf_counter()
        try:
            box = automatic_lesion_candidate(frame.pixels, (0.1, 0.1))
        except FeatureError:
            box = None  # no candidate: a miss
        auto_s.append(time.perf_counter() - start_wall)
        auto_iou.append(0.0 if box is None else iou(box, frame.lesion_box_px))
        no_candidate += box is None

    print(f"radiomics, {n_frames} phantom frames, 753 features (Original+Wavelet+LoG, 2D):")
    print(f"  median {statistics.median(wall):.3f} s wall, {statistics.median(cpu):.3f} s CPU "
          f"per ROI (max {max(wall):.3f} s wall)")
    for kind, values in rows.items():
        ranked = best_features(np.stack(values), names, margins)
        print(f"  {kind}: best |Spearman| vs us_margin {abs(ranked[0][0]):.3f}; top 5:")
        for rho, name in ranked[:5]:
            print(f"    {rho:+.3f} {name}")
    hits = np.mean(np.array(auto_iou) >= 0.3)
    print(f"automatic ROI: IoU >= 0.3 on {hits:.1%} of {n_frames} frames, median IoU "
          f"{statistics.median(auto_iou):.3f}, no candidate on {no_candidate}, median "
          f"{statistics.median(auto_s):.3f} s")

    crops = np.stack([crop_roi(frame.pixels.astype(np.float32), frame.lesion_box_px)
                      for frame, _ in (phantom_frame(i) for i in range(n_crops))])
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    model, history = train_us_encoder(crops, epochs=epochs, seed=0)
    print(f"encoder training, {n_crops} crops × {epochs} epochs: "
          f"{time.perf_counter() - start_wall:.1f} s wall, {time.process_time() - start_cpu:.1f} "
          f"s CPU; loss {history.losses[0]:.3f} → {history.losses[-1]:.3f}, rotation accuracy "
          f"{history.accuracies[-1]:.2f}")
    rates = []
    for _ in range(3):
        start_wall = time.perf_counter()
        encode_crops(model, crops[:64])
        rates.append(64 / (time.perf_counter() - start_wall))
    print(f"encoder inference: median {statistics.median(rates):.1f} crops/s (batches of 32)")


if __name__ == "__main__":
    arguments = [int(a) for a in sys.argv[1:]]
    main(*(arguments + [48, 200, 6][len(arguments):]))
