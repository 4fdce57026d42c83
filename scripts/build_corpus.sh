#!/usr/bin/env bash
# Rebuild assets/corpus (train/val JSON lines + tokenizer.json) from Debian packages.
# Needs root (or sudo) for apt-get, and the project's Python environment for the build step.
# Output is deterministic for a given set of package versions (see assets/corpus/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# bible-kjv-text ships the KJV compressed; bible-kjv provides the `bible` program that reads it.
# fortunes: the non-offensive cookies only (offensive ones are in fortunes-off, not installed).
PKGS="bible-kjv-text bible-kjv python3.11-doc fortunes"
if ! dpkg -s $PKGS >/dev/null 2>&1; then
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends $PKGS
fi

PY="${PYTHON:-python}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
"$PY" -m nlrw_jax.data.corpus build --out assets/corpus "$@"
