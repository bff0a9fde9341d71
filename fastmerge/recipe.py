"""mergekit-compatible merge recipes: parsing, validation and parameter resolution.

The schema is mergekit's (``merge_method``, ``base_model``, ``models``, ``slices``, ``parameters``,
``dtype``, ``out_dtype``, ``tokenizer_source``) plus fastmerge's ``random_seed`` and ``frame_model``
(which model's checkpoint the output is: a VLM's, see ``fastmerge.vlm``), so an existing mergekit
config runs unchanged. Unknown keys, methods and parameters are errors, never ignored; a
parameter another method declares (``weight`` under ``slerp``) is a warning, as mergekit ignores it.
What each method takes is declared once, in ``fastmerge.methods``.
Parameter values resolve as mergekit resolves them: scalar, gradient list (piecewise linear in
t), or ``{filter, value}`` list (substring match on the tensor name, first match wins).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import methods as _methods
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
    """mergekit's ``tokenizer:`` block (``fastmerge.vocab``): ``source`` (default ``union``),
    ``tokens`` (token -> ``{source, force}``), ``pad_to_multiple_of``."""

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
    #: fastmerge's: the model whose checkpoint the output is (default: the first vision-language model
    #: among the sources, else the base / first model as mergekit); see fastmerge.vlm
    frame_model: str | None = None

    def with_model_paths(self, f: Callable[[str], str]) -> Recipe:
        """A copy with ``f`` applied to every model reference (base, models, slice sources and
        bases, tokenizer sources other than ``union`` / ``base``, ``tokens:`` sources): the one list
        of those fields, for turning hub ids into local directories."""
        c = self.model_copy(deep=True)

        def model(name: str | None) -> str | None:
            return None if name is None else f(name)

        c.base_model = model(c.base_model)
        c.frame_model = model(c.frame_model)
        for m in c.models or []:
            m.model = model(m.model)
        for sl in c.slices or []:
            sl.base_model = model(sl.base_model)
            for src in sl.sources:
                src.model = model(src.model)
        if c.tokenizer_source not in (None, "union", "base"):
            c.tokenizer_source = model(c.tokenizer_source)
        if c.tokenizer is not None:
            if c.tokenizer.source not in (None, "union", "base"):
                c.tokenizer.source = model(c.tokenizer.source)
            for spec in (c.tokenizer.tokens or {}).values():
                src = spec.get("source") if isinstance(spec, dict) else None
                if isinstance(src, str) and src not in ("union", "base"):
                    spec["source"] = model(src)
                elif isinstance(src, dict) and isinstance(src.get("model"), str):
                    src["model"] = model(src["model"])
        return c


#: the registry (fastmerge.methods) is the one list of methods; re-exported where recipes are read
METHODS = _methods.METHODS
REQUIRED = _methods.REQUIRED
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


class _Validators(Mapping):
    """name -> how its scalars are read, for every parameter some registered method declares
    (mergekit's ParameterSpec types, so "1e-3", which YAML leaves a string, is a number and "false"
    is False; plus fastmerge's rescale spellings). Live: a method registered later is included."""

    def __getitem__(self, name: str) -> Callable[[Any], Any]:
        return _methods.known_params()[name].read

    def __iter__(self) -> Iterator[str]:
        return iter(_methods.known_params())

    def __len__(self) -> int:
        return len(_methods.known_params())


VALIDATORS: Mapping[str, Callable[[Any], Any]] = _Validators()


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


def resolve(name: str, scopes: list[Parameters | None], tensor_name: str, t: float, default: Any,
            validate: Callable[[Any], Any] | None = None) -> Any:
    """First scope (highest precedence first) whose setting yields a value, else the default.
    ``validate``: how the method reads the parameter's scalars (default: the first method that
    declares the name; the plan passes the merge method's own, e.g. della's bool ``rescale``)."""
    if validate is None and name in VALIDATORS:
        validate = VALIDATORS[name]
    for scope in scopes:
        if scope and name in scope:
            try:
                value = evaluate_setting(tensor_name, scope[name], t, validate=validate)
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
    try:
        spec = _methods.get(method)
    except FastmergeError as e:
        raise FastmergeError(f"{where}: {e}") from None
    if recipe.modules is not None:
        raise FastmergeError(f"{where}: modules (multi-module architectures) are not supported; use models or slices")
    if recipe.tokenizer is not None:
        source = recipe.tokenizer.source or "union"  # mergekit's default
        if recipe.tokenizer_source and recipe.tokenizer_source != source:
            raise FastmergeError(f"{where}: tokenizer.source and tokenizer_source disagree")
        recipe.tokenizer_source = source
        if recipe.tokenizer.pad_to_multiple_of is not None and recipe.tokenizer.pad_to_multiple_of < 1:
            raise FastmergeError(f"{where}: tokenizer.pad_to_multiple_of must be a positive integer")
        for tok, cfg in (recipe.tokenizer.tokens or {}).items():
            if cfg is None:
                continue
            if not isinstance(cfg, dict) or set(cfg) - {"source", "force"}:
                raise FastmergeError(f"{where}: tokenizer.tokens.{tok}: expected {{source, force}}")
            src = cfg.get("source")
            if isinstance(src, dict):
                kind = src.get("kind")
                keys = {"zero": {"kind"}, "model_token": {"kind", "model", "token", "token_id"}}.get(kind)
                if keys is None or set(src) - keys:
                    raise FastmergeError(f"{where}: tokenizer.tokens.{tok}.source: expected a model, "
                                         "{kind: zero} or {kind: model_token, model, token | token_id}")
                if kind == "model_token" and (("token" in src) == ("token_id" in src) or "model" not in src):
                    raise FastmergeError(f"{where}: tokenizer.tokens.{tok}.source: give a model and one of "
                                         "token or token_id")
            elif src is not None and not isinstance(src, str):
                raise FastmergeError(f"{where}: tokenizer.tokens.{tok}.source: expected a model, "
                                     "{kind: zero} or {kind: model_token, ...}")
    ct = recipe.chat_template
    if ct is not None and not (len(ct) < 256 and "\n" not in ct and "{" not in ct) and (len(ct) < 20 or "{" not in ct):
        raise FastmergeError(f"{where}: chat_template: invalid template {ct[:40]!r} (a name such as chatml or auto, "
                             "or Jinja text)")
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
    check_parameters(recipe, spec, where)
    groups = [[m.model for m in recipe.models]] if recipe.models else [[s.model for s in sl.sources] for sl in recipe.slices]
    if spec.inputs == 1:
        for i, sl in enumerate(recipe.slices or []):
            if len(sl.sources) != 1:
                raise FastmergeError(f"{where}: slices[{i}]: {method} takes exactly one source per slice")
        if recipe.models and len(recipe.models) != 1:
            raise FastmergeError(f"{where}: {method} with models takes exactly one model (use slices to stack)")
    elif spec.inputs is not None and spec.needs_base:
        for g, b in zip(groups, bases):
            others = [m for m in g if m != b]
            if len(others) != spec.inputs - 1:
                n = spec.inputs - 1
                raise FastmergeError(f"{where}: {method} needs the base_model and exactly {'one' if n == 1 else n} "
                                     f"other model{'s' if n > 1 else ''}, got {g}")
    low, high = spec.non_base
    for g, b in zip(groups, bases):
        b = spec.base_of(b)
        others = [m for m in g if m != b]
        if len(others) < low or (high is not None and len(others) > high):
            want = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise FastmergeError(f"{where}: {method} needs {want} model{'s' if (high or low) > 1 else ''} "
                                 f"besides the base_model, got {others}")


def check_parameters(recipe: Recipe, spec: _methods.MergeMethod, where: str = "recipe") -> None:
    """Every parameter name is one of the method's (fine), another method's (a warning: mergekit
    ignores it, so a mergekit config that carries one runs), or no method's (an error: a typo)."""
    own = spec.param
    known = _methods.known_params()

    def check(params: Parameters | None, loc: str) -> None:
        for key in params or {}:
            if key in own:
                continue
            if key in known:
                warnings.warn(f"{where}: {loc}: parameter {key!r} does not apply to merge_method {spec.name!r} "
                              "(mergekit ignores it; so does fastmerge)", stacklevel=4)
                continue
            raise FastmergeError(f"{where}: {loc}: unknown parameter {key!r} for merge_method {spec.name!r}"
                                 f" (known: {', '.join(sorted(own))})")

    check(recipe.parameters, "parameters")
    for i, m in enumerate(recipe.models or []):
        check(m.parameters, f"models[{i}].parameters")
    for i, sl in enumerate(recipe.slices or []):
        check(sl.parameters, f"slices[{i}].parameters")
        for j, s in enumerate(sl.sources):
            check(s.parameters, f"slices[{i}].sources[{j}].parameters")


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
    """The recipe as mergekit YAML. Validation copies a ``tokenizer:`` block's source into
    ``tokenizer_source``; mergekit refuses a config with both, so the block alone is written."""
    data = recipe.model_dump(exclude_none=True, exclude_defaults=True)
    if recipe.tokenizer is not None:
        data.pop("tokenizer_source", None)
    return yaml.safe_dump(data, sort_keys=False)
