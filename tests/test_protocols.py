"""Evaluation protocols: question_aware (the question inside the compressed prompt) and question_agnostic
(the context compressed alone, then every question asked on a copy of the compressed cache)."""

import json

import pytest
import torch

import kvpress_mm
from kvpress_mm.cli import main
from kvpress_mm.eval import evaluate, get_task, load_model
from kvpress_mm.eval import runner as runner_mod
from kvpress_mm.eval.protocol import split_questions

FAMILIES = ["tiny_llava", "tiny_qwen2_vl", "tiny_gemma3", "tiny_llama"]


@pytest.fixture(scope="module")
def bundles():
    torch.manual_seed(0)
    return {name: load_model(name) for name in FAMILIES}


@pytest.mark.parametrize("name", FAMILIES)
def test_context_plus_question_is_the_question_aware_prompt(bundles, name):
    bundle = bundles[name]
    sample = get_task("text_needle", n_samples=1, context_tokens=150, num_questions=3).samples()[0]
    split = split_questions(bundle, sample)
    assert len(split.questions) == 3
    for q, ids in zip(sample.questions, split.questions):
        aware = bundle.prepare([sample.asking(q)])["input_ids"][0]
        assert torch.equal(torch.cat([split.context["input_ids"][0], ids]), aware)
    # the context stops before the question: no question text is inside it
    assert split.context["input_ids"].shape[1] < bundle.prepare([sample])["input_ids"].shape[1] - 3


def _trimmed(tokens: torch.Tensor, eos: set[int]) -> list[int]:
    """The ids up to and including the first eos (what a model really generated)."""
    ids = tokens.tolist()
    ends = [i for i, t in enumerate(ids) if t in eos]
    return ids[: ends[0] + 1] if ends else ids


AGNOSTIC_TASKS = {
    "text_needle": dict(n_samples=2, context_tokens=150, num_questions=2, max_new_tokens=5),
    "image_lookup": dict(n_samples=2, num_images=2, context_tokens=40, num_questions=2, max_new_tokens=5),
}


@pytest.mark.parametrize(
    "name,task_name",
    [("tiny_llava", "text_needle"), ("tiny_qwen2_vl", "text_needle"), ("tiny_qwen2_vl", "image_lookup")],
)
def test_question_agnostic_equals_the_steps_done_by_hand(bundles, name, task_name, monkeypatch):
    bundle = bundles[name]
    task = get_task(task_name, **AGNOSTIC_TASKS[task_name])
    strategy = kvpress_mm.get_strategy("snapkv", budget=0.3)
    ask = runner_mod._ask
    generated = []  # the strategy's answer ids per question, as the runner got them

    def spy_ask(*args, **kwargs):
        run = ask(*args, **kwargs)
        if (args[2] if len(args) > 2 else kwargs.get("strategy")) is strategy:
            generated.extend(run.new_tokens)
        return run

    monkeypatch.setattr(runner_mod, "_ask", spy_ask)
    result = evaluate(bundle, task, strategy, protocol="question_agnostic", progress=False)
    assert result.protocol == "question_agnostic"
    assert result.n_samples == 4 and result.n_contexts == 2
    by_hand, by_hand_ids = [], []
    for sample in task.samples():
        split = split_questions(bundle, sample)
        assert len(split.questions) == 2
        context = kvpress_mm.compress_context(bundle.model, strategy, split.context)
        answers = context.ask(split.questions, max_new_tokens=5, **bundle.generate_kwargs)
        by_hand += [bundle.decode(a.tokens[None])[0] for a in answers]
        by_hand_ids += [a.tokens for a in answers]
    # the runner trims at the first eos; the tiny models' random answers rarely hit one
    got = [r["prediction"] for r in result.samples]
    assert [g for g in got] == [h[: len(g)] for g, h in zip(got, by_hand)]
    # the same ids, each trimmed at its first eos; the records' predictions are those ids
    eos = runner_mod._eos_ids(bundle)
    assert len(generated) == len(by_hand_ids) == 4
    assert [_trimmed(g, eos) for g in generated] == [_trimmed(h, eos) for h in by_hand_ids]
    assert got == [bundle.decode(torch.tensor([_trimmed(g, eos)]))[0] for g in generated]
    assert [r["id"] for r in result.samples][:2] == [task.samples()[0].id, task.samples()[0].id + "/q1"]


def test_fidelity_question_agnostic_is_exact_at_budget_one(bundles):
    bundle = bundles["tiny_llava"]
    task = get_task("fidelity", n_samples=2)
    result = evaluate(
        bundle, task, kvpress_mm.get_strategy("snapkv", budget=1.0), protocol="question_agnostic", progress=False
    )
    assert result.score == 1.0 and result.metrics["kl"] < 1e-6


def test_question_aware_asks_every_question_as_its_own_prompt(bundles):
    bundle = bundles["tiny_llama"]
    task = get_task("text_needle", n_samples=2, context_tokens=100, num_questions=3, max_new_tokens=2)
    result = evaluate(bundle, task, kvpress_mm.get_strategy("h2o", budget=0.5), progress=False)
    assert result.protocol == "question_aware" and result.n_samples == 6 and result.n_contexts == 6
    assert [r["answer"] for r in result.samples] == [q.answer for s in task.samples() for q in s.questions]


def test_unknown_protocol_is_named(bundles):
    with pytest.raises(ValueError, match="protocol must be one of question_aware, question_agnostic"):
        evaluate(bundles["tiny_llama"], "fidelity", None, protocol="after")


def test_cli_protocol_key_reaches_result_json_and_the_sweep_table(tmp_path):
    common = [
        "model=tiny_llava",
        "task=fidelity",
        "task.n_samples=1",
        "strategy=streaming_llm",
        "progress=false",
        "print_table=false",
    ]
    main(["-m", *common, "protocol=question_aware,question_agnostic", f"hydra.sweep.dir={tmp_path}"])
    protocols = sorted(json.loads(p.read_text())["config"]["protocol"] for p in tmp_path.glob("*/result.json"))
    assert protocols == ["question_agnostic", "question_aware"]
    table = (tmp_path / "results.csv").read_text().splitlines()
    assert "protocol" in table[0].split(",") and any("question_agnostic" in line for line in table[1:])
