"""mergekit-compatible merge recipes: parsing, validation and parameter resolution.

The schema is mergekit's (``merge_method``, ``base_model``, ``models``, ``slices``, ``parameters``,
``dtype``, ``out_dtype``, ``tokenizer_source``) plus fastmerge's ``random_seed``, so an existing
mergekit config runs unchanged. Unknown keys, methods and parameters are errors, never ignored.
Parameter values resolve as mergekit resolves them: scalar, gradient list (piecewise linear in
t), or ``{filter, value}`` list (substring match on the tensor name, first match wins).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from .errors import FastmergeError
from .rng import SEED_MAX

Scalar = Union[bool, int, float, str]  # noqa: UP007 - a runtime alias pydantic reads


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar | list[Scalar] | list[Conditional]


Setting = Union[Scalar, list[Scalar], list[Conditional], Conditional]  # noqa: UP007
Parameters = dict[str, Setting]


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Parameters | None = None


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v


class Slice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    base_model: str | None = None
    parameters: Parameters | None = None
    residual_weight: float | None = None


class TokenizerSettings(BaseModel):
    """mergekit's ``tokenizer:`` block; only ``source`` is supported (vocabulary surgery is not)."""

    model_config = ConfigDict(extra="forbid")
    source: str | None = None
    tokens: dict | None = None
    pad_to_multiple_of: int | None = None


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: Parameters | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    chat_template: str | None = None
    modules: dict | None = None
    random_seed: int = Field(0, ge=0, le=SEED_MAX)
    name: str | None = None


@dataclass(frozen=True)
class MethodSpec:
    """What a method needs: its parameters (shared and per model) and defaults, as mergekit's."""

    name: str
    shared: dict[str, Any]  # name -> default (None: required)
    per_model: dict[str, Any]
    needs_base: bool = False
    sparsify: str = "none"
    consensus: str = "none"
    fused: bool = False
    per_model_includes_base: bool = False


REQUIRED = object()


def _ta(name: str, sparsify: str, consensus: str, normalize: bool, rescale: bool) -> MethodSpec:
    return MethodSpec(
        name,
        shared={"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0},
        per_model={"weight": REQUIRED, "density": 1.0},
        needs_base=True,
        sparsify=sparsify,
        consensus=consensus,
        fused=True,
    )


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec("linear", {"normalize": True}, {"weight": REQUIRED}, fused=True, per_model_includes_base=True),
    "task_arithmetic": _ta("task_arithmetic", "none", "none", False, False),
    "ties": _ta("ties", "magnitude", "sum", True, False),
    "dare_ties": _ta("dare_ties", "random", "sum", False, True),
    "dare_linear": _ta("dare_linear", "random", "none", False, True),
    "slerp": MethodSpec("slerp", {"t": REQUIRED}, {}, needs_base=True),
    "passthrough": MethodSpec("passthrough", {}, {"scale": None}, per_model_includes_base=True),
}
#: mergekit methods fastmerge knows about but does not implement yet: a clear error, not a surprise.
NOT_YET = {
    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "nuslerp", "sce",
    "multislerp", "karcher", "nearswap", "arcee_fusion", "ram", "ramplus_tl",
}
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


_FLOAT = TypeAdapter(float).validate_python
_BOOL = TypeAdapter(bool).validate_python


def _rescale(value: Any) -> Any:
    if isinstance(value, str) and value in ("l1", "inverse", "none"):
        return value
    try:
        return _BOOL(value)
    except ValidationError:
        raise FastmergeError(f"rescale: expected true, false or 'inverse', got {value!r}") from None


#: how each parameter's scalars are read: mergekit's ParameterSpec types (so "1e-3", which YAML
#: leaves a string, is a number, and "false" is False), plus fastmerge's rescale spellings
VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "weight": _FLOAT, "density": _FLOAT, "lambda": _FLOAT, "t": _FLOAT, "scale": _FLOAT,
    "normalize": _BOOL, "int8_mask": _BOOL, "rescale": _rescale,
}


