#!/usr/bin/env bash
# Builds the release binaries, starts the services, installs what the Python side needs, and
# runs scripts/bench.py (arguments pass through). Figures go to BENCHMARKS.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/services.sh)"
export IMGCLF_ORT_LIB="$IMGCLF_TEST_ORT_LIB"
python3 -m pip install --quiet --disable-pip-version-check numpy pillow onnxruntime==1.32.0 matplotlib >&2

# A compiled S3 server beside moto, so the distributed figure is not mostly moto's Python.
s3s_dir="${IMGCLF_SERVICES_DIR:-/var/tmp/imgclf-services}/s3s"
if [ ! -x "$s3s_dir/bin/s3s-fs" ]; then
  cargo install s3s-fs --version 0.14.1 --features binary --locked --root "$s3s_dir" >&2
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/9002) 2>/dev/null; then
  mkdir -p "$s3s_dir/data"
  nohup "$s3s_dir/bin/s3s-fs" --host 127.0.0.1 --port 9002 --access-key test --secret-key testtest \
    "$s3s_dir/data" >"$s3s_dir/s3s.log" 2>&1 &
  sleep 1
fi
export IMGCLF_BENCH_S3S=http://127.0.0.1:9002
cargo build --release --workspace --bins >&2
cargo build --release --workspace --example bench_classifier >&2
exec python3 scripts/bench.py --bin-dir "${CARGO_TARGET_DIR:-target}/release" "$@"
