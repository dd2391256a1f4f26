"""Throughput of the MLLP listener: messages per second over one connection, persisted.

Run: ``.venv/bin/python benchmarks/bench_mllp.py [messages] [repeats]`` (defaults 300, 3).
Each repeat starts a listener on a fresh SQLite store (WAL, synchronous FULL, as in
production) and sends ``messages`` pathology results (about 1 kB, 9 clinical values each)
with the MLLP client, waiting for each AA before the next, as an HL7 sender does. Prints the
median rate, and the same through ``Intake`` alone to show what the network part costs.
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from exporters.mllp_client import send_messages
from listeners.mllp import MllpServer
from mrrp_pacs.config import Config, load_config
from mrrp_pacs.intake import Intake, Outcome
from mrrp_pacs.store import Store

MESSAGE = (
    "MSH|^~\\&|LIS|HOSP|MRRP|HOSP|20260106120000||ORU^R01^ORU_R01|{id}|P|2.5||||||UNICODE UTF-8\r"
    "PID|1||B{n:05d}^^^HOSP^MR||Bench^Patient||19700101|F\r"
    "OBR|1|ORD-{id}|PA-{n:05d}|PATH-BREAST^Breast pathology^L|||20260110|||||||||||||||||SP|F\r"
    "OBX|1|NM|21889-1^Size Tumor^LN||18|mm|||||F\r"
    "OBX|2|NM|21893-3^Regional lymph nodes positive^LN||2|{{count}}|||||F\r"
    "OBX|3|CWE|MRRP-GRADE^Histological grade^L||2^Grade 2^L||||||F\r"
    "OBX|4|NM|MRRP-ER-PCT^ER positive cells^L||90|%|||||F\r"
    "OBX|5|NM|MRRP-PR-PCT^PR positive cells^L||60|%|||||F\r"
    "OBX|6|CWE|MRRP-HER2-IHC^HER2 IHC score^L||1+^HER2 1+^L||||||F\r"
    "OBX|7|NM|85330-9^Ki-67^LN||15|%|||||F\r"
    "OBX|8|CWE|MRRP-SUBTYPE^Molecular subtype^L||luminal_a^Luminal A^L||||||F\r"
)


def messages(count: int, run: int) -> list[bytes]:
    return [MESSAGE.format(id=f"B{run}-{n}", n=n).encode() for n in range(count)]


def config_in(folder: Path) -> Config:
    return load_config(None, environ={}).with_db(folder / "state" / "mrrp.sqlite3")


def over_mllp(count: int, run: int, folder: Path) -> float:
    config = config_in(folder)
    server = MllpServer(lambda: Intake(Store(config.paths.db_file, config.paths.objects_dir),
                                       config), port=0)
    handle = server.run_in_thread()
    try:
        batch = messages(count, run)
        start = time.perf_counter()
        acks = send_messages("127.0.0.1", handle.port, batch, timeout_s=30)
        elapsed = time.perf_counter() - start
    finally:
        handle.stop()
    if [a.code for a in acks] != ["AA"] * count:
        raise SystemExit(f"not all acknowledged AA: {sorted({a.code for a in acks})}")
    return count / elapsed


def intake_only(count: int, run: int, folder: Path) -> float:
    config = config_in(folder)
    with Store(config.paths.db_file, config.paths.objects_dir) as store:
        intake = Intake(store, config)
        batch = messages(count, run)
        start = time.perf_counter()
        outcomes = [intake.receive_hl7(raw, "bench").outcome for raw in batch]
        elapsed = time.perf_counter() - start
    if outcomes != [Outcome.NEW] * count:
        raise SystemExit("intake did not store every message")
    return count / elapsed


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    logging.basicConfig(level=logging.WARNING)
    rates: dict[str, list[float]] = {"MLLP, one connection": [], "Intake alone": []}
    for run in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            rates["MLLP, one connection"].append(over_mllp(count, run, Path(tmp) / "mllp"))
            rates["Intake alone"].append(intake_only(count, run, Path(tmp) / "intake"))
    size = len(messages(1, 0)[0])
    for name, values in rates.items():
        print(f"{name}: median {statistics.median(values):.0f} messages/s over {repeats} runs "
              f"of {count} ({size} bytes each; runs: "
              f"{', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
