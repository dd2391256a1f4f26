"""How many inputs a fuzz test draws: a bounded run in ``make test``, ≥ 100,000 per surface in
``make soak`` (``MRRP_SOAK=1``).

Every fuzz test uses :func:`fuzz_settings`: no example database (CI starts clean; a failure
prints the input that reproduces it), and a deadline of 1 s per input, so that an input the
code hangs on fails the test instead of slowing it down. Function-scoped fixtures are allowed:
a fuzz test that shares a server across inputs says so and reads only what each input added.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

SOAK = os.environ.get("MRRP_SOAK") == "1"
SOAK_EXAMPLES = 100_000
DEADLINE_MS = 1000


def fuzz_settings(ci_examples: int, soak_examples: int = SOAK_EXAMPLES) -> settings:
    """Hypothesis settings drawing ``ci_examples`` inputs, or ``soak_examples`` under soak."""
    return settings(max_examples=soak_examples if SOAK else ci_examples,
                    deadline=DEADLINE_MS, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
