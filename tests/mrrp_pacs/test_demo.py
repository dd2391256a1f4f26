"""The demo's C-index line (the full demo runs in tests/test_demo_e2e.py): never a C-index on
fewer than 10 test events, else the value with its 95 % bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest

from mrrp_pacs.demo import MIN_TEST_EVENTS, c_index_text, held_out_c_index
from mrrp_pacs.model.evaluate import bootstrap_ci, harrell_c


def split(n: int, events: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` patients of whom ``events`` recur; risk tracks the hazard, with noise."""
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    time = rng.exponential(50 * np.exp(-risk)) + 1.0
    event = np.zeros(n, dtype=bool)
    event[np.argsort(time)[:events]] = True  # the earliest ones recur, the others censored
    return time, event, risk + rng.normal(0, 0.5, n)


def test_fewer_than_ten_test_events_show_no_c_index_and_say_why():
    assert MIN_TEST_EVENTS == 10
    time, event, risk = split(30, 6)
    shown = held_out_c_index(time, event, risk)
    assert (shown.value, shown.ci95, shown.events) == (None, None, 6)
    line = c_index_text(shown.value, shown.ci95, shown.events)
    assert line == "C-index not shown: 6 test events (< 10)"
    # nine is still too few; even a value passed in is not shown
    assert held_out_c_index(*split(30, 9)).value is None
    assert c_index_text(0.91, [0.7, 1.0], 9) == "C-index not shown: 9 test events (< 10)"


def test_ten_or_more_test_events_show_the_c_index_with_its_bootstrap_interval():
    time, event, risk = split(40, 10)
    shown = held_out_c_index(time, event, risk, n_resamples=500, seed=3)
    assert shown.events == 10
    assert shown.value == round(harrell_c(time, event, risk), 4)
    low, high = bootstrap_ci(harrell_c, time, event, risk, n_resamples=500, seed=3)
    assert shown.ci95 == [round(low, 4), round(high, 4)]
    assert shown.ci95[0] < shown.value < shown.ci95[1]
    line = c_index_text(shown.value, shown.ci95, shown.events)
    assert line == (f"{shown.value:.3f} (95% CI {shown.ci95[0]:.3f}-{shown.ci95[1]:.3f}; "
                    "10 test events)")


def test_an_undefined_c_index_on_enough_events_says_so():
    # every patient recurs at the same time: no comparable pair
    shown = held_out_c_index(np.full(12, 5.0), np.ones(12, bool), np.arange(12.0),
                             n_resamples=50)
    assert (shown.value, shown.ci95, shown.events) == (None, None, 12)
    assert c_index_text(None, None, 12) == ("C-index undefined on the 12 test events "
                                            "(no comparable pair)")


@pytest.mark.parametrize("events", [0, 1, 9])
def test_the_line_never_carries_a_number_but_the_count_below_ten(events):
    assert c_index_text(0.5, [0.4, 0.6], events) == (
        f"C-index not shown: {events} test events (< 10)")
