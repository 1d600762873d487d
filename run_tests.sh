#!/usr/bin/env bash
# The test command: sets up .venv on first use, then runs the whole suite offline
# on 8 host CPU devices (for the cross-replica tests), a file per worker, TEST_WORKERS
# workers (2). Extra args go to pytest.
set -euo pipefail
source "$(dirname "$0")/scripts/setup_env.sh"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
ruff check .
python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile tests "$@"
