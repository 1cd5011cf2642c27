#!/usr/bin/env bash
# Set up and run the whole test suite (CI calls exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/python -m pytest "$@"
