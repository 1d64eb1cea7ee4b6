"""The CLI's configs in-process: in sync with the registries, composable, typed, and clear when wrong."""

import json

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import kvpress_mm
from kvpress_mm.cli import select_target_option, split_command
from kvpress_mm.cli.build import ConfigError, build_strategy, build_task, model_call, strategy_points
from kvpress_mm.cli.config import CONFIG_MODULE, conf_dir, register_configs
from kvpress_mm.cli.generate import GENERATOR_COMMAND, builtin_strategies, expected_files
from kvpress_mm.cli.preflight import check_command_line
from kvpress_mm.eval import list_models, list_tasks


@pytest.fixture(scope="module", autouse=True)
def _schemas():
    register_configs()


@pytest.fixture
def configs():
    """compose(*overrides) of the eval config, as the CLI would (hydra=True: with the hydra node)."""
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        yield lambda *overrides, hydra=False: compose("eval", list(overrides), return_hydra_config=hydra)


def _options(group):
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


# ------------------------------------------------------------------------------------------ in sync


def test_every_registered_strategy_has_a_config_and_vice_versa():
    assert _options("strategy") == sorted(builtin_strategies())
    assert set(builtin_strategies()) <= set(kvpress_mm.list_strategies())


def test_every_task_and_model_has_a_config_and_vice_versa():
    assert _options("task") == list_tasks()
    names = {OmegaConf.load(conf_dir() / "model" / f"{o}.yaml").name for o in _options("model")}
    assert names == set(list_models())  # every loader has a config, every config a loader
    assert {f"tiny_{f}" for f in kvpress_mm.testing.TINY_FAMILIES} <= set(_options("model"))
    assert {"mini_llava", "llava-1.5-7b", "llava-onevision-7b", "qwen2.5-vl-7b"} <= set(_options("model"))


def test_generated_configs_are_up_to_date():
    stale = [str(p) for p, text in expected_files().items() if not p.exists() or p.read_text() != text]
    assert not stale, f"out of date (run `{GENERATOR_COMMAND}`): {stale}"


# ------------------------------------------------------------------------------------------ compose


def test_default_config(configs):
    cfg = configs()
    # the recommended default (KVzip, text and vision ranked apart) beside LOOK-M and the full cache
    assert cfg.strategy.name == "kvzip_mm" and cfg.strategy.budget == 0.2
    assert cfg.model.name == "mini_llava" and cfg.task.name == "text_needle" and cfg.compare_full
    strategy = build_strategy(cfg.strategy)
    assert (strategy.budget, strategy.modality_budgets, strategy.head_budgets) == (0.2, "proportional", "model")
    assert cfg.also is None and cfg.share_prefill  # null: LOOK-M beside the default strategy only
    points = strategy_points(cfg)
    assert [node["name"] for node, _, _ in points] == ["kvzip_mm", "text_prior_pivot_merge"]
    look_m = points[1][1]
    assert (look_m.budget, look_m.text_prior, look_m.merge) == (0.2, True, "pivotal")
    assert [node["name"] for node, _, _ in strategy_points(configs("strategy=snapkv"))] == ["snapkv"]
    assert len(strategy_points(configs("also=[]"))) == 1
    assert build_task(cfg.task).n_samples == cfg.task.n_samples <= 10


@pytest.mark.parametrize("name", sorted(kvpress_mm.list_strategies()))
def test_every_strategy_config_builds_its_strategy(configs, name):
    cfg = configs(f"strategy={name}", "strategy.budget=0.3")
    strategy = build_strategy(cfg.strategy)
    assert strategy == kvpress_mm.get_strategy(name, budget=0.3)  # dataclass equality: same fields


def test_models_and_tasks_compose(configs):
    for model in _options("model"):
        cfg = configs(f"model={model}")
        if cfg.model.name != "hub":  # hub configs need the hub; their options are checked by load_model
            assert model_call(cfg.model) == (model, {})
    for task in list_tasks():
        assert build_task(configs(f"task={task}", "task.n_samples=3").task).n_samples == 3


def test_schema_types_come_from_the_dataclasses(configs):
    cfg = configs("strategy=snapkv", "strategy.window_size=16", "task.needle_depth=0.5")
    assert cfg.strategy.window_size == 16 and cfg.task.needle_depth == 0.5
    with pytest.raises(Exception) as err:
        configs("strategy=snapkv", "strategy.window_size=abc")
    assert "could not be converted to Integer" in str(err.value.__cause__)


def test_dict_fields_take_their_own_keys(configs):
    cfg = configs("strategy=adakv", "strategy.inner=h2o", "strategy.inner_fields={recent_share: 0.3}")
    assert build_strategy(cfg.strategy)._scorer.recent_share == 0.3


