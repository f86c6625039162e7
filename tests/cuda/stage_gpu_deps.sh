#!/usr/bin/env bash
# Copies the Debian packages the GPU checks build against (Eigen, Catch2, Google Benchmark,
# nlohmann-json; about 12 MB, docs left out) from this machine into DEST/usr/..., for a GPU
# machine that lacks them and cannot reach a mirror. run_gpu_checks.sh picks up build/gpu-deps
# by itself (or KVEVICT_DEPS_PREFIX) and passes it as CMAKE_PREFIX_PATH.
# Usage: tests/cuda/stage_gpu_deps.sh [DEST]   (default build/gpu-deps; carry it to the machine)
set -eu
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DEST="${1:-$ROOT/build/gpu-deps}"
mkdir -p "$DEST"
for pkg in libeigen3-dev catch2 libbenchmark-dev libbenchmark1debian nlohmann-json3-dev; do
  if ! dpkg -s "$pkg" >/dev/null 2>&1; then
    echo "stage_gpu_deps: $pkg is not installed here" >&2
    exit 1
  fi
  dpkg -L "$pkg" | grep -v '^/usr/share/doc' | while IFS= read -r f; do
    if [[ -f "$f" || -L "$f" ]]; then
      mkdir -p "$DEST$(dirname "$f")"
      cp -P "$f" "$DEST$f"  # symlinks stay symlinks (libbenchmark.so -> .so.1debian -> .so.1.7.1)
    fi
  done
done
du -sh "$DEST"
