#!/usr/bin/env bash
# Sets everything up and runs kvevict's tests: Debian dependencies, a warnings-as-errors Debug
# build (CUDA backend and tests compiled too when nvcc is present), then CTest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
if [ -z "${KVEVICT_MODEL_DIR:-}" ] && [ -d ../shared/models ]; then export KVEVICT_MODEL_DIR="$(cd ../shared/models && pwd)"; fi
jobs="$(nproc)"
cmake --preset dev
cmake --build --preset dev -j "$jobs"
ctest --preset dev -j "$jobs"
