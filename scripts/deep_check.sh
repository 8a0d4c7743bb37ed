#!/usr/bin/env bash
# The release check: the property tests (marker `property`) with their large example counts and
# set-up pools (HYPOTHESIS_PROFILE=deep, see tests/helpers.py budget), each checked against the
# independent brute force. `make test` runs the same tests with CI's counts.
#   scripts/deep_check.sh [PYTEST ARGS...]     (default: every property test)
#   scripts/deep_check.sh tests/test_bounds_oracle.py
# The oracle runs are seeded (hypothesis derandomize), so a failure repeats with the same arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -eq 0 ]; then
    set -- -m property
fi
HYPOTHESIS_PROFILE=deep exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