def test_launcher_configs_compose(configs):
    cfg = configs("hydra/launcher=local", hydra=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = configs("hydra/launcher=slurm", hydra=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.gpus_per_node == 1


# ------------------------------------------------------------------------------------------ errors


def _error(*overrides, multirun=False) -> str:
    with pytest.raises(ConfigError) as err:
        check_command_line("eval", list(overrides), multirun=multirun)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "overrides, starts, contains",
    [
        (["strategy.budget=7"], "strategy.budget:", "(0, 1]"),
        (["strategy=look_m", "strategy.merge=sideways"], "strategy.merge:", "none, averaged, pivotal, weighted"),
        (["strategy=nope"], "strategy:", "snapkv"),
        (["model=nope"], "model:", "tiny_llava"),
        (["strategy=look_m", "strategy.nope=1"], "strategy.nope:", "budget, budget_tokens, compress, recent_share"),
        (["strategy=snapkv", "strategy.window_size=abc"], "strategy.window_size:", "Integer"),
        (["task.n_samples=0"], "task.n_samples:", ">= 1"),
        (["model=tiny_llava", "model.colour=red"], "model.colour:", "dtype, device, seed"),
        (["strategy=adakv", "strategy.inner=nope"], "strategy.inner:", "snapkv"),
        (["strategy=target"], "strategy._target_:", "needs a value"),
        (["strategy=target", "strategy._target_=no_such_module.Strategy"], "strategy._target_:", "cannot import"),
        (["batch_size=0"], "batch_size:", ">= 1"),
    ],
)
def test_bad_values_give_one_line_naming_the_key(overrides, starts, contains):
    message = _error(*overrides)
    assert message.startswith(starts) and contains in message, message


def test_every_sweep_point_is_checked_before_running():
    assert check_command_line("eval", ["strategy=h2o,snapkv", "strategy.budget=0.1,0.2"], multirun=True) == 4
    assert _error("strategy=h2o,snapkv", "strategy.window_size=8", multirun=True).startswith("strategy.window_size:")


def test_commands_and_target_shortcut():
    assert split_command(["strategy=h2o"])[0].config_name == "eval"
    assert split_command(["eval", "strategy=h2o"])[1] == ["strategy=h2o"]
    with pytest.raises(ValueError, match="unknown command 'bnech'; commands: eval"):
        split_command(["bnech"])
    argv, target = select_target_option(["strategy._target_=pkg.Cls", "strategy.budget=0.1"])
    assert argv[0] == "strategy=target" and target == "pkg.Cls"
    assert select_target_option(["strategy=h2o"]) == (["strategy=h2o"], None)


# ------------------------------------------------------------------------------------------ results


def _record(strategy, budget, score, num):
    return {
        "job": {"num": num},
        "config": {
            "strategy": {"name": strategy, "budget": budget},
            "model": {"name": "tiny_llama"},
            "task": {"name": "fidelity"},
        },
        "choices": {"model": "tiny_llama", "strategy": strategy},
        "overrides": [f"strategy={strategy}", f"strategy.budget={budget}"],
        "metrics": {
            "score": score,
            "full_score": 1.0,
            "kept_fraction": budget,
            "kv_bytes_before": 2**20,
            "kv_bytes_after": budget * 2**20,
            "prefill_seconds": 0.1,
            "decode_tokens_per_second": 50.0,
            "full_prefill_seconds": 0.08,
            "full_decode_tokens_per_second": 55.0,
            "n_samples": 2,
            "peak_memory_bytes": None,
        },
    }


def test_sweep_summary_files(tmp_path):
    from kvpress_mm.results import comparison_table, write_sweep_summary

    for i, (s, b, score) in enumerate([("h2o", 0.1, 0.5), ("h2o", 0.3, 0.8), ("snapkv", 0.1, 0.6)]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "result.json").write_text(json.dumps(_record(s, b, score, i)))
    written = write_sweep_summary(tmp_path)
    assert set(written) == {"csv", "markdown", "scores", "png"}
    assert (tmp_path / "results.csv").read_text().count("\n") == 4
    assert "| snapkv" in (tmp_path / "results.md").read_text()
    table = comparison_table(_record("h2o", 0.1, 0.5, 0))
    assert "| h2o " in table and "| full " in table and "55.000" in table  # the full row has its own speed


def test_summary_of_several_sweeps_pivots_by_task_and_names_variants(tmp_path):
    from kvpress_mm.results import strategy_label
    from kvpress_mm.summarize import main as summarize

    runs = [
        ("h2o", 0.1, 0.5, "fidelity", []),
        ("h2o", 0.5, 0.9, "fidelity", []),
        ("look_m", 0.1, 0.25, "text_needle", ["strategy.merge_scope=same_modality"]),
        ("look_m", 0.1, 0.75, "text_needle", []),
    ]
    for i, (s, b, score, task, extra) in enumerate(runs):
        record = _record(s, b, score, i)
        record["config"]["task"]["name"] = task
        record["overrides"] += extra
        folder = tmp_path / ("a" if i < 2 else "b") / str(i)
        folder.mkdir(parents=True)
        (folder / "result.json").write_text(json.dumps(record))
    assert strategy_label(record) == "look_m"
    record["overrides"].append("strategy.merge_scope=same_modality")
    assert strategy_label(record) == "look_m[merge_scope=same_modality]"
    assert summarize([str(tmp_path / "out"), str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    scores = (tmp_path / "out" / "scores.md").read_text()
    fidelity, needle = scores.split("**text_needle**")
    assert "**fidelity** on tiny_llama (2 samples); full cache: 1.00" in fidelity
    assert "| strategy | 0.1   | 0.5   |" in fidelity and "| h2o      | 0.500 | 0.900 |" in fidelity
    assert "| look_m                            | 0.750 |" in needle
    assert "| look_m[merge_scope=same_modality] | 0.250 |" in needle
    assert (tmp_path / "out" / "score_vs_budget.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        summarize([str(tmp_path / "out2"), str(tmp_path / "nothing")])
