#!/usr/bin/env bash
# Starts what the tests talk to and prints the environment that points the tests at it, and
# installs ONNX Runtime's library for the ort classifier's tests and Chromium for the page's.
# PostgreSQL, Redis and RabbitMQ are expected on their standard local ports (started here if
# their commands exist and they are down); the S3 server (moto, from PyPI) is installed into a
# virtualenv under $IMGCLF_SERVICES_DIR and started on 127.0.0.1:9000.
#
#   eval "$(scripts/services.sh)"
set -euo pipefail

dir="${IMGCLF_SERVICES_DIR:-/var/tmp/imgclf-services}"
mkdir -p "$dir"
log() { echo "services: $*" >&2; }

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {
  local port=$1 name=$2
  for _ in $(seq 1 120); do
    if up "$port"; then return 0; fi
    sleep 0.5
  done
  log "$name did not come up on port $port"
  return 1
}

if ! up 5432 && command -v pg_ctlcluster >/dev/null; then
  log "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start >&2 || true
fi
if ! up 6379 && command -v redis-server >/dev/null; then
  log "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >&2
fi
if ! up 5672 && command -v rabbitmq-server >/dev/null; then
  log "starting RabbitMQ"
  rabbitmq-server -detached >&2 || true
fi

if ! up 9000; then
  if [ ! -x "$dir/venv/bin/moto_server" ]; then
    log "installing the S3 server (moto) from PyPI"
    python3 -m venv "$dir/venv" >&2
    "$dir/venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.1.*' >&2
  fi
  log "starting the S3 server on 127.0.0.1:9000"
  # From $dir: the servers outlive this checkout, and s3s-fs reads its working directory on
  # every request.
  (cd "$dir" && exec nohup "$dir/venv/bin/moto_server" -H 127.0.0.1 -p 9000) >"$dir/moto.log" 2>&1 &
fi

# A second, independent S3 implementation (s3s-fs, Rust, from crates.io) on port 9002: the S3
# suite runs on both, and the benchmarks use it as a compiled S3 server beside moto. It keeps
# its objects on disk, so the fault tests also kill and restart servers of their own from it.
s3s="$dir/s3s/bin/s3s-fs"
if [ ! -x "$s3s" ]; then
  log "installing the second S3 server (s3s-fs) from crates.io"
  env -u CARGO_TARGET_DIR cargo install s3s-fs --version 0.14.1 --features binary --locked --root "$dir/s3s" >&2
fi
if ! up 9002; then
  log "starting the second S3 server on 127.0.0.1:9002"
  mkdir -p "$dir/s3s/data"
  (cd "$dir" && exec nohup "$s3s" --host 127.0.0.1 --port 9002 --access-key test \
    --secret-key testtest "$dir/s3s/data") >"$dir/s3s/s3s.log" 2>&1 &
fi

ort_lib="$("$(dirname "$0")/setup-ort.sh")"
"$(dirname "$0")/setup-chromium.sh" >&2

wait_for 5432 PostgreSQL
wait_for 6379 Redis
wait_for 5672 RabbitMQ
wait_for 9000 "the S3 server"
wait_for 9002 "the second S3 server"

cat <<ENV
export IMGCLF_TEST_POSTGRES=postgres://postgres@127.0.0.1:5432/test
export IMGCLF_TEST_REDIS=redis://127.0.0.1:6379
export IMGCLF_TEST_AMQP=amqp://guest:guest@127.0.0.1:5672/%2f
export IMGCLF_TEST_S3=http://127.0.0.1:9000
export IMGCLF_TEST_S3_SECOND=http://127.0.0.1:9002
export IMGCLF_TEST_S3S_BIN='$s3s'
export IMGCLF_TEST_S3_ACCESS_KEY=test
export IMGCLF_TEST_S3_SECRET_KEY=testtest
export IMGCLF_TEST_ORT_LIB='$ort_lib'
export IMGCLF_TEST_CHROMEDRIVER=/usr/bin/chromedriver
ENV
