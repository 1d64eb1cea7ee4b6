"""The tiny builders' checks (tiny_model_checks.py) on the even-indexed half of TINY_FAMILIES; the other half
runs in test_tiny_models_b.py (two files run in parallel). A new family lands in one of them by itself."""

from __future__ import annotations

from tiny_model_checks import *  # noqa: F403 (the checks, and pytest_generate_tests running them over FAMILIES)

from kvpress_mm.testing import TINY_FAMILIES

FAMILIES = list(TINY_FAMILIES[0::2])
