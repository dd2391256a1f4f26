"""One daemon (or one score/rescore/export run) per state folder: the lock file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mrrp_pacs.cli import STATE_LOCKED_EXIT, main
from mrrp_pacs.daemon import Daemon, components_from_config
from mrrp_pacs.errors import StateLocked
from mrrp_pacs.statelock import StateLock

HOLD = """\
import sys, time
from pathlib import Path
from mrrp_pacs.statelock import StateLock
StateLock(Path(sys.argv[1]), "serve").acquire()
print("held", flush=True)
time.sleep(120)
"""


def _loopback(config):
    """The daemon's listeners on ports the system picks (loopback, the default bind)."""
    return config.replace("dicom", port=0).replace("hl7", port=0).replace("http", port=0)


def test_a_second_daemon_is_refused_and_leaves_the_first_ones_running_job_alone(config):
    site = _loopback(config)
    first = Daemon(site, components_from_config(site))
    first.start()
    try:
        store = first.pipeline.store
        with store.transaction() as conn:  # the first daemon's job in progress
            job = store.insert(conn, "jobs", {"kind": "rescore", "state": "running",
                                              "started_at": store.stamp()})
        second = Daemon(site, components_from_config(site))
        with pytest.raises(StateLocked) as refused:
            second.start()
        message = str(refused.value)
        assert f"pid {os.getpid()} (serve)" in message
        assert str(site.paths.lock_file) in message
        assert store.conn.execute("SELECT state FROM jobs WHERE id = ?",
                                  (job,)).fetchone()[0] == "running"
        assert not any(listener.running for listener in second.components.listeners)
        assert second.scheduler is None
    finally:
        first.stop()
    again = Daemon(site, components_from_config(site))  # the first one stopped: free again
    again.start()
    try:
        assert again.lock.held
    finally:
        again.stop()


def test_a_live_holder_is_named_and_a_holder_killed_with_sigkill_blocks_nothing(config):
    lock_file = config.paths.lock_file
    db = str(config.paths.db_file)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock_file)],
                              stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout.readline().strip() == b"held"
        for command in (["rescore"], ["score", "--json"], ["serve"]):
            result = CliRunner().invoke(main, [*command, "--db", db])
            assert result.exit_code == STATE_LOCKED_EXIT, result.output
            assert f"pid {holder.pid} (serve)" in result.output
            assert str(lock_file) in result.output
            assert "Traceback" not in result.output
    finally:
        holder.kill()  # SIGKILL: no clean-up of any kind
        holder.wait()
        holder.stdout.close()
    assert holder.returncode == -9
    assert lock_file.read_text().split()[0] == str(holder.pid)  # left behind, stale
    # the kernel let go of the flock: the next run gets past the lock (and fails for want
    # of a model, as a fresh installation does)
    result = CliRunner().invoke(main, ["rescore", "--db", db])
    assert result.exit_code == 1 and "no model" in result.output, result.output
    with StateLock(lock_file, "rescore") as lock:
        assert lock.held
        assert lock_file.read_text() == f"{os.getpid()} rescore\n"
    assert lock_file.read_text() == ""  # released: no pid to name


def test_the_lock_belongs_to_one_holder_in_a_process_too(tmp_path):
    path = tmp_path / "state" / "mrrp.lock"
    with StateLock(path, "rescore"), pytest.raises(
            StateLocked, match=rf"pid {os.getpid()} \(rescore\)"):
        StateLock(path, "serve").acquire()
    with StateLock(path, "serve") as lock:
        assert lock.held
