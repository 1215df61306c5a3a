#!/usr/bin/env bash
# The test command (README, .ci/run). Installs first when .venv is missing. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/install.sh
. .venv/bin/activate
python -m tensorguard_fast.info
exec python -m pytest -q "$@"
