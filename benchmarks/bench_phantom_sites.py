"""Does the nucleus extraction survive a change of site? (issue 15, done-when figures)

Run: ``.venv/bin/python benchmarks/bench_phantom_sites.py [patients] [slide_px] [tiles]
[slide|tile]`` (defaults 24, 1536, 8, slide: the stain is estimated once per slide from all its
tiles, as the pipeline does; ``tile``: each tile alone).

Writes a 3-site phantom (``phantom --sites 3``: patients take turns over sites A, B, C, every
modality present), then per site reads ``tiles`` tiles per slide from the site's DICOM pyramid
at the extractor's resolution (``features.target_mpp``, 0.5 µm/px: base level 0.25 µm/px at
site B), each centred on a drawn tumour nucleus with 16 µm of context, and runs the
:class:`~mrrp_pacs.features.nuclei.ClassicalSegmenter` on them. Scoring follows
tests/mrrp_pacs/features/test_nuclei.py: each tile owns the detections centred in it; a drawn
nucleus centred in the tile is found by a detection within 4 µm
(:func:`~mrrp_pacs.features.nuclei.match_detections`); type accuracy is over found nuclei.
Prints per site:

- Spearman over the site's patients of the mean area of nuclei called tumour vs
  ``latent_nuclear_size`` (done when ≥ 0.9);
- type accuracy against the phantom's nuclei truth (done when ≥ 0.9);
- mean area of nuclei called tumour ("called"), of the detections matched to drawn tumour nuclei
  whatever their call ("matched"), and of the drawn tumour nuclei centred in the same tiles
  ("drawn": the biology differs between the sites' patients, a ratio to it removes that);
- the shift from site A of the called mean, raw and as called/drawn ratio, and of the
  matched/drawn ratio (done when < 5 %).
"""

from __future__ import annotations

import csv
import gzip
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr
from wsidicom import WsiDicom

from mrrp_pacs.config import load_config
from mrrp_pacs.features.nuclei import NUCLEUS_TYPES, ClassicalSegmenter, match_detections
from mrrp_pacs.phantom.generator import PhantomSpec, generate
from mrrp_pacs.phantom.sites import SITES

SEED = 15
TILE_UM = 112.0
CONTEXT_UM = 16.0
MATCH_RADIUS_UM = 4.0
TUMOUR = NUCLEUS_TYPES.index("tumour")


def read_truth(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drawn nuclei: centres in µm (x, y), type index, area in µm² (ellipse)."""
    with gzip.open(path, "rt") as handle:
        header = handle.readline()
        mpp = float(header.split(" at ")[1].split()[0])
        rows = list(csv.DictReader(handle))
    xy_um = np.array([[float(r["x_px"]), float(r["y_px"])] for r in rows]) * mpp
    kind = np.array([NUCLEUS_TYPES.index(r["type"]) for r in rows])
    area = np.array([np.pi / 4 * float(r["major_um"]) * float(r["minor_um"]) for r in rows])
    return xy_um, kind, area


def score_slide(folder: Path, truth: Path, tiles: int, mpp: float, segmenter: ClassicalSegmenter,
                rng: np.random.Generator, per_slide: bool = True) -> dict[str, object]:
    """Detections, typing and areas on ``tiles`` tiles of one slide read at ``mpp``; with
    ``per_slide`` the stain is estimated once over all the tiles, else on each tile alone."""
    xy_um, kind, drawn_area = read_truth(truth)
    tile_px = round(TILE_UM / mpp)
    margin_px = round(CONTEXT_UM / mpp)
    confusion = np.zeros((4, 4), int)
    called_tumour_area: list[float] = []
    drawn_tumour_area: list[float] = []
    matched_tumour_area: list[float] = []  # detections of drawn tumour nuclei, whatever called
    crops, origins = [], []
    with WsiDicom.open(folder) as wsi:
        side_um = wsi.size.width * wsi.mpp.width
        for i in rng.choice(np.flatnonzero(kind == TUMOUR), tiles, replace=False):
            lo = CONTEXT_UM
            hi = side_um - TILE_UM - CONTEXT_UM
            x0, y0 = np.clip(xy_um[i] - TILE_UM / 2, lo, hi)
            origin_um = np.array([x0, y0]) - CONTEXT_UM
            read_mm = (TILE_UM + 2 * CONTEXT_UM) / 1000
            crop = np.asarray(wsi.read_region_mpp(
                (float(origin_um[0]) / 1000, float(origin_um[1]) / 1000), mpp,
                (read_mm, read_mm), as_array=True))[..., :3]
            side = tile_px + 2 * margin_px
            crops.append(np.ascontiguousarray(crop[:side, :side]))
            origins.append(origin_um)
    if per_slide:  # as the pipeline does: one stain estimate from all the slide's tiles
        segmenter = segmenter.for_slide(np.stack(crops))
    for crop, origin_um in zip(crops, origins, strict=True):
        side = crop.shape[0]
        found = segmenter.segment(crop, mpp)
        own = found.centred_in(margin_px, margin_px, margin_px + tile_px, margin_px + tile_px)
        true_xy = (xy_um - origin_um) / mpp
        near = np.all((true_xy >= 0) & (true_xy < side), axis=1)
        inside = np.all((true_xy >= margin_px) & (true_xy < margin_px + tile_px), axis=1)
        match = match_detections(found.centroids_px[own], true_xy[near],
                                 MATCH_RADIUS_UM / mpp)
        hit = inside[near][match.pairs[:, 1]]
        true_kind = kind[near][match.pairs[hit, 1]]
        np.add.at(confusion, (true_kind, found.kinds[own][match.pairs[hit, 0]]), 1)
        pixels = np.bincount(found.labels.ravel(), minlength=len(found) + 1)[1:]
        called = own & (found.kinds == TUMOUR)
        called_tumour_area.extend((pixels[called] * mpp**2).tolist())
        found_tumour = match.pairs[hit][true_kind == TUMOUR, 0]
        matched_tumour_area.extend((pixels[own][found_tumour] * mpp**2).tolist())
        drawn_tumour_area.extend(drawn_area[inside & (kind == TUMOUR)].tolist())
    return {"confusion": confusion, "called": called_tumour_area, "drawn": drawn_tumour_area,
            "matched": matched_tumour_area}


def main() -> None:
    patients = int(sys.argv[1]) if len(sys.argv) > 1 else 24
    slide_px = int(sys.argv[2]) if len(sys.argv) > 2 else 1536
    tiles = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    per_slide = (sys.argv[4] if len(sys.argv) > 4 else "slide") != "tile"
    mpp = load_config(None, environ={}).features.target_mpp
    spec = PhantomSpec(patients=patients, seed=SEED, slide_px=slide_px, missing_wsi=0.0,
                       missing_us=0.0, missing_report=0.0, sites=3)
    segmenter = ClassicalSegmenter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "phantom"
        started = time.perf_counter()
        generate(spec, out, workers=2)
        print(f"3-site phantom of {patients} patients, {slide_px} px at 0.5 µm/px of section, "
              f"written in {time.perf_counter() - started:.0f} s; {tiles} tiles of {TILE_UM:g} "
              f"µm per slide read at {mpp} µm/px, segmenter {segmenter.name} "
              f"{segmenter.version}, stain estimated per {'slide' if per_slide else 'tile'}")
        with (out / "truth.csv").open() as handle:
            truth = list(csv.DictReader(handle))
        rows = []
        for site in SITES[:3]:
            mine = [r for r in truth if r["site"] == site.code]
            confusion = np.zeros((4, 4), int)
            per_patient, called, drawn, matched = [], [], [], []
            for row in mine:
                pid = row["patient_id"]
                scores = score_slide(out / "dicom" / pid / "slide",
                                     out / "truth" / "nuclei" / f"{pid}.csv.gz", tiles, mpp,
                                     segmenter, np.random.default_rng(int(pid[-5:])), per_slide)
                confusion += scores["confusion"]  # type: ignore[operator]
                called += scores["called"]  # type: ignore[operator]
                drawn += scores["drawn"]  # type: ignore[operator]
                matched += scores["matched"]  # type: ignore[operator]
                area = scores["called"]
                per_patient.append(float(np.mean(area)) if area else float("nan"))  # type: ignore[arg-type]
            latent = [float(r["latent_nuclear_size"]) for r in mine]
            rho = spearmanr(per_patient, latent, nan_policy="omit").statistic
            accuracy = np.trace(confusion) / max(confusion.sum(), 1)
            rows.append((site, len(mine), rho, accuracy, float(np.mean(called)) if called
                         else float("nan"), float(np.mean(matched)), float(np.mean(drawn)),
                         confusion))
        print(f"{'site':<5}{'stain':<18}{'µm/px':>6}{'q':>4}{'patients':>9}{'Spearman':>10}"
              f"{'type acc':>9}{'called µm²':>11}{'matched µm²':>12}{'drawn µm²':>10}"
              f"{'shift %':>8}{'ratio shift %':>14}{'matched ratio %':>16}")
        _, _, _, _, area_a, matched_a, drawn_a, _ = rows[0]
        for site, n, rho, accuracy, area, matched_mean, drawn_mean, _ in rows:
            shift = 100 * (area - area_a) / area_a
            ratio_shift = 100 * ((area / drawn_mean) / (area_a / drawn_a) - 1)
            matched_shift = 100 * ((matched_mean / drawn_mean) / (matched_a / drawn_a) - 1)
            print(f"{site.code:<5}{site.stain.source[:17]:<18}{site.scanner.mpp:>6}"
                  f"{site.scanner.jpeg_quality:>4}{n:>9}{rho:>10.3f}{accuracy:>9.3f}"
                  f"{area:>11.1f}{matched_mean:>12.1f}{drawn_mean:>10.1f}{shift:>8.1f}"
                  f"{ratio_shift:>14.1f}{matched_shift:>16.1f}")
        for site, *_, confusion in rows:
            print(f"site {site.code} confusion (rows drawn, columns called "
                  f"{'/'.join(NUCLEUS_TYPES)}): {confusion.tolist()}")
        print("done when: Spearman >= 0.9 and type accuracy >= 0.9 at every site; shift of the "
              "mean tumour nuclear area between sites < 5 %")


if __name__ == "__main__":
    main()
