from __future__ import annotations

from pathlib import Path

import pytest

from mrrp_pacs.config import Config, load_config
from mrrp_pacs.intake import Intake
from mrrp_pacs.store import Store


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(None, environ={}).with_db(tmp_path / "state" / "mrrp.sqlite3")


@pytest.fixture
def store(config: Config):
    with Store(config.paths.db_file, config.paths.objects_dir) as opened:
        yield opened


@pytest.fixture
def intake(store: Store, config: Config) -> Intake:
    return Intake(store, config)
