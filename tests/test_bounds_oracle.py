"""The bounds against an independent brute force, over random taxonomies, tokenizers, models and settings.

For every category, P(unsafe), every group and every greedy-path estimator:
``lower <= exact <= upper`` and ``lower <= p <= upper``; no interval wider than the
unexplored mass; exhaustive searches equal the brute force; the greedy-path estimators are
exact whenever no node limit, depth limit or tolerance cuts the search. Set-ups with too
many verdicts to enumerate (30 ids) are checked against the brute force's own certified
interval. The checks themselves live in oracle.py (test_first_id runs them with the walk on);
CI runs 200 configurations over 28 set-ups, ``scripts/deep_check.sh`` 5000 over 70.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardprob.core.estimators import METHODS
from helpers import budget
from oracle import METHOD_SETS, POOL, check_against_brute_force, configurations

EXAMPLES = budget(200, 5000)

@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, POOL - 1), config=configurations, methods=st.sampled_from(METHOD_SETS))
def test_bounds_hold_against_brute_force(seed, config, methods):
    check_against_brute_force(seed, config, methods)


@pytest.mark.parametrize("seed", range(POOL))
@pytest.mark.parametrize("constrained", [True, False])
def test_exhaustive_search_equals_brute_force(seed, constrained):
    config = dict(eps=0.0, top_p=1.0, max_nodes=None, max_depth=None, tolerance=0.0, batch=64, speculate=1,
                  prior=2.0, constrained=constrained)
    check_against_brute_force(seed, config, METHODS)
