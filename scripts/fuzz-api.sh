#!/usr/bin/env bash
# Schema-driven fuzzing of the HTTP API: starts `kiln dev` (gateway and worker on the embedded
# backend, API keys on, an admin key) on a free port, and runs Schemathesis against the gateway's
# own /openapi.json. Fails on any 5xx (`not_a_server_error`) and on any 4xx/5xx that is not JSON
# `{"error": {"code": <a stable code of proto/src/error.rs>, "message": …}}` (`kiln_error_shape`,
# scripts/fuzz-hooks.py, which also steers part of the generated jobs to a served model so that
# real jobs are made, read, streamed and canceled). Seeded: the same seed, the same requests.
# Bounded: KILN_FUZZ_EXAMPLES cases per operation, and a hard KILN_FUZZ_MAX_TIME. The server is
# always stopped at the end.
#
#   scripts/fuzz-api.sh                       # after `cargo build -p kiln-cli`
#   KILN_FUZZ_SEED=7 KILN_FUZZ_EXAMPLES=200 scripts/fuzz-api.sh
#   scripts/fuzz-api.sh --include-path /v1/jobs   # further arguments go to `schemathesis run`
#
# Schemathesis is installed with pip, pinned, into target/deploy-tools/fuzz-venv (once; again
# only when the pin changes). The ONNX Runtime library and the models come from the cache
# (`kiln fetch`); ORT_DYLIB_PATH is used when set.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/services.sh

SCHEMATHESIS="schemathesis==4.32.5"
TOOLS="$ROOT/target/deploy-tools"
VENV="$TOOLS/fuzz-venv"
KILN="${KILN_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/kiln}"
SEED="${KILN_FUZZ_SEED:-13}"
EXAMPLES="${KILN_FUZZ_EXAMPLES:-100}"  # test cases per operation and phase
MAX_TIME="${KILN_FUZZ_MAX_TIME:-360}"  # a hang guard: seconds the run may take at most, or it fails (about 60 s here, twice that on a slower CI machine)

say() { printf 'fuzz-api: %s\n' "$*" >&2; }

[ -x "$KILN" ] || { say "no $KILN; run cargo build -p kiln-cli first"; exit 2; }

mkdir -p "$TOOLS"
if [[ "$(cat "$VENV/.kiln-pkgs" 2>/dev/null)" != "$SCHEMATHESIS" ]]; then
  say "installing with pip into $VENV: $SCHEMATHESIS"
  rm -rf "$VENV"
  { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q --disable-pip-version-check "$SCHEMATHESIS"; } \
    >"$TOOLS/fuzz-pip.log" 2>&1 || { say "FAIL install: pip $SCHEMATHESIS (see $TOOLS/fuzz-pip.log)"; exit 2; }
  printf '%s' "$SCHEMATHESIS" >"$VENV/.kiln-pkgs"
fi

if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  ORT_DYLIB_PATH=$("$KILN" fetch | sed -n 's/^onnxruntime: //p')
  export ORT_DYLIB_PATH
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kiln-fuzz.XXXXXX")
SERVER_PID=""
stop() {
  local rc=$?
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ] && [ -f "$WORK/kiln.log" ]; then
    say "kiln dev log (last 30 lines):"; tail -30 "$WORK/kiln.log" >&2
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap stop EXIT
trap 'exit 130' INT TERM

TOKEN=$("$KILN" keys --keys-file "$WORK/keys.json" create --tenant fuzz --scope admin \
  --rate 100000 --burst 100000 2>/dev/null \
  | python3 -c 'import json, sys; print(json.load(sys.stdin)["token"])')
PORT=$(kiln_free_port)
BASE="http://127.0.0.1:$PORT"
KILN_AUTH=keys "$KILN" dev --port "$PORT" --keys-file "$WORK/keys.json" \
  --models-dir "$ROOT/models" >"$WORK/kiln.log" 2>&1 &
SERVER_PID=$!
ready() { kill -0 "$SERVER_PID" && python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$BASE/readyz"; }
kiln_wait_for "kiln dev on $BASE" 60 ready || exit 1

say "schemathesis against $BASE/openapi.json: seed $SEED, $EXAMPLES examples per operation, at most ${MAX_TIME}s"
say "reproduce with KILN_FUZZ_SEED=$SEED KILN_FUZZ_EXAMPLES=$EXAMPLES scripts/fuzz-api.sh"
cd "$WORK"   # Schemathesis and Hypothesis write nothing into the work tree
started=$SECONDS
rc=0
SCHEMATHESIS_HOOKS="$ROOT/scripts/fuzz-hooks.py" timeout --signal=INT --kill-after=10 "$MAX_TIME" \
  "$VENV/bin/schemathesis" run "$BASE/openapi.json" \
  --header "Authorization: Bearer $TOKEN" \
  --checks not_a_server_error,status_code_conformance,kiln_error_shape \
  --seed "$SEED" --max-examples "$EXAMPLES" \
  --request-timeout 15 --generation-database none --no-color \
  "$@" || rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  say "FAIL: schemathesis did not finish within ${MAX_TIME}s"
elif [ "$rc" -ne 0 ]; then
  say "FAIL: schemathesis found problems (exit $rc; seed $SEED) in $((SECONDS - started))s"
else
  say "ok: no findings in $((SECONDS - started))s (seed $SEED)"
fi
exit "$rc"
