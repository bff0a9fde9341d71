"""Data-flow-space merging (DESIGN.md section 6): run a path of layers taken from several loaded
models, each hop computing ``layer(scale * h)``, without copying a weight.

Why an executor and not a frankenmerge on disk: an evolutionary search tries thousands of paths.
Building a model per path (mergekit's passthrough) costs a copy of every repeated layer and a
write; here a path is a list of references into models that are already loaded, so switching
paths is free and memory stays the union of the sources whatever the path length.

Each hop has its own KV-cache slot: a layer used twice sees two different inputs, so it needs two
caches. The attention modules index the cache by their own ``layer_idx`` (fixed at construction,
and equal for layer 3 of model A and layer 3 of model B); a thin per-hop view of the cache maps
whatever index the layer asks for to the hop's slot.

``PathModel`` is a ``PreTrainedModel`` with ``GenerationMixin``, so ``generate()`` works, and the
same class loads an exported path checkpoint (``export``): only the unique layers used are stored,
the path and scales go in its config, and ``AutoModelForCausalLM`` knows the class once fastmerge
is imported.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .errors import FastmergeError
from .hf_compat import CACHE_OUTPUT_FIELD, cache_kwarg, no_init_weights
from .io import atomic_write, read_json, read_json_object, refuse_pickled_weights
from .safety import OutputClaim, protected_inputs
from .vlm import DFS_UNSUPPORTED, is_vlm

#: Architectures whose decoder layer has the Llama contract
#: ``layer(h, attention_mask, position_ids, cache | past_key_values, use_cache, position_embeddings)``.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

#: Config keys that do not change what a decoder layer computes (export checks the rest agree).
_NOT_LAYER_KEYS = {
    "vocab_size", "num_hidden_layers", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    "torch_dtype", "dtype", "transformers_version", "architectures", "_name_or_path", "max_position_embeddings",
    "layer_types", "max_window_layers", "use_cache", "output_attentions", "output_hidden_states", "return_dict",
    "_attn_implementation_autoset", "initializer_range", "id2label", "label2id", "generation_config",
}


# --------------------------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class Hop:
    """One step of a path: ``h = models[model].layers[layer](scale * h)``."""

    model: int
    layer: int
    scale: float = 1.0


@dataclass(frozen=True)
class LayerPath:
    """An ordered list of hops; the unit the DFS search evolves and ``export`` materializes."""

    hops: tuple[Hop, ...]

    def __init__(self, hops: Sequence[Hop | Sequence | dict]):
        object.__setattr__(self, "hops", tuple(_hop(h) for h in hops))

    def __len__(self) -> int:
        return len(self.hops)

    def __iter__(self):
        return iter(self.hops)

    def __getitem__(self, i: int) -> Hop:
        return self.hops[i]

    @property
    def scales(self) -> list[float]:
        return [h.scale for h in self.hops]

    def unique_layers(self) -> list[tuple[int, int]]:
        """(model, layer) of every distinct layer, in order of first use."""
        return list(dict.fromkeys((h.model, h.layer) for h in self.hops))

    def validate(self, num_layers: Sequence[int]) -> None:
        """Clear errors for a path that cannot run over models with these layer counts."""
        if not self.hops:
            raise FastmergeError("layer path: empty (a path needs at least one hop)")
        for i, h in enumerate(self.hops):
            if not 0 <= h.model < len(num_layers):
                raise FastmergeError(f"layer path: hop {i} uses model {h.model}, but {len(num_layers)} models are loaded")
            if not 0 <= h.layer < num_layers[h.model]:
                raise FastmergeError(f"layer path: hop {i} uses layer {h.layer} of model {h.model}, "
                                     f"which has {num_layers[h.model]} layers")
            if not math.isfinite(h.scale):
                raise FastmergeError(f"layer path: hop {i} has a non-finite scale {h.scale}")

    def to_dict(self) -> dict:
        return {"hops": [[h.model, h.layer, h.scale] for h in self.hops]}

    @classmethod
    def from_dict(cls, d: dict | Sequence) -> LayerPath:
        key = "hops" if not isinstance(d, dict) or "hops" in d or "path" not in d else "path"
        hops = d.get(key) if isinstance(d, dict) else d
        if hops is None:
            raise FastmergeError("layer path: expected a 'hops' list of [model, layer, scale]")
        if not isinstance(hops, (list, tuple)):
            raise FastmergeError(f"layer path: {key}: expected a list of [model, layer, scale], got {_json_type(hops)}")
        return cls([_hop(h, f"{key}[{i}]") for i, h in enumerate(hops)])

    def save(self, file: str | Path, models: Sequence[str] | None = None, head: int = 0) -> Path:
        """Write a path file (JSON): the hops and, for ``fastmerge dfs export``, the model paths."""
        data = {"models": [str(m) for m in models] if models is not None else None, "head": head, **self.to_dict()}
        return atomic_write(Path(file), json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, file: str | Path) -> LayerPath:
        return load_path_file(file)[0]


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", tuple: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _hop(h: Hop | Sequence | dict, where: str | None = None) -> Hop:
    """One hop from ``[model, layer]``, ``[model, layer, scale]`` or ``{"model", "layer", "scale"}``:
    model and layer non-negative integers, scale a finite number (JSON booleans and strings are
    not numbers here). ``where`` names the hop in messages (``hops[3]``)."""
    if isinstance(h, Hop):
        return h
    shown = repr(h) if len(repr(h)) <= 80 else repr(h)[:77] + "..."
    where = f"layer path: bad hop {where + ' ' if where else ''}{shown}"
    if isinstance(h, dict):
        unknown = sorted(set(h) - {"model", "layer", "scale"}, key=str)
        if unknown:
            raise FastmergeError(f"{where}: unknown key {unknown[0]!r} (expected model, layer, scale)")
        for key in ("model", "layer"):
            if key not in h:
                raise FastmergeError(f"{where}: missing {key!r}")
        fields = {"model": h["model"], "layer": h["layer"], "scale": h.get("scale", 1.0)}
    elif isinstance(h, (list, tuple)) and len(h) in (2, 3):
        fields = dict(zip(("model", "layer", "scale"), h))
        fields.setdefault("scale", 1.0)
    else:
        raise FastmergeError(f"{where}: expected [model, layer] or [model, layer, scale]")
    for key in ("model", "layer"):
        v = fields[key]
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise FastmergeError(f"{where}: {key} {v!r} is not an integer")
        if v < 0:
            raise FastmergeError(f"{where}: {key} {v!r} is negative")
    v = fields["scale"]
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
        raise FastmergeError(f"{where}: scale {v!r} is not a number")
    if not math.isfinite(v):
        raise FastmergeError(f"{where}: scale {v!r} is non-finite")
    return Hop(int(fields["model"]), int(fields["layer"]), float(v))


def load_path_file(file: str | Path) -> tuple[LayerPath, list[str] | None, int]:
    """A path file -> (path, model paths or None, head)."""
    file = Path(file)
    data = read_json(file, "path file")
    if not isinstance(data, dict):
        raise FastmergeError(f"{file}: expected an object with 'hops' (and 'models', 'head'), got {_json_type(data)}")
    if "hops" not in data and "path" not in data:
        raise FastmergeError(f"{file}: missing 'hops' (a list of [model, layer, scale])")
    try:
        path = LayerPath.from_dict(data)
    except FastmergeError as e:
        raise FastmergeError(f"{file}: {e}") from None
    models = data.get("models")
    if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)):
        raise FastmergeError(f"{file}: models: expected a list of model directories, got {models!r}")
    head = data.get("head", 0)
    if not isinstance(head, int) or isinstance(head, bool) or head < 0:
        raise FastmergeError(f"{file}: head: expected a non-negative integer (a model index), got {head!r}")
    if models and head >= len(models):
        raise FastmergeError(f"{file}: head: {head} is not one of the {len(models)} models")
    return path, (models or None), head


def load_sources(models: Sequence[str | Path], head: int = 0, device: str = "cpu", dtype="auto",
                 allow_bin: bool = False):
    """Load source checkpoints for a path (eval mode) and the head model's tokenizer, if it has one.
    Pickled ``.bin`` weights only with ``allow_bin``."""
    from transformers import AutoTokenizer

    for m in models:  # every source checked before minutes of loading
        if not Path(m).is_dir():
            raise FastmergeError(f"{m}: not a model directory")
        refuse_pickled_weights(Path(m), allow_bin)
        cfg = Path(m) / "config.json"
        if cfg.is_file() and is_vlm(read_json_object(cfg, "config")):
            raise FastmergeError(f"{m}: a vision-language model: {DFS_UNSUPPORTED}")
    loaded = []
    for m in models:
        try:
            loaded.append(AutoModelForCausalLM.from_pretrained(m, dtype=dtype).to(device).eval())
        except (OSError, ValueError) as e:
            raise FastmergeError(f"{m}: cannot load as a causal LM ({str(e).splitlines()[0]})") from None
    if not 0 <= head < len(loaded):
        raise FastmergeError(f"head {head} is not one of the {len(loaded)} models")
    try:
        tokenizer = AutoTokenizer.from_pretrained(models[head])
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return loaded, tokenizer


# --------------------------------------------------------------------------------------------- executor


class _HopCache:
    """The shared cache as seen by one hop: every update lands in the hop's own slot."""

    __slots__ = ("cache", "slot")

    def __init__(self, cache: Cache, slot: int):
        self.cache = cache
        self.slot = slot

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return self.cache.update(key_states, value_states, self.slot, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.cache, name)


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder with embed_tokens/layers/norm/rotary_emb, lm_head) of a Llama-family causal LM."""
    decoder = getattr(model, "model", None)
    ok = decoder is not None and all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))
    if not ok or not hasattr(model, "lm_head"):
        raise FastmergeError(f"{type(model).__name__}: not a Llama-family causal LM "
                             "(expected .model.embed_tokens/.layers/.norm/.rotary_emb and .lm_head)")
    return decoder, model.lm_head


def _attention_kind(config: PretrainedConfig, layer: int) -> str:
    types = getattr(config, "layer_types", None)
    if types:
        return types[layer]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def _mask_key(config: PretrainedConfig, layer: int) -> tuple:
    """What a layer's attention mask depends on: sources configured alike share one mask."""
    kind = _attention_kind(config, layer)
    window = getattr(config, "sliding_window", None) if kind == "sliding_attention" else None
    return kind, window, getattr(config, "_attn_implementation", None)


