#!/usr/bin/env bash
# Sets everything up and runs the main demo: every policy on the real stories260K model,
# quality (KL, top-1, perplexity) and speed per budget. Table on stdout, CSV and SVG under out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
if [ -z "${KVEVICT_MODEL_DIR:-}" ]; then
  if [ -f ../shared/models/stories260K.bin ]; then
    KVEVICT_MODEL_DIR="$(cd ../shared/models && pwd)"
  else
    bash scripts/download_model.sh models
    KVEVICT_MODEL_DIR="$(pwd)/models"
  fi
  export KVEVICT_MODEL_DIR
fi
cmake --preset release -DKVEVICT_BUILD_TESTS=OFF -DKVEVICT_BUILD_BENCHMARKS=OFF
cmake --build --preset release --target kvevict-eval -j "$(nproc)"
mkdir -p out
./build/release/examples/llama2/kvevict-eval --csv out/eval.csv --plot out/eval.svg "$@"
echo "table above; CSV: out/eval.csv; plot: out/eval.svg"
