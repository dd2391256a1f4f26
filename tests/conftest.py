from __future__ import annotations

from pathlib import Path

import pytest
from clocks import SteppingClock

from mrrp_pacs.config import Config, load_config
from mrrp_pacs.intake import Intake
from mrrp_pacs.store import Store


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