def _mask(config: PretrainedConfig, kind: str, cache: Cache | None, **kw):
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    fn = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
    return fn(config=config, **{cache_kwarg(fn): cache}, **kw)


class FastmergePathConfig(PretrainedConfig):
    """Config of a path model: the source family's config (``inner``), the hops and the head.

    ``num_hidden_layers`` is the path length, so a cache sized from this config has a slot per hop.
    """

    model_type = "fastmerge_path"

    def __init__(self, inner: dict | None = None, hops: list | None = None, head: int = 0, **kwargs):
        self.inner = dict(inner or {})
        self.hops = [list(h) for h in (hops or [])]
        self.head = head
        kwargs.setdefault("num_hidden_layers", len(self.hops))
        for key in ("vocab_size", "hidden_size", "bos_token_id", "eos_token_id", "pad_token_id"):
            if key in self.inner:
                kwargs.setdefault(key, self.inner[key])
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)


class PathModel(PreTrainedModel, GenerationMixin):
    """A causal LM whose decoder is a path of layers referenced from ``models``.

    ``PathModel(models, path, head=0)``: embeddings, final norm and lm_head from ``models[head]``;
    the models are registered as submodules, never copied. ``set_path`` switches paths in place.
    Also the class of exported path checkpoints: ``PathModel(config)`` builds one inner model that
    holds the unique layers, which ``from_pretrained`` then fills.
    """

    config_class = FastmergePathConfig
    base_model_prefix = "path"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = []

    def __init__(self, models: Sequence[nn.Module] | FastmergePathConfig, path: LayerPath | Sequence | None = None,
                 head: int = 0):
        if isinstance(models, FastmergePathConfig):
            config = models
            inner = AutoConfig.for_model(**config.inner)
            # from_pretrained sets the default dtype to the one it loads in; the inner model follows
            sources = [AutoModelForCausalLM.from_config(inner, dtype=torch.get_default_dtype())]
            path = LayerPath.from_dict(config.hops)
            head = config.head
        else:
            sources = list(models)
            if not sources:
                raise FastmergeError("PathModel: no models given")
            path = path if isinstance(path, LayerPath) else LayerPath.from_dict(path or [])
            _check_family(sources)
            config = FastmergePathConfig(inner=sources[head].config.to_dict() if 0 <= head < len(sources) else {},
                                         hops=path.to_dict()["hops"], head=head)
        super().__init__(config)
        if not 0 <= head < len(sources):
            raise FastmergeError(f"PathModel: head {head} is not one of the {len(sources)} models")
        self.sources = nn.ModuleList(sources)
        self.head = head
        self._decoders = [_parts(m)[0] for m in sources]
        self.set_path(path)
        if isinstance(models, FastmergePathConfig):
            self.post_init()
        else:  # the sources' weights are what they are: post_init must not initialize any of them
            with no_init_weights():
                self.post_init()

    # -- structure

    @property
    def num_layers(self) -> list[int]:
        return [len(d.layers) for d in self._decoders]

    def set_path(self, path: LayerPath | Sequence) -> None:
        """Switch to another path over the same models (nothing is copied or allocated)."""
        path = path if isinstance(path, LayerPath) else LayerPath.from_dict(path)
        path.validate(self.num_layers)
        self.path = path
        # per hop: (layer module, scale, mask key, source, the layer's cache keyword): resolved once
        layers = [self._decoders[h.model].layers[h.layer] for h in path]
        self._hops = [(layer, h.scale, _mask_key(self.sources[h.model].config, h.layer), h.model,
                       cache_kwarg(type(layer).forward)) for layer, h in zip(layers, path)]
        self.config.hops = path.to_dict()["hops"]
        self.config.num_hidden_layers = len(path)

    def get_input_embeddings(self) -> nn.Module:
        return self._decoders[self.head].embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.sources[self.head].lm_head

    def _init_weights(self, module: nn.Module) -> None:
        """Loading a checkpoint initializes what it does not hold (rotary tables): the source
        family's own initializer knows how."""
        init = getattr(self.sources[self.head], "_init_weights", None) if "sources" in self._modules else None
        if init is not None:
            init(module)

    # -- forward

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0, past_key_values: Cache | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        # transformers 5.24 renamed the cache argument to ``cache`` (generate() passes that name);
        # older releases, and callers written for them, say ``past_key_values``: both are one cache.
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("PathModel: give the KV cache as `cache` or `past_key_values`, not both")
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("PathModel: give exactly one of input_ids or inputs_embeds")
        head = self._decoders[self.head]
        h = head.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None:
            cache = DynamicCache()
        if position_ids is None:
            seen = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(h.shape[1], device=h.device) + seen).unsqueeze(0)

        # Masks and rotary embeddings once per forward, per (source, attention kind): computed
        # before any hop writes the cache, so every hop sees the same past length.
        mask_args = dict(inputs_embeds=h, attention_mask=attention_mask, cache=cache, position_ids=position_ids)
        masks: dict[tuple, object] = {}
        rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for _, _, key, model, _ in self._hops:
            if key not in masks:
                masks[key] = _mask(self.sources[model].config, key[0], **mask_args)
            if model not in rope:
                rope[model] = self._decoders[model].rotary_emb(h, position_ids=position_ids)

        for slot, (layer, scale, key, model, cache_kw) in enumerate(self._hops):
            hop_cache = {cache_kw: _HopCache(cache, slot) if cache is not None else None}
            out = layer(h if scale == 1.0 else h * scale, attention_mask=masks[key], position_ids=position_ids,
                        use_cache=use_cache, position_embeddings=rope[model], **hop_cache)
            h = out[0] if isinstance(out, tuple) else out

        h = head.norm(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.sources[self.head].lm_head(h)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_OUTPUT_FIELD: cache if use_cache else None})


def _check_family(models: Sequence[nn.Module]) -> None:
    """Models a path may mix: one Llama-family architecture, one hidden size."""
    for i, m in enumerate(models):
        cfg = getattr(m, "config", None)
        if cfg is None or getattr(cfg, "model_type", None) not in FAMILIES:
            kind = getattr(cfg, "model_type", type(m).__name__)
            raise FastmergeError(f"PathModel: model {i} is {kind!r}; supported families: {', '.join(FAMILIES)}")
        _parts(m)
    types = {m.config.model_type for m in models}
    if len(types) > 1:
        raise FastmergeError(f"PathModel: models of different families ({', '.join(sorted(types))}) cannot share a path")
    sizes = [m.config.hidden_size for m in models]
    if len(set(sizes)) > 1:
        raise FastmergeError(f"PathModel: hidden sizes differ ({sizes}); a path needs one hidden size")


# --------------------------------------------------------------------------------------------- materialize / export


def _layer_config(config: PretrainedConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _NOT_LAYER_KEYS}


def _check_exportable(models: Sequence[nn.Module], path: LayerPath, head: int) -> None:
    ref = _layer_config(models[head].config)
    for m in {h.model for h in path}:
        cfg = _layer_config(models[m].config)
        diff = sorted(k for k in set(ref) | set(cfg) if ref.get(k) != cfg.get(k))
        if diff:
            raise FastmergeError(f"export: model {m}'s layers are not configured like the head model's "
                                 f"({', '.join(diff[:5])}); such a path runs in PathModel but cannot be one checkpoint")


