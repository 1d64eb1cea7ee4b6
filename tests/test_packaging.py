"""The wheel holds every subpackage: setuptools' explicit package list must name each one."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_packaged():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        "kvpress_mm." + ".".join(init.parent.relative_to(ROOT / "kvpress_mm").parts)
        for init in (ROOT / "kvpress_mm").rglob("__init__.py")
        if init.parent != ROOT / "kvpress_mm"
    }
    assert found - listed == set(), f"subpackages missing from pyproject.toml's packages: {sorted(found - listed)}"
    for package, folder in config["package-dir"].items():
        assert (ROOT / folder / "__init__.py").exists(), (package, folder)
