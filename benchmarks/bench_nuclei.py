"""Time nucleus segmentation + morphology on phantom H&E tiles; refit the nucleus type model.

Run: ``.venv/bin/python benchmarks/bench_nuclei.py [tiles] [repeats]`` (defaults 64, 5).
Cuts ``tiles`` 224-px tiles (0.5 µm/px) centred on tumour nuclei of phantom slides, then prints
the median throughput in tiles/s of ``ClassicalSegmenter.segment`` + ``nucleus_features`` +
``patch_token`` over ``repeats`` passes in one process (one core), for the tile alone and for
the tile read with 16 µm of context (the border policy that measures edge nuclei whole).

``--calibrate`` instead refits the nucleus type model on phantom slides of the calibration seeds
(:data:`CALIBRATION_SEEDS`, disjoint from every seed the tests evaluate on) and rewrites
``mrrp_pacs/data/nucleus_types.toml``.
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mrrp_pacs.features.morphology import nucleus_features, patch_token
from mrrp_pacs.features.nuclei import (
    TYPING_MEASUREMENTS,
    ClassicalSegmenter,
    NucleusTypeModel,
    SegmentedNuclei,
    match_detections,
    measure_instances,
)
from mrrp_pacs.features.stain import estimate_stain
from mrrp_pacs.phantom.cohort import TRAITS
from mrrp_pacs.phantom.histology import TUMOUR, render_slide

TILE_PX = 224
MPP = 0.5
CALIBRATION_SEEDS = range(1000, 1060)
CALIBRATION_SLIDE_PX = 1536
MATCH_RADIUS_UM = 4.0
CONTEXT_UM = 16.0  # margin read around a tile so that edge nuclei are measured whole
MODEL_PATH = Path(__file__).resolve().parents[1] / "mrrp_pacs" / "data" / "nucleus_types.toml"


def tumour_tiles(count: int, margin_px: int = 0, seed: int = 0, slide_px: int = 2048
                 ) -> list[np.ndarray]:
    """``count`` tiles centred on random tumour nuclei of default-trait slides, each with
    ``margin_px`` of context on every side."""
    traits = dict.fromkeys(TRAITS, 0.0)
    side = TILE_PX + 2 * margin_px
    tiles: list[np.ndarray] = []
    while len(tiles) < count:
        rng = np.random.default_rng(seed)
        slide = render_slide(rng, traits, size_px=slide_px, mpp=MPP)
        tumour = np.flatnonzero(slide.nuclei.kind == TUMOUR)
        for i in rng.choice(tumour, min(16, count - len(tiles)), replace=False):
            x0, y0 = tile_origin(slide.nuclei.x_px[i], slide.nuclei.y_px[i], slide_px, side)
            tiles.append(slide.rgb[y0 : y0 + side, x0 : x0 + side])
        seed += 1
    return tiles


def tile_origin(x_px: float, y_px: float, slide_px: int, side: int = TILE_PX
                ) -> tuple[int, int]:
    """Top-left corner of the ``side``-px square centred on (x, y), kept on the slide."""
    return (int(np.clip(x_px - side // 2, 0, slide_px - side)),
            int(np.clip(y_px - side // 2, 0, slide_px - side)))


def throughput(tiles: list[np.ndarray], repeats: int, margin_px: int) -> str:
    """Median tiles/s of segmentation + morphology + token, and the segmentation share."""
    segmenter = ClassicalSegmenter()
    side = TILE_PX + 2 * margin_px
    rates, segment_share = [], []
    nuclei = 0
    for _ in range(repeats):
        segment_s = morphology_s = 0.0
        nuclei = 0
        for rgb in tiles:
            start = time.perf_counter()
            segmented = segmenter.segment(rgb, MPP)
            middle = time.perf_counter()
            features, _ = nucleus_features(rgb, segmented, MPP)
            own = segmented.centred_in(margin_px, margin_px, side - margin_px, side - margin_px)
            patch_token(features[own], segmented.kinds[own], ~segmented.touches_border[own])
            segment_s += middle - start
            morphology_s += time.perf_counter() - middle
            nuclei += int(own.sum())
        rates.append(len(tiles) / (segment_s + morphology_s))
        segment_share.append(segment_s / (segment_s + morphology_s))
    return (f"median {statistics.median(rates):5.1f} tiles/s over {repeats} passes (min "
            f"{min(rates):.1f}, max {max(rates):.1f}), {nuclei / len(tiles):.0f} nuclei/tile, "
            f"segmentation+typing {100 * statistics.median(segment_share):.0f} % of the time")


def benchmark(tile_count: int, repeats: int) -> None:
    print(f"nuclei + morphology + patch token, {tile_count} tiles of {TILE_PX} px at {MPP} µm/px "
          "centred on tumour nuclei, one process (one core):")
    print(f"  tile alone          {throughput(tumour_tiles(tile_count), repeats, 0)}")
    margin = round(CONTEXT_UM / MPP)
    context = throughput(tumour_tiles(tile_count, margin), repeats, margin)
    print(f"  with {CONTEXT_UM:.0f} µm context {context}")


def jpeg_round_trip(rgb: np.ndarray) -> np.ndarray:
    """What the phantom's WSI pyramid stores: JPEG quality 90, 4:2:2 chroma."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90, subsampling=1)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def calibration_set() -> tuple[np.ndarray, np.ndarray]:
    """Measurements and true types of segmented nuclei on the calibration slides.

    Each slide draws its traits from N(0, 1.3²) so the extremes are covered; eight tiles per
    slide, four centred on tumour nuclei and four on any nucleus (stroma, ducts, lymphocyte
    aggregates), every other one through JPEG; one stain estimate per slide from its eight
    tiles (as the pipeline estimates it from a slide's tiles). Slides are drawn with the
    phantom's default (Ruifrok–Johnston) stain only: the other sites' stains stay unseen. A
    segment takes the type of the true nucleus it matches within 4 µm; unmatched segments are
    left out.
    """
    rows, kinds = [], []
    for seed in CALIBRATION_SEEDS:
        rng = np.random.default_rng(seed)
        traits = {name: float(rng.normal()) * 1.3 for name in TRAITS}
        slide = render_slide(rng, traits, size_px=CALIBRATION_SLIDE_PX, mpp=MPP)
        truth = slide.nuclei
        centres = np.concatenate([rng.choice(np.flatnonzero(truth.kind == TUMOUR), 4),
                                  rng.choice(len(truth), 4)])
        tiles, origins = [], []
        for t, i in enumerate(centres):
            x0, y0 = tile_origin(truth.x_px[i], truth.y_px[i], CALIBRATION_SLIDE_PX)
            rgb = slide.rgb[y0 : y0 + TILE_PX, x0 : x0 + TILE_PX]
            tiles.append(jpeg_round_trip(rgb) if t % 2 else rgb)
            origins.append((x0, y0))
        stain = estimate_stain(np.stack(tiles))  # per slide, from its tiles, as the pipeline
        for rgb, (x0, y0) in zip(tiles, origins, strict=True):
            labels, x = measure_instances(rgb, MPP, stain)
            found = SegmentedNuclei.from_labels(labels, np.zeros(len(x), np.int8))
            true_xy = np.stack([truth.x_px - x0, truth.y_px - y0], axis=1)
            match = match_detections(found.centroids_px, true_xy, MATCH_RADIUS_UM / MPP)
            rows.append(x[match.pairs[:, 0]])
            kinds.append(truth.kind[match.pairs[:, 1]])
    return np.concatenate(rows), np.concatenate(kinds).astype(int)


