"""Rewrite tests/reference/<script>.json: every case's inputs (tests/support/r_reference.py) and
what R gives for them. Run it after changing an R script, a case or R, and read the
diff before committing it:

    .venv/bin/python tests/reference/make_r_reference.py [SCRIPT ...]

Needs Rscript with the packages each script loads (r_reference.PACKAGES; apt-get install
r-cran-survival r-cran-riskregression r-cran-pec).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

import r_reference  # tests/support is not a package: found through the path above


def main(scripts: list[str]) -> None:
    unknown = set(scripts) - set(r_reference.CASES)
    if unknown:
        sys.exit(f"unknown script(s) {sorted(unknown)}: choose from {list(r_reference.CASES)}")
    with tempfile.TemporaryDirectory() as folder:
        for script in scripts or r_reference.CASES:
            print(r_reference.write(script, Path(folder)))


if __name__ == "__main__":
    main(sys.argv[1:])
