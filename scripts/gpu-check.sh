#!/usr/bin/env bash
# Runs the ort classifier on an NVIDIA GPU (CUDA execution provider) and checks it:
#   1. installs the `onnxruntime-gpu` wheel (ORT_GPU_VERSION, default the version
#      scripts/setup-ort.sh uses; else the newest release below it) and the CUDA/cuDNN runtime
#      wheels it names (its `cuda` and `cudnn` extras) into a venv under /var/tmp; on a machine
#      with no PyPI, GPU_CHECK_ORT_DIR and GPU_CHECK_CUDA_SITE name libraries already there;
#   2. points LD_LIBRARY_PATH at those wheels' libraries and IMGCLF_ORT_LIB at the GPU wheel's
#      libonnxruntime.so;
#   3. for each model, has examples/bench_classifier write every shared photo's logits on CPU
#      and on CUDA (the same library), requires the CUDA run's log to say the session runs on
#      cuda (a silent fallback to CPU would pass the comparison), and requires every logit to
#      agree within GPU_CHECK_TOLERANCE (1e-3);
#   4. benchmarks the classifier on the GPU at each batch size in GPU_CHECK_BATCHES;
#   5. where the service and load generator are built (IMGCLF_HTTP_BIN, IMGCLF_LOAD_BIN), runs
#      the embedded `imgclf-http` on the GPU under GPU_CHECK_CLIENTS clients, upload to result.
# On a machine without a working `nvidia-smi` it says so and exits 0.
#
# Ran on an NVIDIA H200 (docs/gpu-check-h200.log, BENCHMARKS.md).
#
# TensorRT is not checked: its libraries are another multi-GB install (IMGCLF_ORT_PROVIDERS=
# tensorrt,cuda works where they are on LD_LIBRARY_PATH).
#
#   scripts/gpu-check.sh                    # builds the examples (release), installs, checks
#   IMGCLF_BENCH_BIN=path/to/bench_classifier scripts/gpu-check.sh   # with a built example
#   GPU_CHECK_ORT_DIR=.../onnxruntime/capi GPU_CHECK_CUDA_SITE=.../site-packages \
#     scripts/gpu-check.sh                  # offline: an unpacked onnxruntime-gpu wheel's
#                                           # libraries and a site-packages (PyTorch's, say)
#                                           # that holds the NVIDIA CUDA 13 wheels
#
# Environment: ORT_GPU_VERSION, GPU_CHECK_VENV (/var/tmp/imgclf-gpu-venv), GPU_CHECK_MODELS
# (Lite0 and the shared ResNet18), GPU_CHECK_BATCHES ("1 8 32 64"), GPU_CHECK_SECONDS (5),
# GPU_CHECK_TOLERANCE (1e-3), GPU_CHECK_TASKS (2000), GPU_CHECK_CLIENTS (64), IMGCLF_SHARED_DIR,
# GPU_CHECK_PORT (18411), IMGCLF_BENCH_LOAD_THREADS (the load generator's threads: 2),
# IMGCLF_BENCH_PHOTOS (the photos: the shared ones by default).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU here (nvidia-smi missing or failing): nothing to check"
  exit 0
fi
nvidia-smi -L

version="${ORT_GPU_VERSION:-1.32.0}"
venv="${GPU_CHECK_VENV:-/var/tmp/imgclf-gpu-venv}"
batches="${GPU_CHECK_BATCHES:-1 8 32 64}"
seconds="${GPU_CHECK_SECONDS:-5}"
tolerance="${GPU_CHECK_TOLERANCE:-1e-3}"
shared="${IMGCLF_SHARED_DIR:-$PWD/../shared}"
export IMGCLF_SHARED_DIR="$shared"
work="$(mktemp -d /var/tmp/imgclf-gpu-check.XXXXXX)"
service=""
# The service of step 5 goes with the script, however it ends.
trap '[ -z "$service" ] || kill "$service" 2>/dev/null; rm -rf "$work"' EXIT

python=python3
if [ -n "${GPU_CHECK_ORT_DIR:-}" ] && [ -n "${GPU_CHECK_CUDA_SITE:-}" ]; then
  # 1. Offline: the libraries are already on this machine.
  ort_dir="$GPU_CHECK_ORT_DIR"
  cuda_site="$GPU_CHECK_CUDA_SITE"
