"""The merge-method registry: what each method is, declared once, in one small file per method.

Why a registry: a method used to live in four places (the recipe schema, the plan's if/elif, the
evolve search space's string tuples, the engine's routing). Now each file in this package declares
one ``MergeMethod`` (its parameters as mergekit declares them, its input contract, whether it is
one of the fused task-arithmetic family and with which options, or a torch function of the
tensors) and everything else is derived from ``METHODS``: the recipe's parameter validation, the
plan (which route each tensor takes), the PS search space (``evolve_config.PS_METHODS`` /
``SPARSIFYING``) and the CLI's list of methods.

A new method is one new file with ``METHOD = MergeMethod(...)`` and a name in ``_MODULES`` (or,
from outside, ``register(method)``). A method on the torch route gives ``merge(tensors, base,
params, ctx) -> Tensor``; the engine and ``Merger`` run it per tensor on CPU tensors and cast the
result once to the output dtype.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import TypeAdapter, ValidationError

from ..errors import FastmergeError
from ..spec import Consensus, Sparsify

if TYPE_CHECKING:
    import torch

#: a parameter with no default: a recipe must give it (mergekit's ``required``)
REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()

#: the routes a planned tensor can take (``TensorPlan.route``): a plain copy of one input (cast to
#: the output dtype), the fused task-arithmetic op (C loop, numpy twin or Triton), a torch function
ROUTES = ("copy", "fused", "torch")

_FLOAT = TypeAdapter(float).validate_python
_BOOL = TypeAdapter(bool).validate_python
_INT = TypeAdapter(int).validate_python


def read_rescale(value: Any) -> Any:
    """``rescale``: mergekit's bool, or fastmerge's spellings ``l1`` / ``inverse`` / ``none``."""
    if isinstance(value, str) and value in ("l1", "inverse", "none"):
        return value
    try:
        return _BOOL(value)
    except ValidationError:
        raise FastmergeError(f"rescale: expected true, false or 'inverse', got {value!r}") from None


_READERS: dict[str, Callable[[Any], Any]] = {"float": _FLOAT, "bool": _BOOL, "int": _INT, "rescale": read_rescale}


@dataclass(frozen=True)
class Param:
    """One parameter, as mergekit's ``ConfigParameterDef``: its name, how a scalar is read
    (``float``, ``bool``, ``int`` or ``rescale``: YAML leaves ``1e-3`` a string, mergekit reads it
    as a number; an ``int`` refuses 2.5, as mergekit's does), its default (``REQUIRED``: none), and whether it is per model or shared by all.
    ``low``/``high`` bound a number (the evolve search and the plan check them); ``clip_high``
    says a larger value is clipped (density above 1 keeps everything), not refused."""

    name: str
    kind: Literal["float", "bool", "int", "rescale"] = "float"
    default: Any = REQUIRED
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    clip_high: bool = False
    optional: bool = False  # None is a value (passthrough's scale: no scaling)

    @property
    def read(self) -> Callable[[Any], Any]:
        return _READERS[self.kind]


@dataclass(frozen=True)
class Fused:
    """Membership of the fused task-arithmetic family (DESIGN.md section 3) and its options."""

    sparsify: Sparsify = "none"
    consensus: Consensus = "none"


@dataclass
class MergeContext:
    """What a torch-route function may need besides the tensors and parameters."""

    name: str  # the output tensor's name (e.g. to derive per-tensor random numbers)
    position: float  # t of the tensor's layer in its slice (0 outside the layers)
    seed: int
    out_dtype: torch.dtype
    threads: int | None = None


TorchMerge = Callable[["list[torch.Tensor]", "torch.Tensor | None", dict, MergeContext], "torch.Tensor"]


@dataclass(frozen=True)
class MergeMethod:
    """One merge method.

    ``base`` (mergekit's ``BasePolicy``): "required" (a base model, kept apart from the inputs:
    task vectors against it), "optional" (kept apart when the recipe or slice names one; without
    one every source is an input) or "ignored" (a named base is just one more input, as in
    mergekit). ``inputs``: how many inputs the method takes, counting a required base (None: any);
    ``non_base``: (min, max) of the inputs other than the base (max None: no limit), as mergekit's
    ``InputContract.min_non_base``/``max_non_base``. Exactly one of ``fused`` (the task-
    arithmetic family) and ``merge`` (the torch route); ``copy_if`` says when a tensor is a plain
    copy of its one input under its parameters (passthrough without a scale).
    """

    name: str
    params: tuple[Param, ...]
    base: Literal["required", "optional", "ignored"] = "ignored"
    inputs: int | None = None
    non_base: tuple[int, int | None] = (0, None)
    fused: Fused | None = None
    merge: TorchMerge | None = None
    copy_if: Callable[[dict], bool] | None = None
    pretty_name: str = ""
    reference_url: str | None = None
    #: the executors that can run it: "c" (the fused C loop, or its numpy twin) and "triton" (the
    #: fused kernel) for the family, "torch" (its function, on CPU tensors) otherwise. A family
    #: member without "triton" runs on the C loop even when a merge runs on a GPU.
    executors: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if (self.fused is None) == (self.merge is None):
            raise ValueError(f"method {self.name}: give exactly one of fused (the family) or merge (a torch function)")
        if not self.executors:
            object.__setattr__(self, "executors", ("c", "triton") if self.fused else ("torch",))

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    def base_of(self, base: str | None) -> str | None:
        """The model that stands apart as the base in a group whose recipe/slice names ``base``
        (None: every source is an input)."""
        return None if self.base == "ignored" else base

    @property
    def param(self) -> dict[str, Param]:
        return {p.name: p for p in self.params}

    @property
    def shared(self) -> dict[str, Any]:
        """Shared parameter name -> default (``REQUIRED``: none)."""
        return {p.name: p.default for p in self.params if not p.per_model}

    @property
    def per_model(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params if p.per_model}

    @property
    def searchable(self) -> bool:
        """A PS search drives it: per-model weights (and densities) of one fused op."""
        return self.fused is not None and "weight" in self.per_model

    @property
    def sparsifies(self) -> bool:
        """Per-model density is meaningful (and a searched gene)."""
        return self.fused is not None and self.fused.sparsify != "none"


#: the modules of this package that declare a method, in the order the CLI lists them
_MODULES = (
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "passthrough",
    # the torch route (fastmerge.methods_math), per tensor on CPU
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock", "nuslerp", "multislerp",
    "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
)
METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method (a plugin, a test) to the registry; an existing name is an error."""
    if method.name in METHODS:
        raise FastmergeError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    METHODS.pop(name, None)


def get(name: str) -> MergeMethod:
    """The method of that name; an unknown name is a one-line error listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise FastmergeError(f"unknown merge_method {name!r} (known: {', '.join(sorted(METHODS))})") from None


def known_params() -> dict[str, Param]:
    """Every parameter name some method declares (the first declaration of each name)."""
    out: dict[str, Param] = {}
    for m in METHODS.values():
        for p in m.params:
            out.setdefault(p.name, p)
    return out


class Names(Sequence[str]):
    """The registered methods' names that satisfy ``keep``, read live from the registry (so a
    method registered later is included): derived lists such as ``evolve_config.PS_METHODS``."""

    def __init__(self, keep: Callable[[MergeMethod], bool]):
        self._keep = keep

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, m in METHODS.items() if self._keep(m))

    def __getitem__(self, i):  # type: ignore[override]
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, Names)) else other)

    def __repr__(self) -> str:
        return repr(self._names())


def ta_params(normalize: bool, rescale: bool, *extra: Param, rescale_kind: Literal["rescale", "bool"] = "rescale"
              ) -> tuple[Param, ...]:
    """The task-arithmetic family's parameters (mergekit's GeneralizedTaskArithmeticMerge), plus
    ``extra`` ones (breadcrumbs' ``gamma``, DELLA's ``epsilon``). ``rescale_kind="bool"``: only
    mergekit's true/false (l1 or none), for the torch-route members, which have no ``inverse``."""
    return (
        Param("int8_mask", "bool", False),
        Param("normalize", "bool", normalize),
        Param("rescale", rescale_kind, rescale),
        Param("lambda", "float", 1.0),
        Param("weight", "float", REQUIRED, per_model=True),
        Param("density", "float", 1.0, per_model=True, low=0.0, high=1.0, clip_high=True),
        *extra,
    )


def math_merge(method: str) -> TorchMerge:
    """The torch-route ``merge`` of a method whose math is ``fastmerge.methods_math.METHODS[method]``:
    parameters under their Python names (``lambda`` -> ``lambda_``), the tensor's name and the
    recipe's seed (DELLA's Philox draws, DESIGN.md s.3), fp32 out. Its checks (e.g. DELLA's
    density +/- epsilon in (0, 1)) are one-line errors naming the tensor. torch (and
    ``methods_math``) is imported when a tensor is merged, not when the registry is."""

    def merge(tensors, base, params, ctx):
        from .. import methods_math, sparsify_cpu

        kwargs = {methods_math.PYARG.get(k, k): v for k, v in params.items()}
        try:
            with sparsify_cpu.thread_limit(ctx.threads):  # the C pre-passes of della, breadcrumbs, sce
                return methods_math.METHODS[method](base, tensors, **kwargs, name=ctx.name, seed=ctx.seed)
        except ValueError as e:
            raise FastmergeError(f"{method}: tensor {ctx.name}: {e}") from None

    merge.__qualname__ = merge.__name__ = f"{method}_merge"
    return merge


for _name in _MODULES:
    register(importlib.import_module(f".{_name}", __name__).METHOD)
