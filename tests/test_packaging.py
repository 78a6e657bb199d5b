"""The project as a library: an installed package carries the recipes of configs/, and the backend extras install
what the loader registry asks for."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import loaders
from fastimagenet.config import CONFIGS_DIR, SOURCE_TREE, recipe_files
from fastimagenet.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_the_checkout_reads_its_own_configs_and_a_missing_directory_is_named(tmp_path):
    assert SOURCE_TREE == ROOT and CONFIGS_DIR == ROOT / "configs"
    with pytest.raises(UserError, match=f"no recipes: {tmp_path / 'gone'} does not exist"):
        recipe_files(tmp_path / "gone")


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def test_backend_extras_install_what_the_registry_asks_for():
    """`pip install 'fastimagenet[dali]'` installs the packages the registry names when the dali backend is missing
    them, and so for every extra; the hints of the other backends name only base dependencies."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {name: {_requirement_name(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    base = {_requirement_name(r) for r in project["dependencies"]}
    assert set(extras) <= set(loaders.NAMES)
    for name, (_, _, hint) in loaders._BACKENDS.items():
        named = {_requirement_name(word) for word in hint.split("pip install", 1)[1].split()}
        assert named == extras[name] if name in extras else named <= base, (name, hint)
