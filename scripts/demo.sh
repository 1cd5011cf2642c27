#!/usr/bin/env bash
# Main job: set up, build the offline LLaVA-1.5 checkpoint, start a pruning-enabled
# OpenAI server, send one chat request without pruning and one with keep=64,
# print usage.prompt_tokens for both, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/vllm-promprune demo "$@"
