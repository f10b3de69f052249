#!/usr/bin/env bash
# Installs ONNX Runtime's shared library for the ort classifier, from the `onnxruntime` wheel on
# PyPI (the only place it can come from here), and prints its path.
#
#   export IMGCLF_ORT_LIB="$(scripts/setup-ort.sh)"
set -euo pipefail
version="${ORT_VERSION:-1.32.0}"
dir="${IMGCLF_SERVICES_DIR:-/var/tmp/imgclf-services}/onnxruntime-$version"
lib="$dir/libonnxruntime.so.$version"
if [ ! -f "$lib" ]; then
  mkdir -p "$dir"
  echo "setup-ort: fetching onnxruntime $version from PyPI" >&2
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary :all: \
    -d "$dir/wheel" "onnxruntime==$version" >&2
  python3 - "$dir" "$version" <<'PY'
import glob, os, sys, zipfile
out, version = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{out}/wheel/onnxruntime-{version}-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("onnxruntime/capi/libonnxruntime"):
            target = f"{out}/{name.rsplit('/', 1)[1]}"
            # Renamed into place: an interrupted copy never looks installed.
            with z.open(name) as src, open(target + ".part", "wb") as dst:
                dst.write(src.read())
            os.replace(target + ".part", target)
PY
  rm -rf "$dir/wheel"
  if [ ! -f "$lib" ]; then
    echo "setup-ort: the onnxruntime $version wheel has no libonnxruntime.so.$version" >&2
    exit 1
  fi
fi
echo "$lib"