def calibrate() -> None:
    x, kinds = calibration_set()
    model = NucleusTypeModel.fit(x, kinds)
    accuracy = float((model.predict(x) == kinds).mean())
    counts = ", ".join(f"{n} {name}" for name, n in
                       zip(("tumour", "inflammatory", "stromal", "normal"),
                           np.bincount(kinds, minlength=4), strict=True))
    provenance = (
        "Nucleus type model of ClassicalSegmenter (mrrp_pacs.features.nuclei.NucleusTypeModel):\n"
        "softmax regression over the standardised measurements and their pairwise products.\n"
        "Written by `python benchmarks/bench_nuclei.py --calibrate`; do not edit by hand.\n"
        f"Fitted on phantom slides of seeds {CALIBRATION_SEEDS.start}-"
        f"{CALIBRATION_SEEDS.stop - 1} ({CALIBRATION_SLIDE_PX} px at {MPP} µm/px, traits drawn\n"
        f"from N(0, 1.3²)), 8 tiles of {TILE_PX} px per slide (4 on tumour nuclei, 4 on any "
        "nucleus,\nevery other one through JPEG q90 4:2:2), stain estimated per slide from its 8 "
        "tiles;\nsegments matched to drawn nuclei "
        f"within {MATCH_RADIUS_UM} µm:\n{counts}. Training accuracy {accuracy:.3f}.\n"
        "Tests evaluate on other seeds (0-99).")
    MODEL_PATH.write_text(model.to_toml(provenance), encoding="utf-8")
    print(provenance)
    print(f"wrote {MODEL_PATH} ({len(TYPING_MEASUREMENTS)} measurements)")


def main() -> None:
    if sys.argv[1:] == ["--calibrate"]:
        calibrate()
        return
    tile_count = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    benchmark(tile_count, repeats)


if __name__ == "__main__":
    main()
