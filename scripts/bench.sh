#!/usr/bin/env bash
# The benchmark: private RabbitMQ and Redis (as for the tests), a release build, ONNX Runtime and
# the model fetched when missing, then `kiln-load` runs the baselines and scenarios in one run and
# prints every figure and ratio. Results go to target/bench/latest.md; BENCHMARKS.md records them.
# Extra arguments go to kiln-load (e.g. --duration 20s --concurrency 1,32).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
kiln_services_up
cargo build --release --locked -p kiln-cli -p kiln-load-tests
./target/release/kiln fetch >/dev/null
mkdir -p target/bench
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -m); date: $(date -u +%F)"
./target/release/kiln-load --kiln target/release/kiln --out target/bench/latest.md "$@"
