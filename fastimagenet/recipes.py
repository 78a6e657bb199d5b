"""`fastimagenet recipes`: the recipes in configs/ (config.CONFIGS_DIR, package data once installed), each with its
one-line purpose and, where a public result exists for a matching setup, that published figure — someone else's
measurement, labelled as such, never ours."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import yaml

from fastimagenet.common.errors import UserError
from fastimagenet.config import CONFIGS_DIR, recipe_files

REFERENCE_LABEL = "published reference (not our result)"


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str  # the recipe's `description:` key
    reference: str  # its `reference:` key: a published figure and where it comes from; "" when none matches


def read_recipe(path: Path) -> Recipe:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not str(data.get("description", "")).strip():
        raise UserError(f"{path}: a recipe needs a one-line 'description:' (shown by `fastimagenet recipes`)")
    return Recipe(path.stem, " ".join(str(data["description"]).split()), " ".join(str(data.get("reference", "")).split()))


def list_recipes(configs_dir: Path = CONFIGS_DIR) -> list[Recipe]:
    return [read_recipe(path) for path in recipe_files(configs_dir)]


def text_listing(recipes: list[Recipe], width: int = 110) -> str:
    """Name, then the purpose and any published reference wrapped under it."""
    lines = []
    for recipe in recipes:
        lines.append(recipe.name)
        lines += textwrap.wrap(recipe.description, width, initial_indent="    ", subsequent_indent="    ")
        if recipe.reference:
            lines += textwrap.wrap(f"{REFERENCE_LABEL}: {recipe.reference}", width, initial_indent="    ",
                                   subsequent_indent="      ")
    return "\n".join(lines)


def markdown_table(recipes: list[Recipe]) -> str:
    """The README's recipe table (a test keeps the README in step with configs/)."""
    rows = [f"| recipe | purpose | {REFERENCE_LABEL} |", "|---|---|---|"]
    rows += [f"| `{r.name}` | {r.description} | {r.reference or '—'} |" for r in recipes]
    return "\n".join(rows)