def _assemble(models: Sequence[nn.Module], layers: Sequence[tuple[int, int]], head: int,
              types: Sequence[str]) -> nn.Module:
    """A plain HF causal LM of the head's class with deep copies of ``layers`` (in order)."""
    config = copy.deepcopy(models[head].config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(types)
    if hasattr(config, "max_window_layers"):
        config.max_window_layers = len(layers)
    config.tie_word_embeddings = False
    src_dec, src_head = _parts(models[head])
    dtype = src_dec.embed_tokens.weight.dtype
    config.dtype = dtype
    with no_init_weights():
        out = type(models[head])(config).to(dtype)
    dec, lm_head = _parts(out)
    dec.embed_tokens.load_state_dict(src_dec.embed_tokens.state_dict())
    dec.norm.load_state_dict(src_dec.norm.state_dict())
    lm_head.load_state_dict(src_head.state_dict())
    for j, (m, i) in enumerate(layers):
        dec.layers[j].load_state_dict(_parts(models[m])[0].layers[i].state_dict())
    return out.to(src_dec.embed_tokens.weight.device).eval()


def materialize(models: Sequence[nn.Module], path: LayerPath | Sequence, head: int = 0) -> nn.Module:
    """The path as a plain HF model with ``len(path)`` layers (weights copied, layers repeated).

    Scales other than 1 become forward pre-hooks that scale each layer's input, so the result
    computes what the path model computes; with all scales 1 it is a standard frankenmerge.
    """
    path = path if isinstance(path, LayerPath) else LayerPath.from_dict(path)
    _check_family(models)
    path.validate([len(_parts(m)[0].layers) for m in models])
    _check_exportable(models, path, head)
    types = [_attention_kind(models[h.model].config, h.layer) for h in path]
    out = _assemble(models, [(h.model, h.layer) for h in path], head, types)
    for layer, hop in zip(_parts(out)[0].layers, path):
        if hop.scale != 1.0:
            layer.register_forward_pre_hook(_scale_hook(hop.scale), with_kwargs=True)
    return out


def _scale_hook(scale: float):
    def hook(module, args, kwargs):
        if args:
            return (args[0] * scale, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}

    return hook


def export(models: Sequence[nn.Module], path: LayerPath | Sequence, out: str | Path, head: int = 0,
           plain: bool = False, tokenizer=None, force: bool = False,
           protect: Sequence[str | Path | tuple[str, str | Path]] = ()) -> Path:
    """Save a path model as a checkpoint, with ``tokenizer`` or else the head model's tokenizer files
    (copied from the directory it was loaded from, where there is one).

    Default: the unique layers used plus the hops in a ``fastmerge_path`` config; it loads with
    ``PathModel.from_pretrained`` or, once fastmerge is imported, ``AutoModelForCausalLM``.
    ``plain``: a standard HF checkpoint of the head's architecture with repeated layers copied
    (every scale must be 1), loadable anywhere. Written to a temporary directory, renamed at the end
    (``safety.OutputClaim``: the target locked, never replaced without ``force``). ``out`` may not be,
    hold or lie inside a source model's directory (those the models were loaded from, and model
    directories in ``protect``), nor hold the working directory or a ``(what, file)`` of ``protect``.
    """
    path = path if isinstance(path, LayerPath) else LayerPath.from_dict(path)
    out = Path(out)
    sources = [getattr(getattr(m, "config", None), "_name_or_path", None) for m in models]
    sources += [getattr(tokenizer, "name_or_path", None)] + [p for p in protect if not isinstance(p, tuple)]
    claim = OutputClaim(out, force, protected_inputs(sources, [p for p in protect if isinstance(p, tuple)]))
    claim.check()  # before any work; again under the lock
    _check_family(models)
    path.validate([len(_parts(m)[0].layers) for m in models])
    _check_exportable(models, path, head)
    if plain:
        bad = [i for i, h in enumerate(path) if h.scale != 1.0]
        if bad:
            raise FastmergeError(f"export --plain: hop {bad[0]} has scale {path[bad[0]].scale}; a plain HF model "
                                 "cannot scale layer inputs (export without --plain keeps the scales)")
        model = materialize(models, path, head)
    else:
        unique = path.unique_layers()
        index = {ml: j for j, ml in enumerate(unique)}
        types = [_attention_kind(models[m].config, i) for m, i in unique]
        inner = _assemble(models, unique, head, types)
        hops = [[0, index[(h.model, h.layer)], h.scale] for h in path]
        model = PathModel([inner], hops, head=0)
        model.config.source_layers = [list(ml) for ml in unique]
        model.config.dtype = str(_parts(inner)[0].embed_tokens.weight.dtype).removeprefix("torch.")
    with claim:  # the target locked, stale temporaries removed, ``claim.tmp`` made; left: removed
        model.save_pretrained(claim.tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(claim.tmp)
        else:  # the head's own tokenizer files, where it was loaded from a local directory
            _copy_tokenizer_files(getattr(models[head].config, "_name_or_path", None), claim.tmp)
        claim.commit()
    return out


def _copy_tokenizer_files(source: str | None, out: Path) -> None:
    from .engine import tokenizer_files

    if source and Path(source).is_dir():
        for f in tokenizer_files(source):
            shutil.copyfile(f, out / f.name)


AutoConfig.register(FastmergePathConfig.model_type, FastmergePathConfig, exist_ok=True)
AutoModelForCausalLM.register(FastmergePathConfig, PathModel, exist_ok=True)


# --------------------------------------------------------------------------------------------- genome


@dataclass
class DFSGenome:
    """The paper's DFS genome: an indicator over T = M * r layer slots and an M x M scale matrix.

    M counts the layers of all sources in order (the head's first, as the paper puts model A
    first); slot ``i`` stands for layer ``i % M`` and is kept where its gene is above 0.5 (the
    paper's ``I_i > 0`` in a [0, 1] search space). The scale of a hop is ``W[previous, this]``
    mapped to ``scale_range``; the first hop uses 1. ``fix_ends`` puts the head's first and last
    layers at the ends of every path (their slots are then not searched). ``init="paper"``
    starts with the head's layers of the first repetition kept and everything else dropped.
    """

    layers: Sequence[int]
    repetitions: int = 3
    fix_ends: bool = True
    head: int = 0
    scale_range: tuple[float, float] = (0.0, 2.0)
    init: str = "paper"

    def __post_init__(self):
        self.layers = [int(n) for n in self.layers]
        if len(self.layers) < 1 or min(self.layers) < 1:
            raise FastmergeError(f"DFS genome: every model needs at least one layer (got {self.layers})")
        if not 0 <= self.head < len(self.layers):
            raise FastmergeError(f"DFS genome: head {self.head} is not one of the {len(self.layers)} models")
        if self.repetitions < 1:
            raise FastmergeError(f"DFS genome: repetitions must be >= 1 (got {self.repetitions})")
        lo, hi = self.scale_range
        if not lo < hi:
            raise FastmergeError(f"DFS genome: scale_range must be (low, high) with low < high (got {self.scale_range})")
        if self.init not in ("paper", "uniform"):
            raise FastmergeError(f"DFS genome: init must be 'paper' or 'uniform' (got {self.init!r})")
        order = [self.head] + [m for m in range(len(self.layers)) if m != self.head]
        self._slots = [(m, i) for m in order for i in range(self.layers[m])]  # the M global layers
        self._fixed = {(self.head, 0), (self.head, self.layers[self.head] - 1)} if self.fix_ends else set()

    @property
    def num_slots(self) -> int:
        return len(self._slots) * self.repetitions

    @property
    def size(self) -> int:
        m = len(self._slots)
        return m * self.repetitions + m * m

    def x0(self) -> np.ndarray:
        x = np.full(self.size, 0.5)
        ind = x[: self.num_slots]
        m = len(self._slots)
        ind[:] = 0.25 if self.init == "paper" else 0.5
        if self.init == "paper":
            for i, (model, _) in enumerate(self._slots):
                if model == self.head:
                    ind[i] = 0.75
        lo, hi = self.scale_range
        x[self.num_slots:] = min(max((1.0 - lo) / (hi - lo), 0.0), 1.0) if lo <= 1.0 <= hi else 0.5
        assert len(x) == self.num_slots + m * m
        return x

    def decode(self, x: np.ndarray | Sequence[float]) -> LayerPath:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.size,):
            raise FastmergeError(f"DFS genome: expected {self.size} genes, got {x.shape}")
        m = len(self._slots)
        w = x[self.num_slots:].reshape(m, m)
        lo, hi = self.scale_range
        chosen = [k % m for k in range(self.num_slots) if x[k] > 0.5 and self._slots[k % m] not in self._fixed]
        if self.fix_ends:
            first, last = self._slots.index((self.head, 0)), self._slots.index((self.head, self.layers[self.head] - 1))
            chosen = [first, *chosen, last] if first != last else [first, *chosen]
        if not chosen:  # nothing kept: the head's first layer, so every genome decodes to a runnable path
            chosen = [0]
        hops, prev = [], None
        for g in chosen:
            scale = 1.0 if prev is None else float(lo + (hi - lo) * min(max(w[prev, g], 0.0), 1.0))
            hops.append(Hop(*self._slots[g], scale))
            prev = g
        return LayerPath(hops)
