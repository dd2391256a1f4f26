from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import clock_travel
import pytest
import tools
from certs import Certs, make_certs
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


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects, so "not e2e" sees the added mark
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that runs an external program is ``e2e``: the quick tier leaves it out."""
    for item in items:
        if item.get_closest_marker("needs_tool") is None:
            continue
        names = tools.declared(item)
        if not names or tools.unknown(names):
            raise pytest.UsageError(
                f"{item.nodeid}: needs_tool({', '.join(map(repr, names))}) must name tools "
                f"of tests/support/tools.py: {', '.join(tools.TOOLS)}")
        item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    """``tools.tool`` reads the marks of the test being run, fixtures included."""
    tools.running(item)
    try:
        return (yield)
    finally:
        tools.running(None)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Every tool a test declares is there before its fixtures start, or it fails (no skip)."""
    problem = tools.missing_message(tools.declared(item))
    if problem:
        pytest.fail(f"{item.nodeid}: {problem}", pytrace=False)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, server and client certificates of it, another CA's (tests/support/certs.py); the
    test declares ``needs_tool("openssl")``."""
    return make_certs(tmp_path_factory.mktemp("certs"))


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


@pytest.fixture(scope="session")
def trained_phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The 16-patient phantom and the model store of a model trained on it
    (``daemon_proc.TRAINING``), trained once per session: the daemon end-to-end test and the
    fault harness both run daemons with it."""
    from daemon_proc import TRAINING, train_on_phantom

    return train_on_phantom(tmp_path_factory.mktemp("trained"), TRAINING)
