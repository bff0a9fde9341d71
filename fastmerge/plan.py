"""recipe -> plan: every output tensor, its inputs and its per-tensor merge parameters.

The plan is built from checkpoint headers and configs only (no weight is read), so the output
layout is known before the merge starts and every mistake in the recipe or the inputs (missing
model, missing tensor, shape mismatch, missing parameter) is reported before anything is written.
It knows nothing of devices or threads.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from . import dtypes, methods, vlm, vocab
from .errors import FastmergeError
from .io import CheckpointReader
from .recipe import DTYPES, REQUIRED, Parameters, Recipe, as_float, parse_rescale, resolve
from .spec import FusedOptions

if TYPE_CHECKING:
    import torch

#: The layer prefixes of the decoder families mergekit ships architecture files for and
#: transformers implements (``model.layers``: Llama, Mistral, Qwen, Gemma, Phi-3...; ``transformer.h``:
#: GPT-2, GPT-J, Falcon, GPTBigCode, Qwen-1, EXAONE, old Phi-2; ``gpt_neox.layers``: GPT-NeoX / Pythia;
#: ``model.decoder.layers``: OPT; ``transformer.blocks``: MPT; ``backbone.layers``: Mamba;
#: ``model.language_model.layers``: Qwen3-VL; the encoders' ``*.encoder.layer``). The prefix of a
#: checkpoint is derived from its tensor names and its config's layer count (``layer_prefix``);
#: this table breaks ties and names the layers of a bare tensor name (``layer_group``).
KNOWN_PREFIXES = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks",
                  "transformer.layers", "model.language_model.layers", "backbone.layers", "transformer.encoder.layers",
                  "bert.encoder.layer", "roberta.encoder.layer", "encoder.layer", "distilbert.transformer.layer",
                  "layers")
#: The config keys of the layer count, in the order transformers' configs use them
#: (``num_hidden_layers``: most; ``n_layer``: GPT-2, GPT-J, GPTBigCode, Bloom; ``num_layers``;
#: ``n_layers``: MPT).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
#: A tensor inside a numbered layer under one of the usual container names (``layers``, ``h``,
#: ``blocks``, ``layer``, ``block``); ``CheckpointReader``-aware code uses ``layer_prefix`` instead.
LAYER_RE = re.compile(r"^(?P<prefix>(?:[\w.]*?\.)?(?:layers|h|blocks|layer|block))\.(?P<idx>\d+)\.(?P<rest>.+)$")
_NUMBERED = re.compile(r"^(?P<prefix>.+?)\.(?P<idx>\d+)\.(?P<rest>.+)$")
VOCAB_HINTS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings")
#: the input embeddings a tied ``lm_head.weight`` stands for (Llama-style, GPT-2-style, Falcon)
TIED_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "transformer.word_embeddings.weight")
PRE_HINTS = ("embed_tokens", "wte", "wpe", "embed_in", "embed_positions", "word_embeddings")


@dataclass(frozen=True)
class Source:
    model: str
    name: str


@dataclass
class TensorPlan:
    """One output tensor: read ``base`` + ``inputs``, run its ``route``, write ``name``.

    The route is decided here, once per tensor, from the method's declaration: ``copy`` (one
    input cast to the output dtype), ``fused`` (the task-arithmetic op with ``fused`` options) or
    ``torch`` (``method``'s torch function with ``params``: shared parameters as values, per-model
    ones as tuples in ``inputs`` order). Executors look the route up; they re-derive nothing.
    """

    name: str
    shape: tuple[int, ...]
    code: str  # output dtype, as a safetensors code (BF16, F32, ...)
    route: Literal["copy", "fused", "torch"]
    inputs: list[Source]
    base: Source | None = None
    fused: FusedOptions | None = None
    position: float = 0.0  # t of the layer in its slice (gradients), 0 outside the layers
    method: str | None = None  # fused and torch routes: the registry name
    params: dict[str, Any] = field(default_factory=dict)  # torch route: the resolved parameters
    seed: int = 0  # torch route: the recipe's random_seed (the fused route's is in ``fused``)
    rows: int | None = None  # vocab mismatch: rows merged (the rest copied from ``base`` or input 0)
    vocab: vocab.VocabRows | None = None  # a tokenizer source: the sources rebuilt for the output vocabulary
    in_bytes: int = 0
    #: the name that keys the tensor's random streams (DARE masks) and its layer group: ``name``, except
    #: in a VLM output, where it is the text model's name of a language-model tensor (fastmerge.vlm)
    key: str = ""
    #: a VLM's vision tower / projector tensor: copied from the frame, the same for every candidate
    carried: bool = False

    def __post_init__(self) -> None:
        self.key = self.key or self.name

    @property
    def whole(self) -> bool:
        """The inputs are merged as they are (no vocabulary rows cut or rebuilt)."""
        return self.rows is None and self.vocab is None

    @property
    def sources(self) -> list[Source]:
        return ([self.base] if self.base else []) + self.inputs

    def split(self, tensors: list):
        """(base or None, the other inputs) of tensors loaded in ``sources`` order."""
        return (tensors[0], tensors[1:]) if self.base else (None, tensors)

    @property
    def t(self) -> float:
        """slerp's interpolation factor for this tensor (0.0 for other methods)."""
        return float(self.params.get("t", 0.0))

    @property
    def dtype(self) -> torch.dtype:
        return dtypes.to_torch(self.code)

    @property
    def out_bytes(self) -> int:
        n = dtypes.itemsize(self.code)
        for s in self.shape:
            n *= s
        return n


