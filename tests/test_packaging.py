"""The project as a library: an installed package carries the recipes of configs/."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastimagenet.config import CONFIGS_DIR, SOURCE_TREE, recipe_files
from fastimagenet.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def test_the_checkout_reads_its_own_configs_and_a_missing_directory_is_named(tmp_path):
    assert SOURCE_TREE == ROOT and CONFIGS_DIR == ROOT / "configs"
    with pytest.raises(UserError, match=f"no recipes: {tmp_path / 'gone'} does not exist"):
        recipe_files(tmp_path / "gone")
