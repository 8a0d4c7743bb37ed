"""Every format's scores against an independent brute force over its verdicts (format_oracle.py):
equal when the search is exhaustive, bounded under any pruning, in both modes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from format_oracle import (
    CASES,
    PRUNING,
    ROLES,
    check_bounds,
    check_exhaustive,
    check_facts,
    check_first_token,
    first_word_exact,
)


@pytest.mark.parametrize(("name", "role"), ROLES)
@pytest.mark.parametrize("constrained", [True, False])
def test_exhaustive_scores_equal_the_brute_force(name, role, constrained):
    check_exhaustive(name, role, constrained)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(ROLES), seed=st.sampled_from([0, 1, 2, 3]), config=PRUNING)
def test_bounds_hold_under_pruning(case, seed, config):
    check_bounds(*case, seed, config)


@pytest.mark.parametrize(("name", "role"), ROLES)
def test_first_token_is_p_unsafe_under_constraint(name, role):
    """Each format's first word is exactly what says unsafe: the first-token recipe over every
    spelling equals P(unsafe) when the verdict is constrained."""
    check_first_token(name, role)


@pytest.mark.parametrize(("name", "role"), [(n, r) for n, r in ROLES if CASES[n].first])
def test_first_token_unconstrained_equals_the_brute_force(name, role):
    first_word_exact(name, role)


@pytest.mark.parametrize(("name", "role"), ROLES)
def test_facts_of_every_prefix_hold_on_its_completions(name, role):
    """For every prefix of every verdict: each clause holds on every completion, every outcome
    some completion names is reachable, an outcome is committed exactly when every completion
    names it, and the list slots' facts contain what completions write there."""
    check_facts(name, role)
