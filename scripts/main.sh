#!/usr/bin/env bash
# Set up .venv if needed, then run the default job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dmm-wrap fit configs/synthetic_digits.yaml "$@"
