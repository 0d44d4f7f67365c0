"""Training recipes: Python functions returning a TrainConfig. `kiln train --recipe NAME` runs one."""

from __future__ import annotations

from collections.abc import Callable

from kiln.errors import KilnError
from kiln.recipes.demo import demo, tiny
from kiln.train.config import TrainConfig

RECIPES: dict[str, Callable[..., TrainConfig]] = {"demo": demo, "tiny": tiny}


def get_recipe(name: str) -> Callable[..., TrainConfig]:
    if name not in RECIPES:
        raise KilnError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]
