"""The CLI's checks of run options, in-process: a bad threads / device / attention backend / output path is
one line on stderr naming the key and what it allows, exit 2, before any model loads (and before Hydra
writes anything)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import run_cli

import kvpress_mm.bench.runner as bench_runner
import kvpress_mm.cli.run as cli_run
import kvpress_mm.eval
from kvpress_mm.cli import select_target_option
from kvpress_mm.eval import runner as runner_mod

# the cheapest meaningful run (as in test_cli.py): fidelity on a tiny random model, 1 sample, 2 new tokens
TINY = [
    "model=tiny_llama",
    "task=fidelity",
    "task.n_samples=1",
    "task.max_new_tokens=2",
    "task.context_tokens=48",
    "progress=false",
    "also=[]",  # the default strategy alone (not the main job's LOOK-M beside it)
]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the CLI hands Hydra its command line through sys.argv
    monkeypatch.setattr(runner_mod, "WARMUP_NEW_TOKENS", 0)


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test (the checks must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was loaded: {args}")

    monkeypatch.setattr(cli_run, "_load_once", refuse)
    monkeypatch.setattr(kvpress_mm.eval, "load_model", refuse)
    monkeypatch.setattr(bench_runner, "load_bench_model", refuse)


def one_error_line(args, capsys, key: str) -> str:
    code, _, err = run_cli(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"kvpress-mm: error: {key}: "), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ threads


@pytest.mark.parametrize("value", ["-1", "-8"])
def test_negative_threads_is_one_line(value, capsys, tmp_path, no_model):
    line = one_error_line([*TINY, f"threads={value}"], capsys, "threads")
    assert ">= 0" in line and "torch's default" in line and value in line
    assert not (tmp_path / "outputs").exists()


def test_threads_zero_is_torchs_default_and_the_count_used_is_recorded(capsys, tmp_path):
    before = torch.get_num_threads()
    code, out, err = run_cli([*TINY, "threads=0", "hydra.run.dir=run"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["config"]["threads"] == 0  # what was asked
    assert record["environment"]["torch_threads"] == before == torch.get_num_threads()  # what ran: untouched
    assert record["status"] == "ok" and record["interrupted"] is False


# ------------------------------------------------------------------------------------------ device


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize(
    "override, key, contains, machine",
    [
        ("device=cuda", "device", ["'cuda'", "sees no CUDA device", "use device=cpu"], _no_cuda),
        ("device=cuda:3", "device", ["'cuda:3'", "cuda:0..cuda:1"], _two_gpus),
        ("device=gpu0", "device", ["'gpu0'", "not a torch device", "cpu", "cuda"], _no_cuda),
        ("device=meta", "device", ["'meta'", "not supported", "cpu, cuda[:N] or mps"], _no_cuda),
        ("model.device=cuda", "model.device", ["'cuda'", "sees no CUDA device", "use model.device=cpu"], _no_cuda),
    ],
)
def test_device_torch_cannot_use_is_one_line(override, key, contains, machine, capsys, monkeypatch, no_model):
    machine(monkeypatch)
    line = one_error_line([*TINY, override], capsys, key)
    for text in contains:
        assert text in line, line


def test_bench_device_uses_the_same_check(capsys, monkeypatch, no_model, tmp_path):
    _no_cuda(monkeypatch)
    code, _, err = run_cli(["bench", "models=[micro]", "lengths=[48]", "device=cuda", "hydra.run.dir=b"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("kvpress-mm: error: bench: device 'cuda' asked for") and "use device=cpu" in lines[0]
    assert not (tmp_path / "b" / "bench.json").exists()


# ------------------------------------------------------------------------------------------ attention backend


@pytest.mark.parametrize("backend", ["flash_attention_2", "flex_attention"])
def test_attention_backend_kvpress_mm_does_not_compress_is_one_line(backend, capsys, no_model):
    line = one_error_line(
        ["model=mini_llava", "task=fidelity", f"model.attn_implementation={backend}"],
        capsys,
        "model.attn_implementation",
    )
    assert f"'{backend}'" in line and line.endswith("choose one of: sdpa, eager")


# ------------------------------------------------------------------------------------------ output paths


@pytest.fixture
def a_file(tmp_path):
    """A regular file: nothing can be created under it (a check that holds for root too)."""
    path = tmp_path / "a_file"
    path.write_text("not a folder\n")
    return path


def test_unwritable_result_file_fails_before_the_evaluation(a_file, capsys, tmp_path, no_model):
    line = one_error_line([*TINY, f"result_file={a_file}/result.json"], capsys, "result_file")
    assert "is a file, not a directory" in line and str(a_file) in line
    folder = tmp_path / "a_folder"
    folder.mkdir()
    line = one_error_line([*TINY, f"result_file={folder}"], capsys, "result_file")
    assert "is a directory" in line
    # every sweep point's result_file is checked
    line = one_error_line(["-m", *TINY, f"result_file=ok.json,{a_file}/r.json"], capsys, "result_file")
    assert not (tmp_path / "multirun").exists()


@pytest.mark.parametrize("result_file", ["{tmp}/abs.json", "ok.json,{tmp}/abs.json", "../up.json"])
def test_a_sweeps_result_file_outside_its_points_is_one_line(result_file, capsys, tmp_path, no_model):
    """In a sweep every point writes its result_file in its own directory: an absolute one (or one leading out)
    would be one file for all points, and the summary could not collect them."""
    value = result_file.format(tmp=tmp_path)
    line = one_error_line(["-m", *TINY, "strategy.budget=0.1,0.2", f"result_file={value}"], capsys, "result_file")
    assert "multirun (-m)" in line and "every point would write the same file" in line and "result.json" in line
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "abs.json").exists()


def test_a_sweeps_relative_result_file_that_cannot_be_written_is_one_line(a_file, capsys, tmp_path, no_model):
    (tmp_path / "sw" / "0").mkdir(parents=True)
    (tmp_path / "sw" / "0" / "blocked").write_text("a file\n")
    args = ["-m", *TINY, "result_file=ok.json,blocked/r.json", "hydra.sweep.dir=sw"]
    line = one_error_line(args, capsys, "result_file")
    assert "is a file, not a directory" in line and "blocked" in line


def test_a_single_run_with_an_absolute_result_file_writes_it_and_no_sweep_summary(capsys, tmp_path):
    """The sweep callback does nothing in a single run (it warned that a sweep summary was not refreshed)."""
    target = tmp_path / "elsewhere" / "abs.json"
    code, out, err = run_cli([*TINY, f"result_file={target}", "hydra.run.dir=run"], capsys)
    assert code == 0, err
    assert json.loads(target.read_text())["status"] == "ok"
    log = (tmp_path / "run" / "kvpress-mm.log").read_text()
    assert "sweep summary" not in log and "sweep summary" not in err, log
    assert not (tmp_path / "multirun").exists()


@pytest.mark.parametrize(
    "args, key",
    [
        ([*TINY, "hydra.run.dir={file}/run"], "hydra.run.dir"),
        (["-m", *TINY, "strategy.budget=0.1,0.2", "hydra.sweep.dir={file}/sweep"], "hydra.sweep.dir"),
        (["bench", "models=[micro]", "lengths=[48]", "hydra.run.dir={file}/bench"], "hydra.run.dir"),
        (["bench", "models=[micro]", "lengths=[48]", "output_dir={file}/bench"], "output_dir"),
    ],
)
def test_unwritable_run_directory_is_one_line(args, key, a_file, capsys, no_model):
    line = one_error_line([a.format(file=a_file) for a in args], capsys, key)
    assert "is a file, not a directory" in line and "choose a directory that can be written" in line


def test_probe_of_a_folder_that_takes_no_files(tmp_path, monkeypatch):
    """Permission bits do not stop root: the check creates (and removes) a file to know."""
    from kvpress_mm.cli import preflight

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    assert preflight.writable_problem(tmp_path / "new" / "dir", directory=True) is None
    assert list(tmp_path.iterdir()) == []  # nothing left behind, nothing created
    monkeypatch.setattr(preflight.tempfile, "mkstemp", refuse)
    problem = preflight.writable_problem(tmp_path / "new" / "dir", directory=True)
    assert "takes no new files (Permission denied)" in problem and str(tmp_path) in problem


def test_target_shortcut_goes_after_the_flags():
    """`-m strategy._target_=...`: strategy=target is put next to the override, Hydra wants flags first."""
    argv, target = select_target_option(["-m", "strategy._target_=pkg.Cls", "strategy.budget=0.1,0.2"])
    assert argv == ["-m", "strategy=target", "strategy._target_=pkg.Cls", "strategy.budget=0.1,0.2"]
    assert target == "pkg.Cls"


# ------------------------------------------------------------------------------- strategy vs model


def test_a_strategy_the_model_cannot_run_is_one_line(capsys):
    """sparsemm on a model without a head profile: refused after the model loads, before any sample runs."""
    line = one_error_line([*TINY, "strategy=sparsemm"], capsys, "strategy")
    assert "no head profile for this model" in line and "kvpress-mm profile-heads" in line
