"""fastmerge: fast, mergekit-compatible merging of LLM checkpoints (and, later, evolving merges).

Public API:
    merge(recipe, out, options=None, progress=None) -> MergeResult
    Merger(recipe, device="cpu") -> in-memory merger: .merge(candidate) writes into .module
    Genome(weights, densities) -> per-model or per-layer-group parameters of a candidate
    load_recipe(path_or_yaml_or_dict) -> Recipe
    MergeOptions, MergeResult, FastmergeError
    evolve(config, resume=False, materialize=False, out=None, progress=None) -> EvolveResult (CMA-ES merge search)
    EvolveConfig.from_yaml(path) -> the validated evolve config

The names are imported on first use: ``fastmerge merge`` on the CPU never imports torch (about
1.5 s of start-up on a 2-core machine), and ``import fastmerge`` alone imports nothing heavy.
"""

from __future__ import annotations

import gc as _gc
import importlib as _importlib
import sys as _sys
import types as _types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import MergeOptions, MergeResult, Progress, merge
    from .errors import FastmergeError
    from .evolve import EvolveConfig, EvolveResult, evolve
    from .merger import Genome, Merger
    from .recipe import Recipe, load_recipe

_EXPORTS = {
    "merge": ".engine", "MergeOptions": ".engine", "MergeResult": ".engine", "Progress": ".engine",
    "FastmergeError": ".errors", "evolve": ".evolve", "EvolveConfig": ".evolve", "EvolveResult": ".evolve",
    "Merger": ".merger", "Genome": ".merger", "Recipe": ".recipe", "load_recipe": ".recipe",
}
__all__ = ["merge", "load_recipe", "MergeOptions", "MergeResult", "Progress", "Recipe", "FastmergeError", "Merger",
           "Genome", "evolve", "EvolveConfig", "EvolveResult"]
__version__ = "0.1.0"  # the distribution's version too (pyproject.toml reads it from here)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastmerge' has no attribute {name!r}")
    # torch's import allocates millions of long-lived objects, and the cyclic collector walks all of
    # them several times while it runs (~0.1 s of start-up on the 2-core machine); nothing
    # collectable is made here, so collection is paused for the import and then restored
    collecting = _gc.isenabled()
    _gc.disable()
    try:
        value = getattr(_importlib.import_module(module, __name__), name)
    finally:
        if collecting:
            _gc.enable()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(_types.ModuleType):
    """Keeps ``fastmerge.evolve`` the function: importing the submodule of the same name binds the
    module on its package, which the eager ``from .evolve import evolve`` used to overwrite."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, _types.ModuleType) and _EXPORTS.get(name) == f".{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