else
  # 1. The GPU wheel and its CUDA libraries.
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
  fi
  python="$venv/bin/python"
  pip=("$python" -m pip install --quiet --disable-pip-version-check)
  if ! "${pip[@]}" "onnxruntime-gpu[cuda,cudnn]==$version" >&2; then
    echo "gpu-check: onnxruntime-gpu $version is not on PyPI; taking the newest before it" >&2
    "${pip[@]}" "onnxruntime-gpu[cuda,cudnn]<=$version" >&2
  fi
  cuda_site="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  # Older wheels without the extras: the CUDA 12 runtime libraries its documentation lists.
  if ! find "$cuda_site/nvidia" -name 'libcublas.so*' 2>/dev/null | grep -q .; then
    "${pip[@]}" nvidia-cuda-runtime-cu12 nvidia-cuda-nvrtc-cu12 nvidia-cudnn-cu12 \
      nvidia-cublas-cu12 nvidia-cufft-cu12 nvidia-curand-cu12 >&2
  fi
  echo "gpu-check: onnxruntime-gpu $("$python" -c \
    'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))')" >&2
  ort_dir="$cuda_site/onnxruntime/capi"
fi

# 2. Where the libraries are: every folder of the NVIDIA wheels holding a shared library.
lib_dirs="$(find "$cuda_site/nvidia" -name '*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)" ||
  lib_dirs=""
if [ -z "$lib_dirs" ]; then
  echo "gpu-check: no CUDA libraries found under $cuda_site/nvidia" >&2
  exit 1
fi
export LD_LIBRARY_PATH="$lib_dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ort_lib="$(find "$ort_dir" -maxdepth 1 -name 'libonnxruntime.so*' 2>/dev/null | sort | tail -n 1)" ||
  ort_lib=""
if [ -z "$ort_lib" ] || [ ! -e "$ort_dir/libonnxruntime_providers_cuda.so" ]; then
  echo "gpu-check: $ort_dir has no libonnxruntime.so with the CUDA provider" >&2
  exit 1
fi
export IMGCLF_ORT_LIB="$ort_lib"
echo "gpu-check: IMGCLF_ORT_LIB=$IMGCLF_ORT_LIB" >&2

# The benchmark example (release: the figures are for reading).
bench="${IMGCLF_BENCH_BIN:-}"
if [ -z "$bench" ]; then
  # --workspace: the root package alone has no imgclf-http.
  cargo build --release --workspace --bins --example bench_classifier --example bench_load >&2
  release="$(realpath "${CARGO_TARGET_DIR:-target}")/release"
  bench="$release/examples/bench_classifier"
  IMGCLF_LOAD_BIN="${IMGCLF_LOAD_BIN:-$release/examples/bench_load}"
  IMGCLF_HTTP_BIN="${IMGCLF_HTTP_BIN:-$release/imgclf-http}"
fi
read -r -a models <<<"${GPU_CHECK_MODELS:-models/efficientnet-lite0 $shared/models/resnet18-random-init}"

# 3. GPU logits against CPU logits, on every shared photo, for both models.
status=0
for model in "${models[@]}"; do
  name="$(basename "$model")"
  for providers in cpu cuda; do
    IMGCLF_ORT_PROVIDERS="$providers" IMGCLF_BENCH_LOGITS="$work/$name-$providers.json" \
      NO_COLOR=1 RUST_LOG=info "$bench" ort "$model" 8 0.2 >"$work/$name-$providers.out" \
      2>"$work/$name-$providers.log" || {
      cat "$work/$name-$providers.log" >&2
      exit 1
    }
  done
  if ! grep -q "the session runs on cuda" "$work/$name-cuda.log"; then
    echo "gpu-check: $name did not run on CUDA:" >&2
    cat "$work/$name-cuda.log" >&2
    exit 1
  fi
  "$python" - "$work/$name-cpu.json" "$work/$name-cuda.json" "$tolerance" "$name" <<'PY' || status=1
