from __future__ import annotations

import os
from pathlib import Path

import clock_travel
import pytest
from clocks import SteppingClock

from mrrp_pacs.config import Config, load_config
from mrrp_pacs.intake import Intake
from mrrp_pacs.store import Store


def pytest_configure(config: pytest.Config) -> None:
    """The wall clock moved ahead when MRRP_TEST_CLOCK_AHEAD asks (make test's second pass):
    this process now, and every Python process the tests start, through its PYTHONPATH."""
    if os.environ.get(clock_travel.VARIABLE):
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(Path(__file__).parent / "support" / "time_travel"),
                          os.environ.get("PYTHONPATH")]))
        clock_travel.travel_if_asked()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(None, environ={}).with_db(tmp_path / "state" / "mrrp.sqlite3")


@pytest.fixture
def clock() -> SteppingClock:
    """The time of the ``store`` fixture (and so of intake, scoring and the outbox on it)."""
    return SteppingClock()


@pytest.fixture
def store(config: Config, clock: SteppingClock):
    with Store(config.paths.db_file, config.paths.objects_dir, clock=clock) as opened:
        yield opened


@pytest.fixture
def intake(store: Store, config: Config) -> Intake:
    return Intake(store, config)
