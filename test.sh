#!/usr/bin/env bash
# Run the test suite (sets itself up first). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source tools/bootstrap.sh
exec "$WB_PY" -m pytest -q "$@"
