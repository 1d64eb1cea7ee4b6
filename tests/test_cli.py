"""The `kvpress-mm` command end to end, in subprocesses, on tiny random-weight models (1 sample each).

A subprocess mostly costs its imports (torch, transformers), so the file keeps to four: a single run
(with a plugin class by import path), a multirun with the basic launcher (with an entry-point plugin),
a multirun with the joblib launcher, and a bad override.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# the cheapest meaningful run: fidelity works on random weights; 1 sample, 2 new tokens, short prompt
TINY = ["task=fidelity", "task.n_samples=1", "task.max_new_tokens=2", "task.context_tokens=48"]


def kvpress_mm(args, cwd, extra_env=None, timeout=240):
    """Run the installed console script (falling back to `python -m kvpress_mm.cli`) from `cwd`."""
    script = Path(sys.executable).with_name("kvpress-mm")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kvpress_mm.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", **(extra_env or {})}
    return subprocess.run(command + list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


PLUGIN = '''
from dataclasses import dataclass
from kvpress_mm import EvictionStrategy, Plan
from kvpress_mm.selection import first_tokens, last_tokens


@dataclass
class KeepFirst(EvictionStrategy):
    """Registered through the kvpress_mm.strategies entry point."""

    def plan(self, layer):
        return Plan(keep=first_tokens(layer, layer.keep_count)[:, None, :])


@dataclass
class KeepLast(EvictionStrategy):
    """Not registered: used as strategy._target_=kvmm_cli_plugin.KeepLast."""

    tail: int = 0

    def plan(self, layer):
        return Plan(keep=last_tokens(layer, layer.keep_count)[:, None, :])
'''


def _install_plugin(root: Path) -> dict:
    """A plugin package and its dist-info (entry point) on PYTHONPATH: what `pip install` of it would leave."""
    (root / "kvmm_cli_plugin").mkdir(parents=True)
    (root / "kvmm_cli_plugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    dist = root / "kvmm_cli_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvmm-cli-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kvpress_mm.strategies]\nkeep_first = kvmm_cli_plugin:KeepFirst\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}


def test_single_run_with_target_class_writes_result_json_and_prints_table(tmp_path):
    """A single run; its strategy is a class given by import path (a plugin that is not registered)."""
    env = _install_plugin(tmp_path / "site")
    result = ok(
        kvpress_mm(
            [
                "model=tiny_llava",
                "strategy._target_=kvmm_cli_plugin.KeepLast",
                "strategy.tail=3",
                "strategy.budget=0.25",
                "task.num_images=1",
                *TINY,
            ],
            cwd=tmp_path,
            extra_env=env,
        )
    )
    # the default output dir (outputs/<date>/<time>_<strategy option>) under the working directory
    (path,) = tmp_path.glob("outputs/*/*_target/result.json")
    record = json.loads(path.read_text())
    assert record["config"]["strategy"] == {
        "_target_": "kvmm_cli_plugin.KeepLast",
        "budget": 0.25,
        "budget_tokens": None,
        "compress": "first_prompt",
        "tail": 3,
    }
    assert record["config"]["model"]["name"] == "tiny_llava"
    assert record["choices"]["strategy"] == "target"
    m = record["metrics"]
    assert m["n_samples"] == 1 and m["full_score"] == 1.0
    assert 0.2 < record["cache"]["kept_fraction"] < 0.3
    assert record["cache"]["kv_bytes_after"] < record["cache"]["kv_bytes_before"]
    assert record["timings"]["total_seconds"] > 0 and record["timings"]["prefill_seconds"] > 0
    env = record["environment"]
    assert env["versions"]["torch"] and env["versions"]["transformers"] and env["device"] == "cpu"
    # the strategy-vs-full table on stdout
    assert "| KeepLast" in result.stdout and "| full" in result.stdout and "KV MiB before" in result.stdout


def test_multirun_with_entry_point_plugin_aggregates_table_and_plot(tmp_path):
    """A sweep (basic launcher) over a built-in strategy and one registered by another package's entry point."""
    env = _install_plugin(tmp_path / "site")
    result = ok(
        kvpress_mm(
            [
                "-m",
                "model=tiny_llama",
                "strategy=h2o,keep_first",
                "strategy.budget=0.2,0.5",
                *TINY,
                "hydra.sweep.dir=sweep",
            ],
            cwd=tmp_path,
            extra_env=env,
        )
    )
    sweep = tmp_path / "sweep"
    records = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
    assert sorted((r["config"]["strategy"]["name"], r["config"]["strategy"]["budget"]) for r in records) == [
        ("h2o", 0.2),
        ("h2o", 0.5),
        ("keep_first", 0.2),
        ("keep_first", 0.5),
    ]
    assert all(abs(r["metrics"]["kept_fraction"] - r["config"]["strategy"]["budget"]) < 0.05 for r in records)
    lines = (sweep / "results.csv").read_text().strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith("job,strategy,budget,model,task")
    assert {line.split(",")[1] for line in lines[1:]} == {"h2o", "keep_first"}
    assert "| keep_first" in (sweep / "results.md").read_text()
    assert (sweep / "score_vs_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| h2o" in result.stdout  # the table is printed too
    assert "sweep points" in result.stderr  # the progress bar over sweep points


def test_multirun_with_joblib_launcher(tmp_path):
    result = ok(
        kvpress_mm(
            [
                "-m",
                "hydra/launcher=local",
                "hydra.launcher.n_jobs=2",
                "model=tiny_llama",
                "strategy=knorm,tova",
                *TINY,
                "hydra.sweep.dir=sweep",
            ],
            cwd=tmp_path,
        )
    )
    assert "Joblib.Parallel" in result.stdout + result.stderr
    rows = (tmp_path / "sweep" / "results.csv").read_text().strip().splitlines()[1:]
    assert sorted(r.split(",")[1] for r in rows) == ["knorm", "tova"]


def test_bad_override_is_one_line(tmp_path):
    """(test_cli_config.py checks the other bad values in-process; this one goes through the script.)"""
    result = kvpress_mm(["-m", "strategy=snapkv", "strategy.budget=0.1,7", "model=tiny_llama", *TINY], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kvpress-mm: error: strategy.budget:") and "(0, 1]" in lines[0] and "7" in lines[0]
    assert not (tmp_path / "multirun").exists()  # failed before any job started, even the good one


def test_bench_command_writes_json_table_and_plot(tmp_path):
    result = kvpress_mm(
        [
            "bench",
            "models=[micro]",
            "lengths=[48]",
            "strategies=[snapkv]",
            "budgets=[0.25]",
            "repeats=1",
            "decode_tokens=2",
            "eager_reference=false",
            f"hydra.run.dir={tmp_path / 'b'}",
        ],
        cwd=tmp_path,
    )
    ok(result)
    records = json.loads((tmp_path / "b" / "bench.json").read_text())["records"]
    assert [(r["model"], r["strategy"], r["budget"]) for r in records] == [("micro", "snapkv", 0.25)]
    assert "prefill / sdpa" in result.stdout and (tmp_path / "b" / "bench.png").exists()


def test_bench_bad_setting_is_one_line_before_any_model_loads(tmp_path):
    result = kvpress_mm(["bench", "models=[micro,huge]", "lengths=[48]"], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'huge'" in lines[0] and "mini_llava" in lines[0] and "micro" in lines[0]