@dataclass
class Plan:
    tensors: list[TensorPlan]
    config: dict
    reference_model: str
    tokenizer_model: str | None
    num_layers: int
    warnings: list[str] = field(default_factory=list)
    #: the recipe names a tokenizer source: the output tokenizer and vocabulary (None: copy ``tokenizer_model``'s)
    vocab: vocab.OutVocab | None = None
    #: the output is a vision-language model: this one's, its language model merged (fastmerge.vlm)
    frame: vlm.Frame | None = None

    @property
    def read_bytes(self) -> int:
        return sum(t.in_bytes for t in self.tensors)

    @property
    def write_bytes(self) -> int:
        return sum(t.out_bytes for t in self.tensors)


@dataclass
class _SliceSrc:
    model: str
    start: int
    end: int
    parameters: Parameters | None


def config_num_layers(config: dict) -> int | None:
    """The layer count a config declares (``num_hidden_layers``, ``n_layer``, ...), or None. A
    vision-language model's (LLaVA: no count at the top level) is its ``text_config``'s."""
    for key in LAYER_COUNT_KEYS:
        n = config.get(key)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    text = config.get("text_config")
    return config_num_layers(text) if isinstance(text, dict) else None


def layer_count_key(config: dict) -> str:
    """The key that holds a config's layer count (``num_hidden_layers`` where it has none)."""
    return next((k for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), "num_hidden_layers")


def layer_prefix(names, count: int | None = None) -> str | None:
    """The prefix of the numbered decoder layers among tensor ``names`` (``model.layers``,
    ``transformer.h``, ``gpt_neox.layers``...), or None when there are none.

    Every name ``P.N.rest`` (the first number in it) proposes ``P``; the winner is the proposal
    whose indices are exactly 0..count-1 (``count`` from the config), then a known prefix
    (``KNOWN_PREFIXES`` order), then the one with the most layers. So a vision tower's
    ``visual.blocks.N`` loses to the language model's layers, and an unknown layout still works.
    """
    seen: dict[str, set[int]] = {}
    for name in names:
        m = _NUMBERED.match(name)
        if m:
            seen.setdefault(m["prefix"], set()).add(int(m["idx"]))
    if not seen:
        return None

    def rank(prefix: str):
        idx = seen[prefix]
        exact = count is not None and idx == set(range(count))
        known = KNOWN_PREFIXES.index(prefix) if prefix in KNOWN_PREFIXES else len(KNOWN_PREFIXES)
        return (not exact, known, -len(idx), prefix)

    return min(seen, key=rank)


