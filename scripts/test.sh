#!/usr/bin/env bash
# The whole test suite against real services: starts (and on a fresh machine installs) what the
# tests need, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
# Captured first: `eval "$(…)"` alone would take eval's status and run the tests without services.
services="$(scripts/services.sh)"
eval "$services"
export IMGCLF_TEST_RESTARTS=1
exec cargo test --workspace "$@"