def evaluate_setting(tensor_name: str, setting: Any, t: float = 0.0, *,
                     validate: Callable[[Any], Any] | None = None) -> Any:
    """A parameter's value for one tensor at position t, exactly as mergekit resolves it.

    ``validate`` reads each scalar as the parameter's type (as mergekit's keyword of that name):
    gradient endpoints that validate to numbers interpolate, others (bools, strings) are picked.
    """
    check = validate or (lambda v: v)
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return check(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [check(e) for e in setting]
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return check((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate_setting(tensor_name, cond.value, t, validate=validate)
        return None
    raise FastmergeError(f"unexpected parameter value {setting!r}")


def resolve(name: str, scopes: list[Parameters | None], tensor_name: str, t: float, default: Any) -> Any:
    """First scope (highest precedence first) whose setting yields a value, else the default."""
    for scope in scopes:
        if scope and name in scope:
            try:
                value = evaluate_setting(tensor_name, scope[name], t, validate=VALIDATORS.get(name))
            except ValidationError as e:
                err = e.errors()[0]
                raise FastmergeError(f"parameter {name} for {tensor_name}: {err['msg'].lower()}, "
                                     f"got {err['input']!r}") from None
            if value is not None:
                return value
    return default


def load_recipe(source: str | Path | dict) -> Recipe:
    """Parse and validate a recipe from a YAML path, YAML text or dict."""
    where = "recipe"
    if isinstance(source, dict):
        data = source
    else:
        text = str(source)
        path = Path(text)
        if "\n" not in text and path.suffix in (".yml", ".yaml", ".json"):
            if not path.exists():
                raise FastmergeError(f"{path}: recipe file not found")
            where = str(path)
            text = path.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise FastmergeError(f"{where}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise FastmergeError(f"{where}: a recipe is a mapping with at least merge_method")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise FastmergeError(f"{where}: {loc}: {msg}") from None
    validate(recipe, where)
    return recipe


def validate(recipe: Recipe, where: str = "recipe") -> None:
    method = recipe.merge_method
    if method in NOT_YET:
        raise FastmergeError(f"{where}: merge_method {method!r} is a mergekit method fastmerge does not implement yet")
    if method not in METHODS:
        raise FastmergeError(f"{where}: unknown merge_method {method!r} (known: {', '.join(sorted(METHODS))})")
    spec = METHODS[method]
    if recipe.modules is not None:
        raise FastmergeError(f"{where}: modules (multi-module architectures) are not supported; use models or slices")
    if recipe.tokenizer is not None:
        if recipe.tokenizer.tokens or recipe.tokenizer.pad_to_multiple_of:
            raise FastmergeError(f"{where}: tokenizer: only 'source' is supported (no token surgery or padding)")
        if recipe.tokenizer_source and recipe.tokenizer.source and recipe.tokenizer_source != recipe.tokenizer.source:
            raise FastmergeError(f"{where}: tokenizer.source and tokenizer_source disagree")
        recipe.tokenizer_source = recipe.tokenizer_source or recipe.tokenizer.source
    if recipe.chat_template is not None and "{" not in recipe.chat_template:
        raise FastmergeError(f"{where}: chat_template: named templates ({recipe.chat_template!r}) are not supported; "
                             "give the Jinja template text")
    if bool(recipe.models) == bool(recipe.slices):
        raise FastmergeError(f"{where}: give exactly one of models or slices")
    for key in ("dtype", "out_dtype"):
        value = getattr(recipe, key)
        if value is not None and value not in DTYPES:
            raise FastmergeError(f"{where}: {key}: unsupported dtype {value!r} (use float32, float16 or bfloat16)")
    # a slice's own base_model stands in for the recipe's, as in mergekit
    bases = [recipe.base_model] if recipe.models else [sl.base_model or recipe.base_model for sl in recipe.slices]
    if spec.needs_base and not all(bases):
        raise FastmergeError(f"{where}: merge_method {method!r} needs a base_model")
    for m in [m.model for m in recipe.models or []] + [s.model for sl in recipe.slices or [] for s in sl.sources]:
        if "+" in m:
            raise FastmergeError(f"{where}: model {m!r}: LoRA references (model+lora) are not supported")
    known = set(spec.shared) | set(spec.per_model)

    def check(params: Parameters | None, loc: str, allowed: set[str]) -> None:
        for key in params or {}:
            if key not in allowed:
                raise FastmergeError(f"{where}: {loc}: unknown parameter {key!r} for merge_method {method!r}"
                                     f" (known: {', '.join(sorted(allowed))})")

    check(recipe.parameters, "parameters", known)
    for i, m in enumerate(recipe.models or []):
        check(m.parameters, f"models[{i}].parameters", known)
    for i, sl in enumerate(recipe.slices or []):
        check(sl.parameters, f"slices[{i}].parameters", known)
        for j, s in enumerate(sl.sources):
            check(s.parameters, f"slices[{i}].sources[{j}].parameters", known)
        if method == "passthrough" and len(sl.sources) != 1:
            raise FastmergeError(f"{where}: slices[{i}]: passthrough takes exactly one source per slice")
    if method == "passthrough" and recipe.models and len(recipe.models) != 1:
        raise FastmergeError(f"{where}: passthrough with models takes exactly one model (use slices to stack)")
    if method == "slerp":
        groups = [[m.model for m in recipe.models]] if recipe.models else [[s.model for s in sl.sources] for sl in recipe.slices]
        for g, b in zip(groups, bases):
            others = [m for m in g if m != b]
            if len(others) != 1:
                raise FastmergeError(f"{where}: slerp needs the base_model and exactly one other model, got {g}")


def parse_rescale(value: Any) -> str:
    """mergekit's ``rescale: true`` is the l1 rescale; ``inverse`` is the DARE paper's 1/density."""
    if value is True or value == "l1":
        return "l1"
    if value is False or value in ("none", None):
        return "none"
    if value == "inverse":
        return "inverse"
    raise FastmergeError(f"rescale: expected true, false or 'inverse', got {value!r}")


def as_float(name: str, value: Any, tensor: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise FastmergeError(f"parameter {name} for {tensor}: expected a number, got {value!r}") from None
    if math.isnan(f):
        raise FastmergeError(f"parameter {name} for {tensor}: NaN")
    return f


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(exclude_none=True, exclude_defaults=True), sort_keys=False)
