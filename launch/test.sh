#!/usr/bin/env bash
# The test command: creates/updates the environment (runtime deps + torch CPU, peft, pytest) and runs the suite.
# Extra arguments go to pytest, e.g. `bash launch/test.sh tests/models -k vision`.
source "$(dirname "$0")/env.sh" requirements-test.txt
exec python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "${@:-tests}"
