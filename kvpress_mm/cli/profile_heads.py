"""The `profile-heads` command's job: find a model's visual heads (SparseMM) and write its head profile.

    kvpress-mm profile-heads                                   # mini_llava, conf/profile_heads.yaml's tasks
    kvpress-mm profile-heads model=tiny_llava queries=answer+question output=/tmp/tiny.json
    kvpress-mm profile-heads tasks.image_needle.n_samples=60   # more samples, a steadier profile
    kvpress-mm profile-heads +tasks.image_lookup.n_samples=20 ~tasks.image_in_text   # add (+) or drop (~) a task

The probes are the samples of synthetic image tasks whose answer lies in a known image: image_needle (the
needle image), image_lookup (the labelled target image), image_in_text (its only image), or any task whose
samples name it in meta["target_image"] / meta["needle_image"] or have one image. Each probe is generated
greedily; the queries that produce the answer (SparseMM's rule) vote for the heads whose top-k keys lie in
that image (kvpress_mm.head_profiles.measure_visual_heads). The profile is written to `output` (relative:
inside the run's output directory), ready for `strategy=sparsemm strategy.profile=<file>`.
"""

from __future__ import annotations

import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kvpress_mm.head_profiles import QUERIES, ModelIdentity, Probe, measure_visual_heads, profile_from

from ..validate import check_bool, check_choice, check_int, check_mapping, check_str
from . import errors
from .build import ConfigError, build_task, model_call

TARGET_KEYS = ("target_image", "needle_image")  # sample.meta keys naming the image that holds the answer
OWNER = "profile-heads"


def answer_image(sample) -> int | None:
    """The 1-based image of `sample` that holds its answer: named by its meta, or its only image."""
    for key in TARGET_KEYS:
        if isinstance(sample.meta.get(key), int):
            return int(sample.meta[key])
    n_images = sum(1 for c in sample.content if not isinstance(c, str))
    return 1 if n_images == 1 else None


def probes_from_tasks(tasks: dict, only_right_answers: bool = True) -> list[Probe]:
    """The probes of every task (name -> field overrides); ConfigError for a task whose answers are not in a
    known image. only_right_answers=False: no answer check, every generated token is scored."""
    check_mapping(OWNER, "tasks", tasks, what="a mapping of task names to their field overrides")
    if not tasks:
        raise ConfigError("tasks", "give at least one task (e.g. tasks.image_needle.n_samples=20)")
    probes = []
    for name, fields in tasks.items():
        task = build_task({"name": name, **dict(fields or {})})
        samples = task.samples()
        targets = [answer_image(s) for s in samples]
        if samples and any(t is None for t in targets):
            raise ConfigError(
                f"tasks.{name}",
                "its samples do not say which image holds the answer; use image_needle, image_lookup, "
                "image_in_text or a task whose samples give meta['target_image']",
            )
        probes += [Probe(s, t, task.score if only_right_answers else None) for s, t in zip(samples, targets)]
    return probes


def run_profile_heads(cfg: DictConfig) -> dict:
    """Hydra task function: measure, write the profile, print the best heads."""
    try:
        return _run(cfg)
    except ValueError as err:  # ConfigError and the validators: one line, exit 2
        errors.fail(err)


def _run(cfg: DictConfig) -> dict:
    import torch

    from kvpress_mm.eval import load_model

    started = time.perf_counter()
    check_int(OWNER, "topk", cfg.topk, minimum=1)
    check_int(OWNER, "max_new_tokens", cfg.max_new_tokens, minimum=1)
    check_choice(OWNER, "queries", cfg.queries, QUERIES)
    check_str(OWNER, "output", cfg.output, what="a file name or path")
    check_bool(OWNER, "progress", cfg.progress)
    check_bool(OWNER, "only_right_answers", cfg.only_right_answers)
    check_int(OWNER, "threads", cfg.threads, minimum=0, allow_none=True)
    tasks = OmegaConf.to_container(cfg.tasks, resolve=True) if isinstance(cfg.tasks, DictConfig) else cfg.tasks
    probes = probes_from_tasks(tasks, cfg.only_right_answers)
    model_name, options = model_call(cfg.model)
    output = Path(str(cfg.output)).expanduser()
    if not output.is_absolute():
        output = Path(HydraConfig.get().runtime.output_dir) / output
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    try:
        bundle = load_model(model_name, **options)
    except (ValueError, TypeError) as err:
        raise ConfigError("model", str(err)) from None
    loaded = time.perf_counter()
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(probes), desc="profile-heads", unit="probe")
    try:
        measurement = measure_visual_heads(
            bundle,
            probes,
            topk=cfg.topk,
            max_new_tokens=cfg.max_new_tokens,
            queries=cfg.queries,
            progress=(lambda _probe: bar.update(1)) if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    done = time.perf_counter()
    from kvpress_mm import __version__

    method = {
        "command": "kvpress-mm profile-heads",
        "rule": "SparseMM's visual score: per scored query, 1/|image| to each head whose top-k keys hit its image",
        "model": {"name": model_name, **options},
        "tasks": tasks,
        "topk": cfg.topk,
        "queries": cfg.queries,
        "only_right_answers": cfg.only_right_answers,
        "max_new_tokens": cfg.max_new_tokens,
        "threads": torch.get_num_threads(),
        "load_seconds": round(loaded - started, 1),
        "measure_seconds": round(done - loaded, 1),
        "kvpress_mm": __version__,
    }
    profile = profile_from(measurement, ModelIdentity.of(bundle.model), method)
    path = profile.save(output)
    print(
        f"{measurement.probes} probes ({measurement.answered} answered right), {measurement.tokens} queries scored, "
        f"{done - loaded:.0f} s; best heads (layer, head, score):",
        flush=True,
    )
    for layer, head, score in profile.top_heads(10):
        print(f"  {layer:3d} {head:3d}  {score:.6f}", flush=True)
    print(f"profile: {path}", flush=True)
    return profile.to_dict()
