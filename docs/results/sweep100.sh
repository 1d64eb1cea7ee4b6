#!/usr/bin/env bash
# The 100-samples-a-cell comparison in the README (mini_llava, budget 0.2, both protocols, four tasks): one run per
# (task, protocol), every strategy on shared prefills (also=...), gold-answer metrics on. Two lanes, one thread each.
# Then: python -m kvpress_mm.summarize docs/results/sweep100 runs/sweep100
set -u
run() {  # task protocol
  kvpress-mm model=mini_llava task=$1 task.n_samples=100 protocol=$2 strategy=kvzip_mm strategy.budget=0.2 \
    "also=[kvzip,snapkv,h2o,text_prior_pivot_merge,streaming_llm]" likelihood=true threads=1 progress=false \
    print_table=false hydra.run.dir=runs/sweep100/$1_$2
}
lane_a() { run text_needle question_agnostic; run image_in_text question_agnostic; run image_needle question_aware; run multi_fact question_agnostic; }
lane_b() { run text_needle question_aware; run image_needle question_agnostic; run multi_fact question_aware; run image_in_text question_aware; }
lane_a > runs/sweep100_a.log 2>&1 &
lane_b > runs/sweep100_b.log 2>&1 &
wait
