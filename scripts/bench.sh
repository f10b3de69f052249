#!/usr/bin/env bash
# Builds the release binaries, starts the services, installs what the Python side needs, and
# runs scripts/bench.py (arguments pass through): it prints every figure and ratio, writes
# docs/bench-results.json and docs/throughput.png. BENCHMARKS.md quotes a full run.
set -euo pipefail
cd "$(dirname "$0")/.."
# Captured first: `eval "$(…)"` alone would take eval's status and go on without services.
services="$(scripts/services.sh)"
eval "$services"
export IMGCLF_ORT_LIB="$IMGCLF_TEST_ORT_LIB"
python3 -m pip install --quiet --disable-pip-version-check numpy pillow onnxruntime==1.32.0 matplotlib >&2

# The distributed pipeline also runs over the compiled S3 server services.sh started.
export IMGCLF_BENCH_S3S="$IMGCLF_TEST_S3_SECOND"
cargo build --release --workspace --bins >&2
cargo build --release --example bench_classifier --example bench_instances --example bench_load \
    --example bench_results >&2
exec python3 scripts/bench.py --bin-dir "$(realpath "${CARGO_TARGET_DIR:-target}")/release" "$@"
