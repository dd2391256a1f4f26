"""Time the report text family: model load and embedding one phantom report with ``minilm``.

Run: ``.venv/bin/python benchmarks/bench_text.py [repeats] [loads]`` (defaults 20, 3).
Prints medians of: importing torch + transformers and building the encoder (weights hashed,
model loaded) in ``loads`` fresh processes; findings extraction; embedding the findings of one
phantom report (``report_text(default_rng(0), ...)``) over ``repeats`` calls, with torch's
default thread count and with one thread. The load average is printed because other work on
the machine changes the multi-threaded figure most.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from mrrp_pacs.features.text import build_text_encoder, findings
from mrrp_pacs.phantom.cohort import TRAITS
from mrrp_pacs.phantom.messages import report_text

_COLD_LOAD = """
import json, time
start = time.perf_counter()
import torch, transformers
imported = time.perf_counter()
from mrrp_pacs.features.text import build_text_encoder
encoder = build_text_encoder("minilm")
built = time.perf_counter()
encoder.embed("Oval hypoechoic mass with circumscribed margins.")
embedded = time.perf_counter()
print(json.dumps({"import": imported - start, "build": built - imported,
                  "first embed": embedded - built}))
"""


def cold_loads(loads: int) -> dict[str, float]:
    runs: dict[str, list[float]] = {}
    for _ in range(loads):
        out = subprocess.run([sys.executable, "-c", _COLD_LOAD], capture_output=True, text=True,
                             check=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        for key, value in json.loads(out.stdout.strip().splitlines()[-1]).items():
            runs.setdefault(key, []).append(value)
    return {key: statistics.median(values) for key, values in runs.items()}


def median_s(repeats: int, call: Callable[[], object]) -> float:
    call()  # warm-up: first call allocates
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    loads = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for key, value in cold_loads(loads).items():
        print(f"{key:>28}: {value:8.3f} s  (median of {loads} fresh processes)")

    traits = dict.fromkeys(TRAITS, 0.0)
    report = "\n".join(report_text(np.random.default_rng(0), traits, 18.0, "R"))
    text = findings(report)
    encoder = build_text_encoder("minilm")
    n_tokens = encoder.embed(text).shape[0]
    print(f"{'findings extraction':>28}: {median_s(repeats, lambda: findings(report)) * 1e6:8.1f}"
          " µs")
    default_threads = torch.get_num_threads()
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        seconds = median_s(repeats, lambda: encoder.embed(text))
        label = f"embed {n_tokens} tokens, {threads} thr"
        print(f"{label:>28}: {seconds * 1e3:8.1f} ms  (median of {repeats})")
    torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
