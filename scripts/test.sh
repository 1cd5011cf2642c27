#!/usr/bin/env bash
# Set up, lint, and run the whole test suite (CI calls exactly this).
# Arguments go to pytest, e.g. `bash scripts/test.sh tests/unit` (under a minute).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
