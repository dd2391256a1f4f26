"""Imported by Python at the start of every process the tests start while the clock travels
(see ``clock_travel.py`` one folder up, which conftest puts this folder on PYTHONPATH for)."""

import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: shadows nothing

import clock_travel

clock_travel.travel_if_asked()