def _layers(reader: CheckpointReader) -> tuple[str, dict[int, list[str]]]:
    """The layer prefix (e.g. ``model.layers``, ``transformer.h``) and, per layer index, the rest of
    each name."""
    cached = getattr(reader, "_fm_layers", None)
    if cached is not None:
        return cached
    prefix = layer_prefix(reader.tensors, config_num_layers(reader.config))
    by_layer: dict[int, list[str]] = {}
    if prefix is not None:
        head = prefix + "."
        for name in reader.tensors:
            if name.startswith(head):
                idx, _, rest = name[len(head):].partition(".")
                if idx.isdigit() and rest:
                    by_layer.setdefault(int(idx), []).append(rest)
    out = (prefix or "model.layers", by_layer)
    try:
        reader._fm_layers = out
    except AttributeError:  # a reader that takes no attributes: derive again next time
        pass
    return out


def _in_layers(reader: CheckpointReader, name: str) -> bool:
    prefix, by_layer = _layers(reader)
    head = prefix + "."
    if not by_layer or not name.startswith(head):
        return False
    idx, _, rest = name[len(head):].partition(".")
    return idx.isdigit() and bool(rest)


def num_layers(reader: CheckpointReader) -> int:
    n = config_num_layers(reader.config)
    if n is not None:
        return n
    _, by_layer = _layers(reader)
    return max(by_layer) + 1 if by_layer else 0


def model_num_layers(path: str | Path) -> int | None:
    """A model directory's layer count: its config's, else (a VLM's ``text_config`` as the hub
    stores it often leaves the text model's defaults out) counted from its checkpoint's tensor
    names (headers only)."""
    config_file = Path(path) / "config.json"
    config = vlm.read_config(config_file)
    n = config_num_layers(config)
    if n is None and vlm.is_vlm(config):
        with contextlib.closing(vlm.view(CheckpointReader(path))) as reader:
            n = num_layers(reader) or None
    return n


