#!/usr/bin/env bash
# Installs headless Chromium and chromedriver from Debian's packages for the page's browser test
# (imgclf-http/tests/page.rs) when they are missing. Idempotent, and silent on stdout, since
# scripts/services.sh's stdout is eval'd; apt's output is shown (on stderr) only if it fails.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "setup-chromium: no apt-get here; install chromium and chromedriver yourself" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
echo "setup-chromium: installing chromium and chromium-driver" >&2
install() {
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    chromium chromium-driver >>"$log" 2>&1
}
# Slim images ship without package lists, and old lists name versions no longer served: update
# once when the first try fails.
if ! install && ! { $sudo apt-get update -qq >>"$log" 2>&1 && install; }; then
  cat "$log" >&2
  echo "setup-chromium: installing chromium failed" >&2
  exit 1
fi