import json, sys
cpu, gpu = (json.load(open(path)) for path in sys.argv[1:3])
tolerance, name = float(sys.argv[3]), sys.argv[4]
assert cpu.keys() == gpu.keys() and cpu, f"{name}: not the same photos"
worst = max((abs(a - b), photo) for photo in cpu for a, b in zip(cpu[photo], gpu[photo]))
top1 = sum(max(range(len(v)), key=v.__getitem__) == max(range(len(gpu[p])), key=gpu[p].__getitem__)
           for p, v in cpu.items())
print(f"gpu-check: {name}: {len(cpu)} photos, largest logit difference CUDA vs CPU "
      f"{worst[0]:.2e} ({worst[1]}), top-1 equal on {top1}/{len(cpu)}")
sys.exit(0 if worst[0] <= tolerance else f"gpu-check: {name}: over the tolerance {tolerance}")
PY
done

# Results without the per-photo figures, one line each.
brief() {
  "$python" -c 'import json, sys
d = json.load(sys.stdin)
print(json.dumps({k: v for k, v in d.items() if not k.endswith("_by_photo")}))'
}

# 4. Throughput on the GPU, batch by batch.
for model in "${models[@]}"; do
  for batch in $batches; do
    result="$(IMGCLF_ORT_PROVIDERS=cuda RUST_LOG=warn "$bench" ort "$model" "$batch" "$seconds" | brief)"
    echo "gpu-check: $(basename "$model") on cuda: $result"
  done
done

# 5. The embedded service on the GPU: uploads over HTTP, results in SQLite, many clients.
if [ -x "${IMGCLF_HTTP_BIN:-}" ] && [ -x "${IMGCLF_LOAD_BIN:-}" ]; then
  mapfile -t photos < <(find "${IMGCLF_BENCH_PHOTOS:-$shared/images}" -maxdepth 1 \
    \( -name '*.jpg' -o -name '*.jpeg' -o -name '*.png' -o -name '*.webp' \) | sort)
  port="${GPU_CHECK_PORT:-18411}"
  # The service's CPU time so far: whether its cores or something else set the pace.
  cpu_seconds() { awk -v tick="$(getconf CLK_TCK)" '{ print ($14 + $15) / tick }' "/proc/$1/stat"; }
  for model in "${models[@]}"; do
    name="$(basename "$model")"
    IMGCLF_CLASSIFIER=ort IMGCLF_ORT_PROVIDERS=cuda IMGCLF_MODEL="$model" \
      IMGCLF_ADDR="127.0.0.1:$port" IMGCLF_DATA_DIR="$work/data-$name" IMGCLF_MAX_QUEUE_DEPTH=0 \
      NO_COLOR=1 RUST_LOG=info "$IMGCLF_HTTP_BIN" >/dev/null 2>"$work/$name-http.log" &
    service=$!
    if ! "$python" - "$port" <<'PY'; then
import sys, time, urllib.request
for _ in range(600):
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=2).status == 200:
            sys.exit(0)
    except OSError:
        time.sleep(0.2)
sys.exit(1)
PY
      echo "gpu-check: $name: the service did not become ready" >&2
      cat "$work/$name-http.log" >&2
      kill "$service" 2>/dev/null || true
      exit 1
    fi
    cpu_before="$(cpu_seconds "$service")" started="$(date +%s.%N)"
    result="$("$IMGCLF_LOAD_BIN" "http://127.0.0.1:$port" "${GPU_CHECK_TASKS:-2000}" \
      "${GPU_CHECK_CLIENTS:-64}" "${photos[@]}" | brief)" || status=1
    awk -v cpu="$(cpu_seconds "$service")" -v before="$cpu_before" -v from="$started" \
      -v wall="$(date +%s.%N)" -v cores="$(nproc)" -v name="$name" 'BEGIN {
        printf "gpu-check: %s service: %.2f of %d cores busy while loaded\n",
          name, (cpu - before) / (wall - from), cores }' >&2
    kill "$service" && wait "$service" || true
    service=""
    grep -E "runs on|classifier:|instance" "$work/$name-http.log" | sed "s/^/gpu-check: $name service: /" >&2
    echo "gpu-check: $name embedded service on cuda: $result"
  done
fi
exit "$status"
