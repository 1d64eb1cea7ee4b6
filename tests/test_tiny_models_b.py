"""The tiny builders' checks (tiny_model_checks.py) on the odd-indexed half of TINY_FAMILIES; the other half
runs in test_tiny_models_a.py (two files run in parallel). A new family lands in one of them by itself."""

from __future__ import annotations

import sys

from tiny_model_checks import *  # noqa: F403 (the checks, and pytest_generate_tests running them over FAMILIES)

from kvpress_mm.testing import TINY_FAMILIES

FAMILIES = list(TINY_FAMILIES[1::2])


def test_the_two_files_cover_every_family():
    """test_tiny_models_a.py and this file split the families between them (two files run in parallel); the
    checks read what differs between families from the TinyModel, so every family runs them all."""
    import test_tiny_models_a

    assert not set(test_tiny_models_a.FAMILIES) & set(FAMILIES)
    assert sorted(test_tiny_models_a.FAMILIES + FAMILIES) == sorted(TINY_FAMILIES)


def test_the_checks_name_no_family():
    """What differs between families comes from the TinyModel and its config, never from a family's name."""
    from pathlib import Path

    import test_tiny_models_a
    import tiny_model_checks

    for module in (tiny_model_checks, test_tiny_models_a, sys.modules[__name__]):
        source = Path(module.__file__).read_text()
        named = [f for f in TINY_FAMILIES if f'"{f}"' in source or f"'{f}'" in source]
        assert not named, f"{module.__name__} names {named}"
