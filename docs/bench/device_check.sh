#!/usr/bin/env bash
# The GPU check: the tiny-model tests on CUDA, the statistics kernels against sdpa, the framework's overhead
# per layer (`kvpress-mm bench mode=overhead`: ms per layer, host reads, the CUDA syncs the driver saw) and
# `kvpress-mm bench` on device=cuda, unchanged. Run from the repo root on a CUDA machine that has torch and
# Triton; results go to $OUT (default runs/device). The step timeouts add up to under 10 minutes (one H200 run
# took 6.5 before the overhead step). kvpress beside ours: put its wheel and cachetools' in .whl/ too
# (`pip download --no-deps kvpress==0.5.5 cachetools -d .whl`; installed without dependencies below).
#
# Wheels of what the machine lacks (the project, transformers 5.2x, hydra-core, omegaconf, ...) may be put
# in .whl/ beforehand, e.g. on a machine without network access:
#   pip wheel --no-deps . -w .whl && pip download --no-deps transformers==5.25.0 hydra-core omegaconf ... -d .whl
# otherwise the project is expected to be installed (`pip install -e ".[test]"`).
set -u
OUT=${OUT:-runs/device}
# everything is written to $RESULTS and packed into $OUT/device_check.tgz after each step (a device tool may
# bring back only a few files, and a step may be cut off by its timeout)
RESULTS=${RESULTS:-/tmp/device_check}
mkdir -p "$OUT" "$RESULTS"
pack() { tar czf "$OUT/device_check.tgz" -C "$RESULTS" . ; }
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
# -P: import kvpress_mm from the installed package, not the source folder (its strategies live in strategies/)
PY="python3 -P"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$RESULTS/machine.txt"

# 1. tests on the GPU (tiny models of every family, the Triton kernels compiled)
TEST_FILES=${TEST_FILES:-"tests/test_attention_stats_triton.py tests/test_generate_equivalence.py tests/test_look_m.py
  tests/test_context.py tests/test_baselines.py tests/test_decode_phase.py tests/test_selection_rules.py
  tests/test_api_errors.py tests/test_overhead_layout.py tests/test_host_reads.py"}
# shellcheck disable=SC2086
timeout "${TEST_SECONDS:-150}" $PY -m pytest -q -rA -p no:cacheprovider --device cuda $TEST_FILES \
  > "$RESULTS/pytest.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$RESULTS/pytest.log" | tail -n 40
pack
if ! grep -q "^PASSED tests/test_attention_stats_triton.py::test_compiled_kernels_on_cuda" "$RESULTS/pytest.log"; then
  echo "Triton kernels failed or did not run on this GPU: the benchmark uses the torch form (KVPRESS_MM_TRITON=0)"
  export KVPRESS_MM_TRITON=0
fi

# 2. one layer: statistics / sdpa, torch form and Triton kernels
for dtype in float32 bfloat16; do
  timeout "${STATS_SECONDS:-50}" $PY -m kvpress_mm.bench.stats_kernels --device cuda --dtype $dtype 2>&1 | tee "$RESULTS/stats_$dtype.md"
done
pack

# 3. the framework's overhead per layer on the 32-layer narrow model at 256 tokens (wall clock after a sync), the
# host reads per layer / per prompt and the synchronisations CUDA reported per prefill (sync debug mode)
timeout "${OVERHEAD_SECONDS:-60}" $PY -m kvpress_mm.cli bench mode=overhead device=cuda overhead.pairs=15 \
  output_dir="$RESULTS/overhead_cuda" > "$RESULTS/overhead_cuda.log" 2>&1
grep "^|" "$RESULTS/overhead_cuda.log" || tail -n 20 "$RESULTS/overhead_cuda.log"
pack

# 4. the benchmark, unchanged but for device=cuda (one Hydra run per model: partial results survive a timeout)
bench() {  # name seconds overrides...
  local name=$1 seconds=$2
  shift 2
  timeout "$seconds" $PY -m kvpress_mm.cli bench device=cuda "$@" output_dir="$RESULTS/$name" > "$RESULTS/$name.log" 2>&1
  grep "^|" "$RESULTS/$name.log" || tail -n 20 "$RESULTS/$name.log"
  pack
}
# STRATEGIES="[h2o,snapkv]" narrows every run (default: all registered strategies)
STRATEGIES=${STRATEGIES:-"[]"}
bench bench_cuda_tiny "${TINY_SECONDS:-90}" "models=[tiny]" "lengths=[1024,2048,4096,8192]" "budgets=[0.2]" "strategies=$STRATEGIES"
bench bench_cuda_mid "${MID_SECONDS:-120}" "models=[mid]" "lengths=[1024,2048,4096,8192]" "budgets=[0.2]" "strategies=$STRATEGIES"
bench bench_cuda_mid_bf16 "${BF16_SECONDS:-60}" "models=[mid]" "lengths=[4096,8192]" "budgets=[0.2]" dtype=bfloat16 "strategies=$STRATEGIES"
