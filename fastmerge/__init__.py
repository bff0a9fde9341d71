"""fastmerge: fast, mergekit-compatible merging of LLM checkpoints (and, later, evolving merges).

Public API:
    merge(recipe, out, options=None, progress=None) -> MergeResult
    Merger(recipe, device="cpu") -> in-memory merger: .merge(candidate) writes into .module
    Genome(weights, densities) -> per-model or per-layer-group parameters of a candidate
    load_recipe(path_or_yaml_or_dict) -> Recipe
    MergeOptions, MergeResult, FastmergeError
    evolve(config, resume=False, materialize=False, out=None, progress=None) -> EvolveResult (CMA-ES merge search)
    EvolveConfig.from_yaml(path) -> the validated evolve config
"""

import gc as _gc

# torch's import allocates millions of long-lived objects, and the cyclic collector walks all of
# them several times while it runs (~0.1 s of a command's ~1.4 s start-up on the 2-core machine);
# nothing collectable is made here, so collection is paused for these imports and then restored
_collecting = _gc.isenabled()
_gc.disable()
try:
    from .engine import MergeOptions, MergeResult, Progress, merge
    from .errors import FastmergeError
    from .evolve import EvolveConfig, EvolveResult, evolve
    from .merger import Genome, Merger
    from .recipe import Recipe, load_recipe
finally:
    if _collecting:
        _gc.enable()

__all__ = ["merge", "load_recipe", "MergeOptions", "MergeResult", "Progress", "Recipe", "FastmergeError", "Merger",
           "Genome", "evolve", "EvolveConfig", "EvolveResult"]
__version__ = "0.1.0"