def build_plan(recipe: Recipe, readers: dict[str, CheckpointReader], seed: int | None = None) -> Plan:
    spec = methods.get(recipe.merge_method)
    seed = recipe.random_seed if seed is None else seed
    base = recipe.base_model
    slices: list[tuple[list[_SliceSrc], Parameters | None, str | None]] = []
    if recipe.models:
        srcs = [_SliceSrc(m.model, 0, num_layers(readers[m.model]), m.parameters) for m in recipe.models]
        # as mergekit: a named base joins the inputs (linear averages it in; passthrough takes one model)
        if base and spec.inputs != 1 and base not in [s.model for s in srcs]:
            srcs.append(_SliceSrc(base, 0, num_layers(readers[base]), None))
        slices.append((srcs, None, base))
    else:
        for sl in recipe.slices:
            srcs = [_SliceSrc(s.model, s.layer_range[0], s.layer_range[1], s.parameters) for s in sl.sources]
            slices.append((srcs, sl.parameters, sl.base_model or base))
    for i, (srcs, _, sbase) in enumerate(slices):
        lengths = {s.end - s.start for s in srcs}
        if len(lengths) != 1 and recipe.models:  # a VLM's language model (text_config) among text models too
            listed = ", ".join(f"{s.model}: {s.end}" for s in srcs)
            raise FastmergeError(f"models: the models have different layer counts ({listed}); a merge of whole "
                                 "models needs one architecture (use slices to stack or cut layers)")
        if len(lengths) != 1:
            raise FastmergeError(f"slices[{i}]: all sources must span the same number of layers, got {sorted(lengths)}")
        for s in srcs:
            n = num_layers(readers[s.model])
            if s.end > n:
                raise FastmergeError(f"slices[{i}]: {s.model}: layer_range [{s.start}, {s.end}) beyond its {n} layers")
        if spec.needs_base and sbase not in [s.model for s in srcs]:
            raise FastmergeError(f"slices[{i}]: merge_method {spec.name!r} needs the base model {sbase!r} among the sources")
        if spec.base_of(sbase) is not None and sbase not in [s.model for s in srcs]:  # optional, as mergekit
            raise FastmergeError(f"slices[{i}]: the base model {sbase!r} of merge_method {spec.name!r} is not "
                                 "among the sources")

    frame = _frame(recipe, readers, slices)
    tok = recipe.tokenizer_source
    out_vocab = None
    unloadable = None
    if tok is not None:
        referenced = list(dict.fromkeys(
            ([recipe.base_model] if recipe.base_model else [])
            + [m.model for m in recipe.models or []] + [s.model for sl in recipe.slices or [] for s in sl.sources]))
        settings = recipe.tokenizer
        if tok not in ("union", "base") and not Path(tok).is_dir():
            raise FastmergeError(f"tokenizer_source: {tok}: directory not found")
        try:
            out_vocab = vocab.build(tok, recipe.base_model or referenced[0], referenced, readers,
                                    settings.tokens if settings else None,
                                    settings.pad_to_multiple_of if settings else None)
        except vocab.Unloadable as e:
            if tok == "union" or (settings and (settings.tokens or settings.pad_to_multiple_of)):
                raise
            unloadable = f"{e}; its files are copied as they are and the embedding rows are not rebuilt"
    builder = _Builder(recipe, readers, seed, out_vocab, frame)
    if unloadable:
        builder.warnings.append(unloadable)
    out: list[TensorPlan] = []
    first_ref = builder.reference(slices[0])
    last_ref = builder.reference(slices[-1])
    pre = [n for n in readers[first_ref].tensors if not _in_layers(readers[first_ref], n) and is_pre(n)]
    post = [n for n in readers[last_ref].tensors if not _in_layers(readers[last_ref], n) and not is_pre(n)]
    for name in pre:
        out.append(builder.tensor(name, {s.model: name for s in slices[0][0]}, slices[0], t=0.0))
    out_layer = 0
    layer_map: list[tuple[str, int]] = []  # output layer -> (reference model, its layer index)
    for sl in slices:
        srcs = sl[0]
        ref = builder.reference(sl)
        ref_src = next(s for s in srcs if s.model == ref)
        prefix, by_layer = _layers(readers[ref])
        prefixes = {s.model: _layers(readers[s.model])[0] for s in srcs}
        count = srcs[0].end - srcs[0].start
        for off in range(count):
            t = off / (count - 1) if count > 1 else 1.0
            for rest in by_layer.get(ref_src.start + off, []):
                names = {s.model: f"{prefixes[s.model]}.{s.start + off}.{rest}" for s in srcs}
                out.append(builder.tensor(f"{prefix}.{out_layer}.{rest}", names, sl, t=t))
            layer_map.append((ref, ref_src.start + off))
            out_layer += 1
    for name in post:
        out.append(builder.tensor(name, {s.model: name for s in slices[-1][0]}, slices[-1], t=0.0))

    config = _out_config(readers, first_ref, layer_map)
    tokenizer_model = first_ref if tok in (None, "base") else tok
    if out_vocab is not None:
        tokenizer_model = out_vocab.copy_from
        config["vocab_size"] = out_vocab.size
    zero_sum = builder.zero_sum_warning()
    if zero_sum:
        builder.warnings.append(zero_sum)
    view = readers[frame] if frame is not None else None
    if not isinstance(view, vlm.LMView):
        return Plan(out, config, first_ref, tokenizer_model, out_layer, builder.warnings, out_vocab)
    # a VLM output: the language model under the frame's on-disk names (keyed by the text names), the
    # frame's other tensors carried unchanged, its config around the merged language model's
    if recipe.models:  # the frame names the output's tensors: one another source has and it lacks is an error
        made = {t.key for t in out}
        for s in slices[0][0]:
            for name in readers[s.model].tensors:
                if name not in made and "rotary_emb.inv_freq" not in name:  # a buffer some checkpoints keep
                    raise FastmergeError(f"{view.path}: tensor {view.disk_name(name)} is missing (needed by the "
                                         f"recipe: {s.model} has {name})")
    for t in out:
        t.name = view.disk_name(t.key)
    # the other tensors: merged where every model is a VLM that has them (two LLaVAs), else the frame's
    group = slices[0] if recipe.models else None
    for name in view.extra:
        if group and all(name in getattr(readers[s.model], "extra", ()) for s in group[0]):
            out.append(builder.tensor(name, {s.model: name for s in group[0]}, group, t=0.0))
        else:
            out.append(builder.carried(frame, name))
    if tok is None:
        tokenizer_model = frame
    return Plan(out, vlm.frame_config(view, frame, config, out_vocab), frame, tokenizer_model, out_layer,
                builder.warnings, out_vocab, vlm.Frame(frame, view.path, view.naming))


