#!/usr/bin/env bash
# The bounds oracle alone with the release check's counts; scripts/deep_check.sh runs every
# property test that way.
set -euo pipefail
exec "$(dirname "$0")/deep_check.sh" tests/test_bounds_oracle.py "$@"
