#!/usr/bin/env bash
# Set up (first time) and start the web app. Arguments go to app.py, e.g. --host 0.0.0.0 for the LAN.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python app.py "$@"
