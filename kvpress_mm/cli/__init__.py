"""`kvpress-mm`: the command line, a Hydra app.

    kvpress-mm                                        # default: text_prior_pivot_merge @ 0.2 on mini_llava
    kvpress-mm strategy=snapkv strategy.budget=0.1 model=tiny_llava task=fidelity
    kvpress-mm -m strategy=h2o,snapkv,look_m strategy.budget=0.05,0.1,0.2
    kvpress-mm eval ...                               # the same: `eval` is the default command
    kvpress-mm bench models=[tiny] lengths=[1024,4096]  # the performance benchmark

The first word may name a command (a config under conf/ with its own job function): `eval`
and `bench` (the performance benchmark) exist; a new command is one more entry in COMMANDS. Everything after it is
Hydra's usual command line (overrides, -m, --cfg job, --help, ...). See docs/configuration.md.

Modules: `run` / `bench` (the commands' jobs), `preflight` (the checks before anything runs), `build`
(config nodes -> strategy, task, load_model call), `config` / `schema` (ConfigStore schemas), `generate`
(the yaml files under conf/ that mirror the code), `callbacks` (sweep summary and progress), `errors`
(the one-line error, exit 2, and the interrupt, exit 130).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from . import errors
from .errors import PROG


@dataclass(frozen=True)
class Command:
    config_name: str  # conf/<config_name>.yaml
    job: str  # "module:function", the Hydra task function (imported only when the command runs)
    help: str
    preflight: bool = True  # compose and build every sweep point before running (strategy/model/task)


COMMANDS = {
    "eval": Command("eval", "kvpress_mm.cli.run:run_eval", "evaluate a strategy against the full cache (default)"),
    "bench": Command(
        "bench",
        "kvpress_mm.cli.bench:run_bench",
        "prefill / decode / memory of every strategy vs plain sdpa",
        preflight=False,
    ),
    "profile-heads": Command(
        "profile_heads",
        "kvpress_mm.cli.profile_heads:run_profile_heads",
        "find a model's visual heads (SparseMM) and write its head profile",
        preflight=False,
    ),
}
DEFAULT_COMMAND = "eval"
TARGET_KEY = "strategy._target_"

# Hydra flags after which nothing runs (help, printing the config, shell completion)
_NO_RUN_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion", "resolve", "experimental_rerun")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: pick the command, check the command line, hand it to Hydra."""
    argv = list(sys.argv[1:] if argv is None else argv)
    errors.reset()
    try:
        command, argv = split_command(argv)
        argv, target = select_target_option(argv)
        _prepare(command, argv, target)
    except ValueError as err:  # ConfigError and the registries' ValueErrors: one line, no traceback
        errors.fail(err)
    except KeyboardInterrupt:
        errors.interrupted()
    try:
        _run_hydra(command, argv)
    except KeyboardInterrupt:  # what was done is saved (cli.run, cli.callbacks); one line, exit 130
        errors.interrupted()


def split_command(argv: list[str]) -> tuple[Command, list[str]]:
    """(command, the rest): a first word that is neither an override nor a flag names the command."""
    if argv and _is_word(argv[0]):
        name = argv[0]
        if name not in COMMANDS:
            known = "; ".join(f"{n}: {c.help}" for n, c in COMMANDS.items())
            raise ValueError(f"unknown command {name!r}; commands: {known}")
        return COMMANDS[name], argv[1:]
    return COMMANDS[DEFAULT_COMMAND], argv


def select_target_option(argv: list[str]) -> tuple[list[str], str | None]:
    """`strategy._target_=pkg.Class` alone selects the `strategy=target` option (a class by import path).

    Returns the command line to give Hydra and the class path when there is exactly one.
    """
    at = [i for i, a in enumerate(argv) if "=" in a and a.split("=", 1)[0].lstrip("+") == TARGET_KEY]
    if not at:
        return argv, None
    values = [argv[i].split("=", 1)[1] for i in at]
    chooses_strategy = any("=" in a and a.split("=", 1)[0].lstrip("+~") == "strategy" for a in argv)
    if not chooses_strategy:
        # next to the _target_ override: after any flags (-m, --config-dir d), which Hydra wants first
        argv = [*argv[: at[0]], "strategy=target", *argv[at[0] :]]
    single = values[-1] if len(values) == 1 and not any(c in values[-1] for c in ",()[]") else None
    return argv, single


def _prepare(command: Command, argv: list[str], target: str | None) -> None:
    from hydra._internal.utils import get_args_parser

    from .config import register_configs
    from .preflight import check_command_line, check_output_dirs

    register_configs(target=target)
    args, _ = get_args_parser().parse_known_args(argv)
    if any(getattr(args, flag, None) for flag in _NO_RUN_FLAGS):
        return
    config_name = args.config_name or command.config_name
    if command.preflight:
        check_command_line(config_name, args.overrides, args.multirun, args.config_dir)
    else:
        check_output_dirs(config_name, args.overrides, args.multirun, args.config_dir)


def _run_hydra(command: Command, argv: list[str]) -> None:
    import hydra

    job = _import(command.job)
    # Hydra reads its command line from sys.argv; this process's entry point hands it the remainder
    sys.argv = [PROG, *argv]
    app = hydra.main(version_base="1.3", config_path="pkg://kvpress_mm.conf", config_name=command.config_name)(job)
    app()


def _import(path: str) -> Callable:
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _is_word(arg: str) -> bool:
    return not arg.startswith("-") and "=" not in arg and not arg.startswith("~")
