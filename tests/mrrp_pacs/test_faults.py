"""Fault points: nothing without MRRP_FAULTS; the named point, key and N-th call otherwise."""

import subprocess
import sys

import pytest

from mrrp_pacs.faults import InjectedFault, fault_point


def test_a_fault_point_does_nothing_unless_named(monkeypatch):
    monkeypatch.delenv("MRRP_FAULTS", raising=False)
    fault_point("intake.hl7.committed")
    monkeypatch.setenv("MRRP_FAULTS", "other.point=raise")
    fault_point("intake.hl7.committed")


def test_key_and_nth_call_choose_when_it_fires(monkeypatch):
    monkeypatch.setenv("MRRP_FAULTS", "test.nth@k=raise#3")
    fault_point("test.nth", "k")
    fault_point("test.nth", "other")  # another key does not count
    fault_point("test.nth", "k")
    with pytest.raises(InjectedFault):
        fault_point("test.nth", "k")
    fault_point("test.nth", "k")  # the 4th passes


def test_kill_is_a_sigkill_of_the_process():
    code = ("import os; os.environ['MRRP_FAULTS'] = 'x=kill'\n"
            "from mrrp_pacs.faults import fault_point\nfault_point('x')\nprint('survived')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == -9 and "survived" not in done.stdout
