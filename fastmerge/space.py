"""Search spaces of the evolutionary merge: genes in [0, 1]^n -> a candidate and back to a recipe.

PS (parameter space): per non-base model a weight (and, for sparsifying methods, a density) gene,
repeated per layer group (``group_size`` consecutive layers) and per filter (tensor-name
substrings such as ``self_attn``/``mlp``, plus one set for tensors no filter matches). A decoded
genome is both a candidate for the in-memory ``Merger`` (a function of each planned tensor) and a
mergekit recipe; both assign parameters with the same rule, so ``fastmerge merge best.yml``
rebuilds exactly the model the search scored:

- layer ``i`` is in group ``i // group_size``; the embeddings (before the layers) take group 0 and
  the final norm / lm_head (after them) the last group, as mergekit ``slices`` assign them;
- a tensor's filter is the first filter that is a substring of its name, else the rest.

DFS (data-flow space) is fastmerge.dfs.DFSGenome, wrapped thinly so both spaces look alike here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .evolve_config import SPARSIFYING
from .methods import METHODS
from .plan import TensorPlan, layer_group
from .spec import FusedOptions

if TYPE_CHECKING:  # fastmerge.dfs imports transformers: only when a DFS space is built
    from .dfs import DFSGenome


@dataclass
class PSDecoded:
    """One PS candidate: ``weights``/``densities`` shaped (groups, filters, models)."""

    weights: np.ndarray
    densities: np.ndarray | None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"weights": self.weights.tolist()}
        if self.densities is not None:
            out["densities"] = self.densities.tolist()
        return out


@dataclass
class PSSpace:
    """Genes of a parameter-space search over ``models`` (the non-base models, recipe order)."""

    method: str
    models: list[str]
    base_model: str | None
    num_layers: int
    group_size: int | None = None
    filters: list[str] = field(default_factory=list)
    weight_range: tuple[float, float] = (0.0, 1.0)
    density_range: tuple[float, float] = (0.0, 1.0)
    parameters: dict[str, Any] = field(default_factory=dict)
    random_seed: int = 0

    @property
    def groups(self) -> int:
        return 1 if not self.group_size else math.ceil(self.num_layers / self.group_size)

    @property
    def num_filters(self) -> int:
        return len(self.filters) + 1 if self.filters else 1

    @property
    def searches_density(self) -> bool:
        return self.method in SPARSIFYING

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.groups, self.num_filters, len(self.models))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) * (2 if self.searches_density else 1)

    def x0(self, value: float = 0.5) -> np.ndarray:
        return np.full(self.size, float(value))

    def decode(self, x: Sequence[float] | np.ndarray) -> PSDecoded:
        """Genes (weights first, then densities, each C-ordered (group, filter, model)) -> values."""
        x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
        n = int(np.prod(self.shape))
        if x.shape != (self.size,):
            raise ValueError(f"PS genome: expected {self.size} genes, got {x.shape}")
        lo, hi = self.weight_range
        weights = (lo + x[:n] * (hi - lo)).reshape(self.shape)
        densities = None
        if self.searches_density:
            dlo, dhi = self.density_range
            densities = (dlo + x[n:] * (dhi - dlo)).reshape(self.shape)
        return PSDecoded(weights, densities)

    # -- where a tensor falls

    def group_of(self, name: str) -> int:
        return layer_group(name, self.num_layers, self.group_size or self.num_layers)

    def filter_of(self, name: str) -> int:
        return next((i for i, f in enumerate(self.filters) if f in name), self.num_filters - 1)

    # -- a decoded genome as a Merger candidate and as a recipe

    def candidate(self, d: PSDecoded) -> Callable[[TensorPlan], FusedOptions]:
        """``TensorPlan -> FusedOptions`` for ``Merger.merge``: the recipe's options with this
        tensor's weights (and densities) swapped in."""

        def options(task: TensorPlan) -> FusedOptions:
            g = self.group_of(task.key)
            f = self.filter_of(task.inputs[0].name)  # the recipe filters on the source's name
            weights = tuple(float(w) for w in d.weights[g, f])
            if d.densities is None:
                return replace(task.fused, weights=weights)
            return replace(task.fused, weights=weights, densities=tuple(float(v) for v in d.densities[g, f]))

        return options

    def base_recipe(self) -> dict:
        """The recipe the Merger is built from (every candidate then overrides weights/densities)."""
        params = {"weight": 1.0, **({"density": 1.0} if self.searches_density else {})}
        return self._recipe_dict([{"model": m, "parameters": dict(params)} for m in self.models])

    def recipe(self, d: PSDecoded) -> dict:
        """The mergekit-compatible recipe of a decoded genome: ``models`` with (filtered) values
        when there is one layer group, else one ``slice`` per group."""
        if self.groups == 1:
            return self._recipe_dict([{"model": m, "parameters": self._params(d, 0, k)} for k, m in enumerate(self.models)])
        slices = []
        for g in range(self.groups):
            lr = [g * self.group_size, min((g + 1) * self.group_size, self.num_layers)]
            sources = [{"model": self.base_model, "layer_range": lr}] if self.base_model else []
            sources += [{"model": m, "layer_range": list(lr), "parameters": self._params(d, g, k)}
                        for k, m in enumerate(self.models)]
            slices.append({"sources": sources})
        return self._recipe_dict(None, slices)

    def _params(self, d: PSDecoded, g: int, k: int) -> dict:
        out = {"weight": self._value(d.weights[g, :, k])}
        if d.densities is not None:
            out["density"] = self._value(d.densities[g, :, k])
        return out

    def _value(self, per_filter: np.ndarray) -> float | list[dict]:
        values = [float(v) for v in per_filter]
        if not self.filters:
            return values[0]
        return [{"filter": f, "value": v} for f, v in zip(self.filters, values)] + [{"value": values[-1]}]

    def _recipe_dict(self, models: list[dict] | None, slices: list[dict] | None = None) -> dict:
        r: dict[str, Any] = {"merge_method": self.method}
        if self.base_model and METHODS[self.method].needs_base:
            r["base_model"] = self.base_model
        if models is not None:
            r["models"] = models
        if slices is not None:
            r["slices"] = slices
        if self.parameters:
            r["parameters"] = dict(self.parameters)
        r["random_seed"] = self.random_seed
        return r


@dataclass
class DFSSpace:
    """The DFS genome (fastmerge.dfs.DFSGenome) over ``models`` (paths; the genome's ``head`` is
    model A). The genome holds the options; this only adds where the models are."""

    models: list[str]
    genome: DFSGenome

    @property
    def head(self) -> int:
        return self.genome.head

    @property
    def size(self) -> int:
        return self.genome.size

    def x0(self, value: float | None = None) -> np.ndarray:
        """The paper's initialisation (favouring model A's layers in the first repetition)."""
        return self.genome.x0()

    def decode(self, x: Sequence[float] | np.ndarray):
        return self.genome.decode(np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0))
