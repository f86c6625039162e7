#!/usr/bin/env bash
# The CUDA backend's checks on a GPU machine, in one run of at most ~9.5 minutes:
#   nvidia-smi -> dependencies -> configure (CMAKE_CUDA_ARCHITECTURES=native, build/gpu) ->
#   build kvevict-cuda-tests + kvevict-cuda-bench (kvevict-tests / kvevict-replay in the
#   background, build only) -> kvevict-cuda-tests -> compute-sanitizer memcheck (small shapes)
#   -> kvevict-cuda-bench (JSON + console + cuda_bench_tables.md) -> racecheck on the shared-memory kernels if time is left.
# Every step is logged and timed; a failing step does not stop the later ones, but the script
# exits non-zero if any step failed. Outputs go to $OUT (default ./gpu_out).
#
# Usage, from the repository root: tests/cuda/run_gpu_checks.sh
# Environment: OUT (output folder), KVEVICT_GPU_BUDGET_S (seconds, default 570), JOBS (default
# nproc), KVEVICT_DEPS_PREFIX (a folder made by tests/cuda/stage_gpu_deps.sh, for machines where
# the Debian packages are missing and apt cannot reach a mirror; build/gpu-deps is used if present),
# KVEVICT_GPU_BUILD_DIR (default build/gpu), KVEVICT_CUDA_ARCH (default native; a dry run on a
# machine without a GPU needs a named one, e.g. 90), KVEVICT_RACECHECK_FILTER (Catch test specs
# for racecheck), KVEVICT_RACECHECK_S (its time cap, default 150; racecheck is slow) and
# KVEVICT_BENCH_FILTER (a --benchmark_filter regex; default: every benchmark), KVEVICT_BENCH_REPETITIONS
# (default 1; more reports mean/median/stddev per benchmark); KVEVICT_SKIP_CPU_BUILD (non-empty: no
# background build of the CPU targets); KVEVICT_NSYS_FILTER (a --benchmark_filter regex: those
# benchmarks once more under nsys, its per-kernel time summary in nsys.txt; nsys must exist).
set -u

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT" || exit 2
BUILD="${KVEVICT_GPU_BUILD_DIR:-$ROOT/build/gpu}"
BUDGET="${KVEVICT_GPU_BUDGET_S:-570}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 8)}"
START=$SECONDS
LOG="$OUT/gpu_checks.log"
: >"$LOG"
FAILED=()
SKIPPED=()

