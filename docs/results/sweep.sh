#!/usr/bin/env bash
# The README's results sweep, as it was run (mini_llava, 1 torch thread; ~4 h on one core of a 2-core CPU).
# Each line is one Hydra multirun; the full cache runs once per sample inside each of them.
# Then: python -m kvpress_mm.summarize docs/results runs/sweep/*
set -eu
S=streaming_llm,h2o,snapkv,pyramidkv,adakv,text_prior_pivot_merge,text_prior_avg_merge,text_prior_h2o,pivot_merge
B=0.05,0.1,0.2,0.5
run() { kvpress-mm -m model=mini_llava threads=1 "$@"; }
for spec in text_needle:6 multi_fact:6 image_needle:10 image_in_text:8 fidelity:4; do
  task=${spec%%:*}; n=${spec##*:}
  run task=$task task.n_samples=$n strategy=$S strategy.budget=$B hydra.sweep.dir=runs/sweep/$task
  # the merge_scope extension: evicted image tokens merge only into kept image tokens
  run task=$task task.n_samples=$n strategy=look_m strategy.merge_scope=same_modality strategy.budget=$B \
    hydra.sweep.dir=runs/sweep/${task}_scope
done
# text_needle: the LOOK-M release's text prior (every text token kept on top of the budget), and budget 0.8
run task=text_needle task.n_samples=6 strategy=text_prior_pivot_merge strategy.text_prior_mode=keep_all_text \
  strategy.budget=$B hydra.sweep.dir=runs/sweep/text_needle_keepall
run task=text_needle task.n_samples=6 strategy=$S strategy.budget=0.8 hydra.sweep.dir=runs/sweep/text_needle_b08
