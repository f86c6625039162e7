#!/usr/bin/env bash
# Installs kvevict's build and test dependencies from Debian 12 packages (root or sudo).
set -euo pipefail
pkgs=(cmake g++ clang make libeigen3-dev catch2 libbenchmark-dev nlohmann-json3-dev)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi
