"""Head profiles: the file format, checks against a model, lookup, and the visual-head measurement."""

import json
from pathlib import Path

import pytest
import tomllib
import torch
from helpers import tiny

from kvpress_mm.head_profiles import (
    FORMAT,
    HeadProfile,
    ModelIdentity,
    Probe,
    find_profile,
    hit_scores,
    image_regions,
    measure_visual_heads,
    shipped_profiles,
    target_region,
)
from kvpress_mm.modality import Modality

ROOT = Path(__file__).resolve().parents[1]


def _profile(layers=3, kv=2, q=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return HeadProfile(ModelIdentity("llava", layers, kv, q, "m"), torch.rand(layers, q, generator=gen), {"x": 1})


def test_save_load_round_trip_and_kv_scores(tmp_path):
    p = _profile()
    path = p.save(tmp_path / "p.json")
    text = path.read_text()
    assert json.loads(text)["format"] == FORMAT and text.count("\n  [") == 3  # one line per layer
    back = HeadProfile.load(path)
    assert back.model == p.model and back.method == {"x": 1} and torch.equal(back.scores, p.scores)
    # kv head h sums its query group (query heads 2h, 2h + 1)
    assert torch.allclose(back.kv_scores(), p.scores.view(3, 2, 2).sum(-1))
    assert back.top_heads(1)[0][2] == float(p.scores.max())


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda d: d.update(format="other"), "not a head profile"),
        (lambda d: d.update(version=7), "version 7"),
        (lambda d: d.pop("scores"), "missing scores"),
        (lambda d: d["model"].pop("num_kv_heads"), "model must give"),
        (lambda d: d["model"].update(num_layers=0), "positive integers"),
        (lambda d: d.update(scores=[[1.0, 2.0]]), "shape [1, 2]"),
        (lambda d: d["scores"][0].__setitem__(0, -1.0), ">= 0"),
        (lambda d: d["scores"][0].__setitem__(0, "a"), "rows of numbers"),
        (lambda d: d["scores"][1].append(1.0), "different lengths"),
        (lambda d: d["model"].update(num_kv_heads=3), "cannot be grouped"),
    ],
)
def test_malformed_profiles_are_refused_clearly(tmp_path, edit, named):
    data = _profile().to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        HeadProfile.load(path)
    assert named in str(err.value) and "bad.json" in str(err.value)


def test_unreadable_files_are_refused_clearly(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    for path, named in ((tmp_path / "x.json", "cannot be read as JSON"), (tmp_path / "none.json", "does not exist")):
        with pytest.raises(ValueError, match=named):
            HeadProfile.load(path)
    with pytest.raises(ValueError, match="is a directory"):
        HeadProfile.load(tmp_path)


def test_check_against_a_model_names_every_mismatch(tmp_path):
    model = tiny("llava").model
    identity = ModelIdentity.of(model)
    assert (identity.model_type, identity.num_layers, identity.num_kv_heads, identity.num_query_heads) == (
        "llava",
        2,
        2,
        4,
    )
    good = _profile(2, 2, 4)
    assert good.check(model) is good
    with pytest.raises(ValueError) as err:
        HeadProfile(ModelIdentity("qwen2_vl", 3, 2, 4), torch.zeros(3, 4), source="p.json").check(model)
    message = str(err.value)
    assert "model_type ('qwen2_vl' in the profile, 'llava' in the model)" in message
    assert "num_layers (3 in the profile, 2 in the model)" in message and "num_kv_heads" not in message
    assert "kvpress-mm profile-heads" in message


def test_find_profile_path_auto_and_none(tmp_path):
    model = tiny("llava").model
    path = _profile(2, 2, 4).save(tmp_path / "mine.json")
    assert find_profile(model, path).source == str(path)
    with pytest.raises(ValueError, match="no head profile for this model.*kvpress-mm profile-heads"):
        find_profile(model)
    with pytest.raises(ValueError, match="num_layers"):
        find_profile(ModelIdentity("llava", 3, 2, 4), path)


def test_the_shipped_mini_llava_profile_is_valid_and_packaged():
    paths = shipped_profiles()
    assert [p.name for p in paths] == ["mini_llava.json"]
    profile = HeadProfile.load(paths[0])
    assert profile.model == ModelIdentity("llava", 30, 3, 9, "mini_llava")
    assert profile.method["command"] == "kvpress-mm profile-heads" and profile.method["probes"] > 0
    assert find_profile(ModelIdentity("llava", 30, 3, 9)).source == str(paths[0])
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "profiles/*.json" in data["kvpress_mm"]


# ---------------------------------------------------------------- the measurement's pieces


def test_image_regions_and_target_region():
    row = torch.tensor([0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.int8)
    assert [r.tolist() for r in image_regions(row)] == [[1, 2], [5, 6, 7]]
    assert target_region(row, 2, 2).tolist() == [5, 6, 7]
    assert target_region(row, 1, 1).tolist() == [1, 2, 5, 6, 7]  # one image in two runs (tiles)
    with pytest.raises(ValueError, match="cannot tell"):
        target_region(row, 1, 3)
    assert image_regions(torch.full((4,), int(Modality.TEXT), dtype=torch.int8)) == []


def test_hit_scores_match_a_loop():
    gen = torch.Generator().manual_seed(0)
    top = torch.randint(0, 12, (3, 4, 2), generator=gen)
    region = torch.tensor([2, 3, 4, 5])
    got = hit_scores(top, region, 12)
    for layer in range(3):
        for head in range(4):
            hit = any(int(i) in region.tolist() for i in top[layer, head])
            assert float(got[layer, head]) == (0.25 if hit else 0.0)


def test_measurement_matches_eager_attention_reference():
    """The recorded top keys equal the argmax of eager attention over the generated sequence."""
    from kvpress_mm.adapters import adapter_for
    from kvpress_mm.eval import get_task, load_model

    bundle = load_model("tiny_llava")
    task = get_task("image_needle", n_samples=2, context_tokens=20)
    probes = [Probe(s, s.meta["needle_image"]) for s in task.samples()]
    got = measure_visual_heads(bundle, probes, topk=1, max_new_tokens=3)
    assert got.probes == 2 and got.tokens == 6

    model = bundle.model
    expected = torch.zeros_like(got.totals)
    for probe in probes:
        inputs = bundle.prepare([probe.sample])
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, **bundle.generate_kwargs)
        length = inputs["input_ids"].shape[1]
        modality = adapter_for(model).modality(model, inputs["input_ids"], inputs["attention_mask"], inputs)[0]
        region = target_region(modality, probe.target_image, 3).tolist()
        model.set_attn_implementation({"text_config": "eager"})
        try:
            full = {**inputs, "input_ids": out[:, :-1], "attention_mask": torch.ones_like(out[:, :-1])}
            attentions = model(**full, output_attentions=True).attentions
        finally:
            model.set_attn_implementation({"text_config": "sdpa"})
        for layer, probs in enumerate(attentions):
            for t in range(3):
                best = probs[0, :, length - 1 + t, : length + t].argmax(-1)
                expected[layer] += torch.tensor([float(int(j) in region) for j in best]) / len(region)
    torch.testing.assert_close(got.totals, expected.double())


# ---------------------------------------------------------------- the command


def test_profile_heads_command_writes_a_profile_sparsemm_reads(tmp_path):
    from test_cli import kvpress_mm, ok

    out = tmp_path / "tiny.json"
    result = kvpress_mm(
        [
            "profile-heads",
            "model=tiny_llava",
            "tasks.image_needle.n_samples=2",
            "tasks.image_in_text.n_samples=1",
            "only_right_answers=false",
            "max_new_tokens=2",
            "progress=false",
            f"output={out}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    ok(result)
    profile = HeadProfile.load(out)
    assert profile.model.num_layers == 2 and profile.method["probes"] == 3 and profile.method["queries_scored"] == 6
    assert "best heads" in result.stdout and str(out) in result.stdout
    # a task whose answer is in no single image, and a bad setting: one line each, exit 2
    for args, named in (
        (["+tasks.image_counting.n_samples=1"], "tasks.image_counting"),
        (["topk=0"], "topk must be an integer >= 1"),
    ):
        bad = kvpress_mm(["profile-heads", "model=tiny_llava", f"output={out}", *args], cwd=tmp_path)
        assert bad.returncode == 2 and named in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
