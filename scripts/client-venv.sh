#!/usr/bin/env bash
# The official Python clients the integration tests drive Kiln with (cli/tests/it/predictions.rs:
# `replicate` against the predictions API, `standardwebhooks` verifying Kiln's webhooks), pinned in
# scripts/clients/replicate-requirements.txt and installed with pip into target/deploy-tools/replicate-venv:
# once, and again only when the pins change. scripts/test.sh runs it before the Rust tests, which
# fail when the venv is missing.
#
#   scripts/client-venv.sh      # prints the venv's python
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PINS="$ROOT/scripts/clients/replicate-requirements.txt"
TOOLS="$ROOT/target/deploy-tools"
VENV="$TOOLS/replicate-venv"

say() { printf 'client-venv: %s\n' "$*" >&2; }

mkdir -p "$TOOLS"
if ! cmp -s "$PINS" "$VENV/.kiln-pins"; then
  say "installing with pip into $VENV: $(tr '\n' ' ' <"$PINS")"
  rm -rf "$VENV"
  { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q --disable-pip-version-check -r "$PINS"; } \
    >"$TOOLS/replicate-pip.log" 2>&1 || { say "FAIL install (see $TOOLS/replicate-pip.log)"; exit 2; }
  cp "$PINS" "$VENV/.kiln-pins"
fi
echo "$VENV/bin/python"
