#!/usr/bin/env bash
# The README's performance table, as it was run (CPU, 1 torch thread, float32; ~2 h on a 2-core machine whose
# other core ran the results sweep at the same time). The first run was cut off after its 2k rows (bench.json
# keeps every finished (length, model)); the 4k rows of tiny and mid come from the two runs after it.
set -eu
kvpress-mm bench "models=[tiny,mid,mini_llava]" "lengths=[1024,2048,4096]" threads=1 output_dir=runs/bench_a
kvpress-mm bench "models=[tiny]" "lengths=[4096,8192]" threads=1 output_dir=runs/bench_b
kvpress-mm bench "models=[mid]" "lengths=[4096]" threads=1 output_dir=runs/bench_c
python -m kvpress_mm.summarize_bench docs/bench runs/bench_a/bench.json runs/bench_b/bench.json \
  runs/bench_c/bench.json --length 4096