log() { echo "[$(date +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }
remaining() { echo $((BUDGET - (SECONDS - START))); }
# min(cap, remaining - reserve), at least 5 seconds. Reserves are sized for the default 570 s
# budget and shrink with a smaller one (a 420 s budget once left configure 5 s).
time_for() {
  local cap=$1 reserve=$2 r
  ((BUDGET < 570)) && reserve=$((reserve * BUDGET / 570))
  r=$(($(remaining) - reserve))
  ((r > cap)) && r=$cap
  ((r < 5)) && r=5
  echo "$r"
}

# run_step NAME TIMEOUT_S OUTFILE CMD...: runs CMD with a timeout, output to OUTFILE and the log.
run_step() {
  local name=$1 limit=$2 outfile=$3
  shift 3
  log "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" >"$outfile" 2>&1
  rc=$?
  tail -n 40 "$outfile" | sed 's/^/    /' | tee -a "$LOG" >/dev/null
  if ((rc == 0)); then
    log "=== $name: OK ($((SECONDS - t0))s)"
  else
    [[ $rc == 124 || $rc == 137 ]] && log "=== $name: TIMED OUT after ${limit}s" || log "=== $name: FAILED rc=$rc ($((SECONDS - t0))s)"
    FAILED+=("$name (rc=$rc)")
  fi
  return $rc
}

log "kvevict GPU checks: root $ROOT, out $OUT, budget ${BUDGET}s, jobs $JOBS"

# --- 0. the device -----------------------------------------------------------------------
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L 2>&1 | tee -a "$LOG" | tee "$OUT/nvidia_smi.txt"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 |
    tee -a "$LOG" >>"$OUT/nvidia_smi.txt"
else
  log "nvidia-smi not found"
  FAILED+=("nvidia-smi missing")
fi
[[ -d /usr/local/cuda/bin ]] && export PATH="/usr/local/cuda/bin:$PATH"
if [[ -z "${CUDACXX:-}" ]] && command -v nvcc >/dev/null 2>&1; then export CUDACXX="$(command -v nvcc)"; fi
log "nvcc: ${CUDACXX:-not found} $( (${CUDACXX:-nvcc} --version 2>/dev/null || true) | tail -n 2 | tr '\n' ' ')"
log "cmake: $(cmake --version 2>/dev/null | head -n 1), g++: $(g++ --version 2>/dev/null | head -n 1)"

# --- 1. dependencies ---------------------------------------------------------------------
DEPS_PREFIX="${KVEVICT_DEPS_PREFIX:-}"
[[ -z "$DEPS_PREFIX" && -d "$ROOT/build/gpu-deps/usr" ]] && DEPS_PREFIX="$ROOT/build/gpu-deps"
declare -A HAVE=()
check_pkg() {  # check_pkg NAME DEBIAN_PACKAGE FILE_UNDER_PREFIX
  if dpkg -s "$2" >/dev/null 2>&1; then
    HAVE[$1]=system
  elif [[ -n "$DEPS_PREFIX" && -e "$DEPS_PREFIX/$3" ]]; then
    HAVE[$1]=staged
  fi
}
check_all() {
  HAVE=()
  check_pkg eigen libeigen3-dev usr/share/eigen3/cmake/Eigen3Config.cmake
  check_pkg catch2 catch2 usr/lib/cmake/Catch2/Catch2Config.cmake
  check_pkg benchmark libbenchmark-dev usr/lib/x86_64-linux-gnu/cmake/benchmark/benchmarkConfig.cmake
  check_pkg json nlohmann-json3-dev usr/share/cmake/nlohmann_json/nlohmann_jsonConfig.cmake
}
check_all
MISSING_PKGS=()
for p in eigen:libeigen3-dev catch2:catch2 benchmark:libbenchmark-dev json:nlohmann-json3-dev; do
  [[ -z "${HAVE[${p%%:*}]:-}" ]] && MISSING_PKGS+=("${p#*:}")
done
if ((${#MISSING_PKGS[@]} > 0)); then
  log "missing packages: ${MISSING_PKGS[*]}; trying apt-get"
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    [[ $(id -u) != 0 ]] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
    export DEBIAN_FRONTEND=noninteractive
    if ! timeout 90 $SUDO apt-get install -y --no-install-recommends "${MISSING_PKGS[@]}" >>"$LOG" 2>&1; then
      timeout 60 $SUDO apt-get update >>"$LOG" 2>&1 &&
        timeout 90 $SUDO apt-get install -y --no-install-recommends "${MISSING_PKGS[@]}" >>"$LOG" 2>&1
    fi
  fi
  check_all
fi
for p in eigen catch2 benchmark json; do log "dependency $p: ${HAVE[$p]:-MISSING}"; done
if [[ -z "${HAVE[eigen]:-}" ]]; then
  log "Eigen is missing: nothing can be configured. Stage the packages on a machine that has them"
  log "(tests/cuda/stage_gpu_deps.sh build/gpu-deps) and carry build/gpu-deps."
  FAILED+=("dependencies (Eigen missing)")
fi
BUILD_TESTS=ON
BUILD_BENCH=ON
if [[ -z "${HAVE[catch2]:-}" || -z "${HAVE[json]:-}" ]]; then
  BUILD_TESTS=OFF
  FAILED+=("dependencies (Catch2 or nlohmann-json missing: no tests)")
fi
if [[ -z "${HAVE[benchmark]:-}" ]]; then
  BUILD_BENCH=OFF
  FAILED+=("dependencies (Google Benchmark missing: no benchmarks)")
fi

# --- 2. configure ------------------------------------------------------------------------
CMAKE_ARGS=(-S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="${KVEVICT_CUDA_ARCH:-native}"
  -DKVEVICT_WERROR=OFF -DKVEVICT_BUILD_EXAMPLES=OFF -DKVEVICT_BUILD_TESTS=$BUILD_TESTS
  -DKVEVICT_BUILD_BENCHMARKS=$BUILD_BENCH)
[[ -n "$DEPS_PREFIX" ]] && CMAKE_ARGS+=("-DCMAKE_PREFIX_PATH=$DEPS_PREFIX/usr")
CONFIGURED=0
if [[ -n "${HAVE[eigen]:-}" ]]; then
  run_step configure "$(time_for 90 450)" "$OUT/configure.txt" cmake "${CMAKE_ARGS[@]}" && CONFIGURED=1
  if ((CONFIGURED)) && ! cmake --build "$BUILD" --target help 2>/dev/null | grep -q "kvevict-cuda"; then
    log "configure: no kvevict-cuda targets (CMake found no CUDA compiler?)"
    FAILED+=("configure (no CUDA targets)")
    CONFIGURED=0
  fi
fi

# --- 3. build ----------------------------------------------------------------------------
TESTS_BIN="$BUILD/tests/cuda/kvevict-cuda-tests"
BENCH_BIN="$BUILD/bench/cuda/kvevict-cuda-bench"
CPU_BUILD_PID=""
if ((CONFIGURED)); then
  TARGETS=()
  [[ $BUILD_TESTS == ON ]] && TARGETS+=(kvevict-cuda-tests)
  [[ $BUILD_BENCH == ON ]] && TARGETS+=(kvevict-cuda-bench)
  if ((${#TARGETS[@]} > 0)); then
    run_step build-cuda "$(time_for 300 150)" "$OUT/build_cuda.txt" cmake --build "$BUILD" -j "$JOBS" --target "${TARGETS[@]}"
  fi
  if [[ $BUILD_TESTS == ON && -z "${KVEVICT_SKIP_CPU_BUILD:-}" ]]; then  # CPU targets in the background, build only, lower priority
    log "=== build-cpu (background): kvevict-tests kvevict-replay"
    (timeout 240 nice -n 10 cmake --build "$BUILD" -j "$JOBS" --target kvevict-tests kvevict-replay \
      >"$OUT/build_cpu.txt" 2>&1; echo "rc=$?" >>"$OUT/build_cpu.txt") &
    CPU_BUILD_PID=$!
  fi
fi

# --- 4. tests ----------------------------------------------------------------------------
if [[ -x "$TESTS_BIN" ]]; then
  run_step cuda-tests "$(time_for 150 70)" "$OUT/cuda_tests.txt" "$TESTS_BIN" --durations yes
  grep -c "SKIPPED: no CUDA device" "$OUT/cuda_tests.txt" >/dev/null 2>&1 &&
    { log "cuda-tests SKIPPED (no device visible to the tests)"; FAILED+=("cuda-tests skipped: no device"); }
else
  [[ $BUILD_TESTS == ON ]] && FAILED+=("cuda-tests (binary missing)")
fi

# --- 5. compute-sanitizer memcheck ------------------------------------------------------------
SANITIZER="$(command -v compute-sanitizer 2>/dev/null || true)"
[[ -z "$SANITIZER" && -x /usr/local/cuda/bin/compute-sanitizer ]] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer
[[ -z "$SANITIZER" && -x /usr/local/cuda/compute-sanitizer/compute-sanitizer ]] &&
  SANITIZER=/usr/local/cuda/compute-sanitizer/compute-sanitizer
if [[ -x "$TESTS_BIN" && -n "$SANITIZER" ]]; then
  # Small shapes (KVEVICT_CUDA_TEST_SMALL) so every kernel runs under the tool in time. The test
  # that provokes a real cudaMalloc failure on purpose is left out: memcheck reports the API error.
  KVEVICT_CUDA_TEST_SMALL=1 run_step memcheck "$(time_for 180 70)" "$OUT/memcheck.txt" \
    "$SANITIZER" --tool memcheck --error-exitcode 86 --print-limit 20 --leak-check no "$TESTS_BIN" \
    "~CUDA runtime failures become CudaError naming the call"
elif [[ -x "$TESTS_BIN" ]]; then
  log "compute-sanitizer not found"
  FAILED+=("memcheck (compute-sanitizer missing)")
fi

# --- 6. benchmarks -----------------------------------------------------------------------
if [[ -x "$BENCH_BIN" ]]; then
  REPS="${KVEVICT_BENCH_REPETITIONS:-1}"
  REP_ARGS=()
  ((REPS > 1)) && REP_ARGS=(--benchmark_repetitions="$REPS" --benchmark_report_aggregates_only=true)
  run_step cuda-bench "$(time_for 200 10)" "$OUT/cuda_bench.txt" "$BENCH_BIN" --benchmark_min_time=0.1 \
    --benchmark_filter="${KVEVICT_BENCH_FILTER:-.}" "${REP_ARGS[@]}" \
    --benchmark_counters_tabular=true --benchmark_out="$OUT/cuda_bench.json" --benchmark_out_format=json
  # The same results as RESULTS.md tables, each figure beside its baseline (needs python3).
  if [[ -s "$OUT/cuda_bench.json" ]] && command -v python3 >/dev/null 2>&1; then
    python3 "$ROOT/bench/cuda/summarize.py" "$OUT/cuda_bench.json" >"$OUT/cuda_bench_tables.md" 2>&1 ||
      log "summarize.py failed (see cuda_bench_tables.md)"
  fi
  if [[ -n "${KVEVICT_NSYS_FILTER:-}" ]]; then  # where the time of each kernel goes
    NSYS="$(command -v nsys 2>/dev/null || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -n 1)"
    if [[ -n "$NSYS" ]]; then
      run_step nsys "$(time_for 120 60)" "$OUT/nsys.txt" "$NSYS" profile --trace=cuda --stats=true --force-overwrite=true \
        -o /tmp/kvevict_nsys "$BENCH_BIN" --benchmark_min_time=0.05 --benchmark_filter="$KVEVICT_NSYS_FILTER"
    else
      log "nsys not found"
      SKIPPED+=("nsys (not installed)")
    fi
  fi
else
  [[ $BUILD_BENCH == ON ]] && FAILED+=("cuda-bench (binary missing)")
fi

# --- 7. racecheck on the shared-memory kernels (tiled column sums, selection), if time is left
if [[ -x "$TESTS_BIN" && -n "$SANITIZER" ]]; then
  if (($(remaining) > 60)); then
    KVEVICT_CUDA_TEST_SMALL=1 run_step racecheck "$(time_for "${KVEVICT_RACECHECK_S:-150}" 20)" "$OUT/racecheck.txt" \
      "$SANITIZER" --tool racecheck --error-exitcode 86 --print-limit 20 "$TESTS_BIN" \
      "${KVEVICT_RACECHECK_FILTER:-window_column_stats*,accumulate_query_column_sums*,select_topk on CUDA throws*,select_victims*,compact on CUDA*,evict_one*}"
  else
    SKIPPED+=("racecheck (out of time)")
  fi
fi

# --- the CPU build started in the background -------------------------------------------------
if [[ -n "$CPU_BUILD_PID" ]]; then
  if kill -0 "$CPU_BUILD_PID" 2>/dev/null; then
    if (($(remaining) > 10)); then sleep "$(time_for 60 5)"; fi
    kill -0 "$CPU_BUILD_PID" 2>/dev/null && { kill -- "$CPU_BUILD_PID" 2>/dev/null; SKIPPED+=("build-cpu (out of time)"); }
  fi
  wait "$CPU_BUILD_PID" 2>/dev/null
  log "build-cpu: $(tail -n 1 "$OUT/build_cpu.txt" 2>/dev/null)"
  grep -q "^rc=0$" "$OUT/build_cpu.txt" 2>/dev/null || SKIPPED+=("build-cpu (see build_cpu.txt)")
fi

# --- summary -----------------------------------------------------------------------------
{
  echo "kvevict GPU checks finished in $((SECONDS - START))s"
  grep -h "^test cases:\|^All tests passed" "$OUT/cuda_tests.txt" 2>/dev/null | sed 's/^/cuda-tests: /'
  grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" "$OUT/memcheck.txt" "$OUT/racecheck.txt" 2>/dev/null
  ((${#SKIPPED[@]} > 0)) && printf 'not done: %s\n' "${SKIPPED[@]}"
  if ((${#FAILED[@]} > 0)); then printf 'FAILED: %s\n' "${FAILED[@]}"; else echo "all steps passed"; fi
} | tee "$OUT/summary.txt" | tee -a "$LOG"
((${#FAILED[@]} == 0))
