"""Time HoVer-Net (random weights, tiatoolbox's architecture) per patch and per nuclei tile.

Run: ``.venv/bin/python benchmarks/bench_hovernet.py [mode] [repeats] [threads]`` (defaults
fast, 3, 1). Prints the median seconds of one forward pass on one patch (256 px for ``fast``,
270 for ``original``), of decoding its NP/HV/TP maps, and what one ``nuclei`` tile costs at
0.25 µm/px: a 112 µm tile (the default 224 px at 0.5 µm/px) with the segmenter's context, in
patches and seconds. Random weights make the maps meaningless but the cost is the real one.
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch

from mrrp_pacs.features.hovernet import (
    LAYOUTS,
    NUCLEUS_MARGIN_UM,
    HoVerNet,
    instance_types,
    instances_from_np_hv,
)

MODEL_MPP = 0.25
TILE_UM = 224 * 0.5


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "fast"
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layout = LAYOUTS[mode]
    model = HoVerNet(6 if mode == "fast" else None, mode).eval()
    x = torch.rand(1, 3, layout.input_px, layout.input_px) * 255
    forward = []
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(x)
            forward.append(time.perf_counter() - start)
    np_prob = torch.softmax(out["np"], dim=1)[0, 1].numpy()
    hv = out["hv"][0].permute(1, 2, 0).numpy()
    decode = []
    for _ in range(repeats):
        start = time.perf_counter()
        labels = instances_from_np_hv(np_prob, hv)
        if "tp" in out:
            instance_types(labels, out["tp"][0].argmax(0).numpy(), 6)
        decode.append(time.perf_counter() - start)
    side_px = round(TILE_UM / MODEL_MPP) + 2 * math.ceil(
        (layout.margin_px * MODEL_MPP + NUCLEUS_MARGIN_UM) / MODEL_MPP)
    patches = math.ceil(side_px / layout.output_px) ** 2
    per_patch = statistics.median(forward)
    print(f"HoVer-Net {mode}, {threads} thread(s), {repeats} repeats: forward "
          f"{per_patch:.2f} s/patch ({layout.input_px} px), decoding "
          f"{statistics.median(decode):.3f} s/patch")
    print(f"one nuclei tile at {MODEL_MPP} µm/px: {TILE_UM:.0f} µm + context = {side_px} px, "
          f"{patches} patches, ~{patches * per_patch:.0f} s")


if __name__ == "__main__":
    main()
