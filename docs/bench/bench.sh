#!/usr/bin/env bash
# The README's performance table, as it was run: one 2-core AMD EPYC (AVX-512) machine, CPU, 1 torch thread,
# float32, the commands one after the other with nothing else running (~2 h in all). Runs of earlier code on
# other machines are in this file's git history.
set -eu
kvpress-mm bench "models=[mid]" "lengths=[4096]" threads=1 output_dir=runs/bench_j                  # 38 min
kvpress-mm bench "models=[tiny]" "lengths=[1024,2048,4096,8192]" threads=1 output_dir=runs/bench_k  # 14 min
# mini_llava (30 layers) with every strategy is ~30 min a round at 4k: the strategies the targets name
kvpress-mm bench "models=[mini_llava]" "lengths=[4096]" threads=1 "budgets=[0.2]" \
  "strategies=[h2o,look_m,text_prior_pivot_merge,snapkv,streaming_llm,tova]" eager_reference=false \
  output_dir=runs/bench_l                                                                            # 14 min
kvpress-mm bench "models=[mid]" "lengths=[1024,2048]" threads=1 output_dir=runs/bench_m             # 22 min
# bench_j's two decode ratios at 0.6 and above (snapkv 0.60, text_prior_weighted_merge 0.63, with the same
# cache size as every other point at 0.2) measured again with 5 rounds, h2o and look_m beside them
kvpress-mm bench "models=[mid]" "lengths=[4096]" threads=1 "budgets=[0.2]" repeats=5 \
  "strategies=[snapkv,text_prior_weighted_merge,h2o,look_m]" eager_reference=false \
  output_dir=runs/bench_n                                                                            # 10 min
kvpress-mm bench "models=[mini_llava]" "lengths=[1024,2048]" threads=1 "budgets=[0.2]" \
  "strategies=[h2o,look_m,text_prior_pivot_merge,snapkv,streaming_llm,tova]" output_dir=runs/bench_o
# ---- stop 14: a second machine (2-core AMD EPYC, AVX2 only, no AVX-512; nothing else running) ----
# the 4k targets of the h2o / LOOK-M family re-checked on this slower machine (sdpa prefill of mid @ 4k: 20 s
# here vs 14 s on the AVX-512 one)
kvpress-mm bench "models=[mid]" "lengths=[4096]" threads=1 "budgets=[0.2]" \
  "strategies=[h2o,look_m,avg_merge,pivot_merge,weighted_merge,text_prior_avg_merge,snapkv]" \
  eager_reference=false output_dir=runs/check_a                                                     # 14 min
# mid @ 8k, every strategy at 0.1 and 0.2 (the eager reference stops at eager_max_length=4096)
kvpress-mm bench "models=[mid]" "lengths=[8192]" threads=1 output_dir=runs/bench_p                  # ~2.7 h
# merged into docs/bench (mid 8192 from bench_p; check_a stays out: its mid 4096 rows are from the other
# machine than the table's). Records made before the `machine` field existed were labelled by where they ran:
# mid 8192 "AMD EPYC, AVX2", every other "AMD EPYC, AVX-512".
python -m kvpress_mm.summarize_bench docs/bench runs/bench_j/bench.json runs/bench_k/bench.json \
  runs/bench_l/bench.json runs/bench_m/bench.json runs/bench_n/bench.json runs/bench_o/bench.json \
  runs/bench_p/bench.json --length 4200
# ---- stop 15: the same AVX2 machine, nothing else running ----
# the 4k targets re-checked after stop 14's CPU changes (same command as check_a)
kvpress-mm bench "models=[mid]" "lengths=[4096]" threads=1 "budgets=[0.2]" \
  "strategies=[h2o,look_m,avg_merge,pivot_merge,weighted_merge,text_prior_avg_merge,snapkv]" \
  eager_reference=false output_dir=runs/check_b                                                     # 14 min
# left-padded batches: 2 rows, the last one a quarter padding -> docs/bench/padded
kvpress-mm bench "models=[tiny]" "lengths=[2048,4096]" threads=1 "budgets=[0.2]" batch=2 padding=0.25 \
  "strategies=[h2o,look_m,text_prior_pivot_merge,snapkv,streaming_llm,tova]" output_dir=runs/bench_q  # 4 min
python -m kvpress_mm.summarize_bench docs/bench/padded runs/bench_q/bench.json
# one NVIDIA H200 (torch 2.11 + cu130, Triton 3.6): tests on the GPU, per-layer statistics, the bench with
# device=cuda (tiny and mid float32 1k-8k, mid bfloat16 4k-8k, every strategy at 0.2) -> docs/bench/cuda
bash docs/bench/device_check.sh                                                                     # 6 min
python -m kvpress_mm.summarize_bench docs/bench/cuda runs/device/bench_cuda_tiny/bench.json \
  runs/device/bench_cuda_mid/bench.json runs/device/bench_cuda_mid_bf16/bench.json --length 4200
# mini_llava at 8k (8233 tokens with its 4 images), the targets' strategies (42 min) -> merged into docs/bench
kvpress-mm bench "models=[mini_llava]" "lengths=[8192]" threads=1 "budgets=[0.2]" \
  "strategies=[h2o,look_m,text_prior_pivot_merge,snapkv,streaming_llm,tova]" output_dir=runs/bench_r
python -m kvpress_mm.summarize_bench docs/bench docs/bench/bench.json runs/bench_r/bench.json --length 4200
# ---- issue 21: the framework's cost per layer (docs/bench/overhead.md; a shared 2-core Xeon with AVX-512) ----
# before: commit 6664758 with kvpress_mm/bench/overhead.py copied in; the two alternated, twice (~1.5 min each)
kvpress-mm bench mode=overhead output_dir=runs/overhead_after_1
kvpress-mm bench "models=[mid]" "lengths=[4096]" "strategies=[streaming_llm,knorm,snapkv,h2o,look_m]" \
  "budgets=[0.2]" repeats=3 eager_reference=false decode_tokens=4 output_dir=runs/mid4k_after       # 5 min
