"""What a hostile HL7 message costs the intake (issue 18): the time of one
``Intake.receive_hl7`` on the largest frames the listener takes (``[ingest] max_hl7_bytes``,
4 MiB), shaped to make a parser work: empty segments, thousands of orders, one huge narrative
OBX of escapes and repetitions, and a field of empty components. Sizes are doubled to show that
each cost grows linearly (the ratio column). A temporary database and object store.

Run: ``PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_hl7_hostile.py``
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mrrp_pacs.config import Config
from mrrp_pacs.intake.persist import Intake
from mrrp_pacs.store import Store

HEAD = ("MSH|^~\\&|LIS|HOSP|MRRP|HOSP|20260101120000||ORU^R01|C{n}|P|2.5\r"
        "PID|1||P1^^^HOSP^MR||DOE^JANE||19600101|F\r")
MIB = 1024 * 1024

SHAPES: dict[str, Callable[[int], str]] = {
    "empty segments (refused)": lambda size: "OBR|\r" * (size // 5),
    "orders with an OBX each": lambda size: (
        "OBR|1||ACC|88305^x^L|||20260101\rOBX|1|NM|KI67^Ki-67^L||25|%|||||F\r"
        * (600 * size // MIB)),  # 600, 1,200, 2,400 orders: under the 5,000-segment cap
    "one narrative OBX of escapes": lambda size: (
        "OBR|1||ACC|88305\rOBX|1|TX|X^x^L||" + "a\\T\\b~" * (size // 7) + "\r"),
    "a field of empty components": lambda size: (
        "OBR|1||ACC|88305\rOBX|1|TX|X^x^L||" + "^" * size + "\r"),
}


def main() -> None:
    print("| message shape | size | median of 3 (ms) | outcome | time ratio to half the size |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder, \
            Store(Path(folder) / "db.sqlite3", Path(folder) / "objects") as store:
        intake = Intake(store, Config())
        number = 0
        for name, build in SHAPES.items():
            previous = None
            for size in (MIB, 2 * MIB, 4 * MIB - 4096):
                times, outcome = [], ""
                for _ in range(3):
                    number += 1
                    raw = (HEAD.format(n=number) + build(size)).encode()
                    started = time.perf_counter()
                    result = intake.receive_hl7(raw, "bench")
                    times.append(time.perf_counter() - started)
                    outcome = result.outcome.name
                median = statistics.median(times) * 1000
                ratio = f"{median / previous:.2f}" if previous else "-"
                print(f"| {name} | {len(raw) / MIB:.1f} MiB | {median:.1f} | {outcome} | "
                      f"{ratio} |", flush=True)
                previous = median


if __name__ == "__main__":
    main()
