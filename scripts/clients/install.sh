#!/usr/bin/env bash
# Installs the pinned client packages of scripts/clients/requirements.txt (the official `openai`
# Python client and numpy) with pip into target/deploy-tools/clients-venv: once, and again only
# when the pins change. The integration tests that drive Kiln with real clients
# (cli/tests/it/openai.rs) run that venv's python and fail when it is missing.
#
#   scripts/clients/install.sh          # prints the venv's python
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
REQS="$ROOT/scripts/clients/requirements.txt"
TOOLS="$ROOT/target/deploy-tools"
VENV="$TOOLS/clients-venv"

say() { printf 'clients: %s\n' "$*" >&2; }

mkdir -p "$TOOLS"
pins=$(grep -v '^#' "$REQS" | sed '/^$/d' | sort)
if [[ "$(cat "$VENV/.kiln-pkgs" 2>/dev/null)" != "$pins" ]]; then
  say "installing with pip into $VENV: $(echo $pins)"
  rm -rf "$VENV"
  { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQS"; } \
    >"$TOOLS/clients-pip.log" 2>&1 || { say "FAIL install: pip -r $REQS (see $TOOLS/clients-pip.log)"; exit 2; }
  printf '%s' "$pins" >"$VENV/.kiln-pkgs"
fi
echo "$VENV/bin/python"
