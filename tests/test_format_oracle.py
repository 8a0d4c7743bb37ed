"""Every format's scores against an independent brute force over its verdicts (format_oracle.py):
equal when the search is exhaustive, bounded under any pruning, in both modes."""

from __future__ import annotations

import pytest

from format_oracle import CASES, ROLES, family_tests, first_word_exact

(test_exhaustive_scores_equal_the_brute_force, test_bounds_hold_under_pruning,
 test_first_token_is_p_unsafe_under_constraint, test_facts_of_every_prefix_hold_on_its_completions) = family_tests(
    ROLES, examples=60)


@pytest.mark.parametrize(("name", "role"), [(n, r) for n, r in ROLES if CASES[n].first])
def test_first_token_unconstrained_equals_the_brute_force(name, role):
    first_word_exact(name, role)