def _frame(recipe: Recipe, readers: dict[str, CheckpointReader], slices) -> str | None:
    """The model whose checkpoint the output is (its class, config, non-language-model tensors):
    the recipe's ``frame_model``, else the first vision-language model among the sources (base
    first), else None (the usual reference: the base, or the first model)."""
    models = list(dict.fromkeys([*([recipe.base_model] if recipe.base_model else []),
                                 *(s.model for srcs, _, _ in slices for s in srcs),
                                 *(b for _, _, b in slices if b)]))
    vlms = [m for m in models if isinstance(readers.get(m), vlm.LMView)]
    if vlms:
        vlm.check_family([m for m in models if m in readers], readers)
    frame = recipe.frame_model
    if frame is not None and frame not in models:
        raise FastmergeError(f"frame_model: {frame} is not one of the recipe's models ({', '.join(models)})")
    return frame if frame is not None else (vlms[0] if vlms else None)


def _out_config(readers: dict[str, CheckpointReader], ref: str, layer_map: list[tuple[str, int]]) -> dict:
    """The reference config with the output layer count, and per-layer lists (e.g. Qwen2's
    ``layer_types``) re-indexed to follow the layers each output layer came from."""
    config = dict(readers[ref].config)
    n_in = config_num_layers(config)
    if not layer_map:
        return config
    for key, value in list(config.items()):
        if isinstance(value, list) and isinstance(n_in, int) and len(value) == n_in and key != "architectures":
            rebuilt = []
            for model, idx in layer_map:
                src = readers[model].config.get(key)
                rebuilt.append(src[idx] if isinstance(src, list) and idx < len(src) else value[min(idx, n_in - 1)])
            config[key] = rebuilt
    config[layer_count_key(config)] = len(layer_map)
    return config


def layer_group(name: str, num_layers: int, group_size: int) -> int:
    """The layer group of a tensor when the layers are cut into groups of ``group_size`` (the last
    may be shorter): layer i is in group i // group_size; the embeddings (before the layers) are in
    group 0 and the final norm / lm_head (after them) in the last group, as mergekit assigns them
    to the first and the last slice. The one rule of ``Genome`` and ``PSSpace``, so a PS recipe
    written with one slice per group rebuilds exactly what ``Merger`` scored."""
    size = max(1, group_size)
    groups = max(1, math.ceil(num_layers / size))
    m = LAYER_RE.match(name)
    if m:
        return min(int(m["idx"]) // size, groups - 1)
    return 0 if is_pre(name) else groups - 1


def is_pre(name: str) -> bool:
    """A tensor before the layers (the embeddings): it goes with the first slice and layer group."""
    return any(h in name for h in PRE_HINTS) and "lm_head" not in name


class _Builder:
    def __init__(self, recipe: Recipe, readers: dict[str, CheckpointReader], seed: int,
                 out_vocab: vocab.OutVocab | None = None, frame: str | None = None):
        self.recipe = recipe
        self.frame = frame
        self.out_vocab = out_vocab
        self.spec = methods.get(recipe.merge_method)
        self.readers = readers
        self.seed = seed
        self.warnings: list[str] = []
        self.zero_sum: list[tuple[str, str]] = []  # linear tensors whose weights sum to 0 with normalize

    def zero_sum_warning(self) -> str | None:
        """One line for every linear tensor whose weights sum to 0 under normalize. mergekit divides
        by the sum there (NaN/Inf out); fastmerge's rule (DESIGN.md section 3: 0 -> 1) writes the plain
        weighted sum. A warning, not an error: the evolutionary search can reach such weights (genes
        clipped to the range's ends), and the recipe it writes must rebuild the model it scored."""
        if not self.zero_sum:
            return None
        name, listed = self.zero_sum[0]
        more = f" and {len(self.zero_sum) - 1} more tensors" if len(self.zero_sum) > 1 else ""
        return (f"weights sum to 0 with normalize: true for tensor {name} ({listed}){more}; mergekit would divide "
                "by zero (NaN/Inf), fastmerge skips the division there and writes the plain weighted sum; "
                "set normalize: false to say so, or change the weights")

    def reference(self, sl) -> str:
        srcs, _, sbase = sl
        models = [s.model for s in srcs]
        if self.frame in models:  # the output's frame names and shapes the tensors (a VLM's vocabulary)
            return self.frame
        return sbase if sbase in models else models[0]

    def carried(self, model: str, name: str) -> TensorPlan:
        """A tensor copied from ``model`` as it is (cast to the recipe's dtype, if it names one)."""
        meta = self.readers[model].meta(name)
        dtype_name = self.recipe.out_dtype or self.recipe.dtype
        code = dtypes.from_name(DTYPES[dtype_name]) if dtype_name and dtypes.is_float(meta.code) else meta.code
        plan = TensorPlan(name, meta.shape, code, "copy", [Source(model, name)], carried=True)
        plan.in_bytes = meta.nbytes
        return plan

    def _meta(self, model: str, name: str):
        reader = self.readers[model]
        meta = reader.tensors.get(name)
        if meta is None and isinstance(reader, vlm.LMView):  # a VLM's vision side, merged with another VLM's
            meta = reader.extra.get(name)
        if meta is None and name.endswith("lm_head.weight"):
            # tied embeddings: the input embedding serves as the output projection
            for emb in TIED_EMBEDDINGS:
                tied = name.replace("lm_head.weight", emb)
                if tied in reader.tensors:
                    return reader.tensors[tied], tied
        if meta is None:
            raise FastmergeError(f"{reader.path}: tensor {name} is missing (needed by the recipe)")
        return meta, name

    def tensor(self, out_name: str, names: dict[str, str], sl, t: float) -> TensorPlan:
        srcs, slice_params, sbase = sl
        ref = self.reference(sl)
        metas = {}
        for s in srcs:
            metas[s.model] = self._meta(s.model, names[s.model])
        ref_meta = metas[ref][0]
        shape = ref_meta.shape
        rows = None
        rebuilt = self.out_vocab is not None and any(h in out_name for h in VOCAB_HINTS) and len(shape) >= 1
        vocab_base = sbase  # the slice's base: its rows are a missing token's default (as mergekit)
        if rebuilt:
            for s in srcs:
                meta, name = metas[s.model]
                if len(meta.shape) != len(shape) or meta.shape[1:] != shape[1:]:
                    raise FastmergeError(f"{meta.file}: tensor {name} has shape {list(meta.shape)}, but {ref} has "
                                         f"{list(shape)} (only the vocabulary dimension may differ)")
            shape = (self.out_vocab.size, *shape[1:])
        for s in srcs if not rebuilt else []:
            meta, name = metas[s.model]
            if meta.shape != shape:
                is_vocab = any(h in name for h in VOCAB_HINTS)
                if is_vocab and len(meta.shape) == len(shape) and meta.shape[1:] == shape[1:]:
                    rows = min(rows or shape[0], meta.shape[0])
                else:
                    raise FastmergeError(
                        f"{meta.file}: tensor {name} has shape {list(meta.shape)}, but {ref} has {list(shape)}"
                    )
        if rows is not None:
            self.warnings.append(f"{out_name}: vocabulary sizes differ; merging the first {rows} rows, "
                                 f"rows {rows}..{shape[0] - 1} copied from {ref}")
        dtype_name = self.recipe.out_dtype or self.recipe.dtype
        dtype = dtypes.from_name(DTYPES[dtype_name]) if dtype_name else ref_meta.code
        if not dtypes.is_float(ref_meta.code):
            if rebuilt:
                raise FastmergeError(f"{out_name}: a vocabulary tensor that is not floating point cannot be rebuilt "
                                     "for the output tokenizer")
            plan = TensorPlan(out_name, shape, ref_meta.code, "copy", [Source(ref, metas[ref][1])])
            plan.in_bytes = ref_meta.nbytes
            return plan

        spec = self.spec
        shared_scopes = [slice_params, self.recipe.parameters]
        # a required (or a named optional) base stands apart (task vectors against it); otherwise
        # every source is an input
        sbase = spec.base_of(sbase)
        inputs = srcs if sbase is None else [s for s in srcs if s.model != sbase]
        params: dict[str, Any] = {}
        for p in spec.params:
            if p.per_model:
                params[p.name] = tuple(
                    self._value(p, resolve(p.name, [s.parameters, *shared_scopes], metas[s.model][1], t, p.default, p.read),
                                out_name, s.model, metas[s.model][1])
                    for s in inputs)
            else:
                params[p.name] = self._value(p, resolve(p.name, shared_scopes, out_name, t, p.default, p.read), out_name)
        src = {s.model: Source(s.model, metas[s.model][1]) for s in srcs}
        base_src = src[sbase] if sbase is not None else None
        if spec.fused is not None:
            if not inputs:  # only the base: its own tensor
                plan = TensorPlan(out_name, shape, dtype, "copy", [base_src])
            else:
                plan = TensorPlan(out_name, shape, dtype, "fused", [src[s.model] for s in inputs], base=base_src,
                                  fused=self._fused(params, inputs, out_name), method=spec.name)
        elif spec.copy_if is not None and spec.copy_if(params):
            plan = TensorPlan(out_name, shape, dtype, "copy", [src[s.model] for s in inputs])
        else:
            plan = TensorPlan(out_name, shape, dtype, "torch", [src[s.model] for s in inputs], base=base_src,
                              position=t, method=spec.name, params=params, seed=self.seed)
        plan.rows = rows
        if rebuilt:
            plan.vocab = vocab.rows_for(self.out_vocab, [x.model for x in plan.sources], vocab_base, out_name)
        plan.in_bytes = sum(metas[s.model][0].nbytes for s in srcs)
        return plan

    def _value(self, p: methods.Param, value: Any, tensor: str, model: str | None = None,
               model_tensor: str | None = None) -> Any:
        """A resolved value read as its declared kind, checked against its declared bounds."""
        if value is REQUIRED:
            if model is not None:
                raise FastmergeError(f"missing parameter {p.name!r} for model {model} (tensor {model_tensor})")
            raise FastmergeError(f"missing parameter {p.name!r} for tensor {tensor}")
        if value is None and p.optional:
            return None
        if p.kind == "bool":
            return bool(value)
        if p.kind == "int":
            return int(value)
        if p.kind == "rescale":
            return parse_rescale(value)
        f = as_float(p.name, value, tensor)
        if p.low is not None and f < p.low:
            who = f" for model {model}" if model is not None else ""
            raise FastmergeError(f"parameter {p.name}{who} (tensor {tensor}) must be >= {p.low:g}, got {f}")
        if p.high is not None and f > p.high and p.clip_high:
            f = p.high
        return f

    def _fused(self, params: dict[str, Any], inputs: list[_SliceSrc], out_name: str) -> FusedOptions:
        """The fused op's options from a family member's resolved parameters."""
        fused = self.spec.fused
        weights = params["weight"]
        normalize = params.get("normalize", False)
        if not self.spec.needs_base and normalize and abs(sum(weights)) < 1e-8:  # the fused loop's own test
            self.zero_sum.append((out_name, ", ".join(f"{s.model}: {w:g}" for s, w in zip(inputs, weights))))
        return FusedOptions(
            weights=weights,
            densities=params.get("density", ()),
            sparsify=fused.sparsify,
            consensus=fused.consensus,
            rescale=params.get("rescale", "none"),
            normalize=normalize,
            lambda_=params.get("lambda", 1.0),
            seed=self.seed,
        )
