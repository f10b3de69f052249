#!/usr/bin/env bash
# Runs the ort classifier on an NVIDIA GPU (CUDA execution provider) and checks it:
#   1. installs the `onnxruntime-gpu` wheel (ORT_GPU_VERSION, default the version
#      scripts/setup-ort.sh uses; else the newest release below it) and the CUDA/cuDNN runtime
#      wheels it names (its `cuda` and `cudnn` extras) into a venv under /var/tmp;
#   2. points LD_LIBRARY_PATH at those wheels' libraries and IMGCLF_ORT_LIB at the GPU wheel's
#      libonnxruntime.so;
#   3. for each model, has examples/bench_classifier write every shared photo's logits on CPU
#      and on CUDA (the same library), requires the CUDA run's log to say the session runs on
#      cuda (a silent fallback to CPU would pass the comparison), and requires every logit to
#      agree within GPU_CHECK_TOLERANCE (1e-3);
#   4. benchmarks the classifier on the GPU at each batch size in GPU_CHECK_BATCHES.
# On a machine without a working `nvidia-smi` it says so and exits 0.
#
# Not run on a GPU where it was written (no GPU there): its steps are checked one by one
# (bash -n, shellcheck, the example on the CPU library), so a first run on a GPU may need a fix.
# TensorRT is not checked: its libraries are another multi-GB install (IMGCLF_ORT_PROVIDERS=
# tensorrt,cuda works where they are on LD_LIBRARY_PATH).
#
#   scripts/gpu-check.sh                    # builds the example (release), installs, checks
#   IMGCLF_BENCH_BIN=path/to/bench_classifier scripts/gpu-check.sh   # with a built example
#
# Environment: ORT_GPU_VERSION, GPU_CHECK_VENV (/var/tmp/imgclf-gpu-venv), GPU_CHECK_BATCHES
# ("1 8 32 64"), GPU_CHECK_SECONDS (5), GPU_CHECK_TOLERANCE (1e-3), IMGCLF_SHARED_DIR.
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
trap 'rm -rf "$work"' EXIT

# 1. The GPU wheel and its CUDA libraries.
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "${pip[@]}" "onnxruntime-gpu[cuda,cudnn]==$version" >&2; then
  echo "gpu-check: onnxruntime-gpu $version is not on PyPI; taking the newest before it" >&2
  "${pip[@]}" "onnxruntime-gpu[cuda,cudnn]<=$version" >&2
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# Older wheels without the extras: the CUDA 12 runtime libraries its documentation lists.
if ! find "$site/nvidia" -name 'libcublas.so*' 2>/dev/null | grep -q .; then
  "${pip[@]}" nvidia-cuda-runtime-cu12 nvidia-cuda-nvrtc-cu12 nvidia-cudnn-cu12 \
    nvidia-cublas-cu12 nvidia-cufft-cu12 nvidia-curand-cu12 >&2
fi
echo "gpu-check: onnxruntime-gpu $("$venv/bin/python" -c \
  'import importlib.metadata as m; print(m.version("onnxruntime-gpu"))')" >&2

# 2. Where the libraries are: every folder of the NVIDIA wheels holding a shared library.
lib_dirs="$(find "$site/nvidia" -name '*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)"
if [ -z "$lib_dirs" ]; then
  echo "gpu-check: no CUDA libraries found under $site/nvidia" >&2
  exit 1
fi
export LD_LIBRARY_PATH="$lib_dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ort_lib="$(find "$site/onnxruntime/capi" -maxdepth 1 -name 'libonnxruntime.so*' | sort | tail -n 1)"
if [ -z "$ort_lib" ] || [ ! -e "$site/onnxruntime/capi/libonnxruntime_providers_cuda.so" ]; then
  echo "gpu-check: the onnxruntime-gpu wheel has no libonnxruntime.so with the CUDA provider" >&2
  exit 1
fi
export IMGCLF_ORT_LIB="$ort_lib"
echo "gpu-check: IMGCLF_ORT_LIB=$IMGCLF_ORT_LIB" >&2

# The benchmark example (release: the figures are for reading).
bench="${IMGCLF_BENCH_BIN:-}"
if [ -z "$bench" ]; then
  cargo build --release --example bench_classifier >&2
  bench="${CARGO_TARGET_DIR:-target}/release/examples/bench_classifier"
fi

# 3. GPU logits against CPU logits, on every shared photo, for both models.
status=0
for model in models/efficientnet-lite0 "$shared/models/resnet18-random-init"; do
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
  "$venv/bin/python" - "$work/$name-cpu.json" "$work/$name-cuda.json" "$tolerance" "$name" <<'PY' || status=1
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

# 4. Throughput on the GPU, batch by batch.
for model in models/efficientnet-lite0 "$shared/models/resnet18-random-init"; do
  for batch in $batches; do
    result="$(IMGCLF_ORT_PROVIDERS=cuda RUST_LOG=warn "$bench" ort "$model" "$batch" "$seconds")"
    echo "gpu-check: $(basename "$model") on cuda: $result"
  done
done
exit "$status"
