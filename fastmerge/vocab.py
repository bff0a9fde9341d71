"""Output vocabularies, as mergekit builds them (``tokenizer_source`` / ``tokenizer:``).

When a recipe names a tokenizer source, the output tokenizer is that model's (``<model>``), the
base model's (``base``) or the union of every model's vocabulary (``union``: the base tokenizer
plus each other model's tokens, in model order and then id order: deterministic, where mergekit
follows a set and a hash map), plus the ``tokens:`` keys. Every embedding-like tensor
(``VOCAB_HINTS``) of every source is then rebuilt for that vocabulary before the merge: row ``i``
of a model's tensor is its own row for the token of output id ``i`` (matched by token string),
and a token the model lacks (or a ``force``d one) takes a default row (mergekit's rules):

- a ``tokens:`` entry's source: a model's row for that token, ``{kind: model_token, model,
  token | token_id}``: a given row of a model, ``{kind: zero}``: zeros;
- else a token only one model has: that model's row; no model: zeros; the base model has it:
  the base model's row; otherwise the mean of the rows of the models that have it;

and ``pad_to_multiple_of`` pads the rows with the mean of that model's rebuilt rows. The merge
method then runs on the rebuilt tensors. This module knows the tokenizers (transformers) only
at plan time; the executor sees index arrays (``VocabRows``).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import FastmergeError

if TYPE_CHECKING:
    import torch

    from .io import CheckpointReader


class Unloadable(FastmergeError):
    """A tokenizer that transformers cannot load (the plan then copies the source's files as they are)."""


@dataclass(frozen=True)
class OutVocab:
    """The output tokenizer and, per referenced model, output token id -> its row (-1: none)."""

    tokenizer: Any  # a transformers tokenizer (saved with the output)
    copy_from: str | None  # the tokenizer is this directory's, unchanged: copy its files instead
    size: int  # rows of every vocabulary tensor (len(tokenizer), padded)
    vocab: dict[str, int]
    perms: dict[str, np.ndarray]
    original: dict[str, dict[str, int]]  # model -> its own token -> id
    tokens: dict[str, dict]  # the recipe's ``tokens:`` (token -> {source, force})


@dataclass(frozen=True)
class VocabRows:
    """How to rebuild one tensor's sources (``TensorPlan.sources`` order) for the output vocabulary."""

    size: int
    n: int  # tokens; rows n..size-1 are padding
    perms: tuple[np.ndarray, ...]  # per source: output id -> its row, -1 where it lacks the token
    forced: np.ndarray  # output ids whose own rows are not used (``force: true``)
    #: output id -> ("mean", source indexes) | ("zero",) | ("row", source index, row)
    defaults: tuple[tuple[int, tuple], ...]


def _load(path: str):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path, use_fast=True)


def _config_vocab(reader: CheckpointReader | None, vocab: dict[str, int]) -> int:
    n = reader.config.get("vocab_size") if reader is not None else None
    return n if isinstance(n, int) else len(vocab)


def build(source: str, base: str, models: list[str], readers: dict[str, CheckpointReader],
          tokens: dict[str, dict] | None, pad_to_multiple_of: int | None) -> OutVocab:
    """The output vocabulary of a recipe: ``source`` is ``union``, ``base`` or a model directory;
    ``base`` the base model (or the first model), ``models`` every model the recipe names."""
    toks: dict[str, Any] = {}
    for m in [base, *[m for m in models if m != base]]:
        try:
            toks[m] = _load(m)
        except Exception as e:  # noqa: BLE001 - any failure to load: mergekit assumes the base's
            if m == base:
                raise Unloadable(f"{m}: cannot load its tokenizer: {str(e).splitlines()[0]}") from None
    base_tok = toks[base]
    base_vocab = base_tok.get_vocab()
    if any(i >= _config_vocab(readers.get(base), base_vocab) for i in base_vocab.values()):
        raise FastmergeError(f"{base}: its tokenizer has more tokens than config.json's vocab_size; "
                             "stripping unused tokens is not supported")
    copy_from = None
    if source == "union":
        out = _union(base_tok, toks, readers)
    elif source == "base":
        out, copy_from = base_tok, base
    else:
        if not Path(source).is_dir():
            raise FastmergeError(f"tokenizer_source: {source}: directory not found")
        try:
            out, copy_from = _load(source), source
        except Exception as e:  # noqa: BLE001
            raise Unloadable(f"tokenizer_source: {source}: cannot load its tokenizer: {str(e).splitlines()[0]}") from None
    existing = set(out.get_vocab())
    for tok in tokens or {}:
        if tok not in existing:
            if out is base_tok or copy_from is not None:
                out = _clone(out)
                copy_from = None
            out.add_tokens(tok)
            existing.add(tok)
    vocab = out.get_vocab()
    n = len(vocab)
    size = n
    if pad_to_multiple_of and n % pad_to_multiple_of:
        size = (n // pad_to_multiple_of + 1) * pad_to_multiple_of
    perms: dict[str, np.ndarray] = {}
    for m in models:
        own = (toks.get(m) or base_tok).get_vocab()
        limit = _config_vocab(readers.get(m), own)
        p = np.full(n, -1, dtype=np.int64)
        for tok, i in vocab.items():
            j = own.get(tok)
            if j is not None and j < limit:
                p[i] = j
        perms[m] = p
    return OutVocab(out, copy_from, size, vocab, perms, {m: t.get_vocab() for m, t in toks.items()},
                    dict(tokens or {}))


def _clone(tok):
    import transformers

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return transformers.AutoTokenizer.from_pretrained(d, use_fast=True)


def _union(base_tok, toks: dict[str, Any], readers: dict[str, CheckpointReader]):
    """The base tokenizer plus every other model's tokens (regular tokens in model order, then the
    added tokens with the settings of their first model)."""
    out_vocab: dict[str, None] = {}
    added: dict[str, Any] = {}
    for m, tok in toks.items():
        own = tok.get_vocab()
        limit = _config_vocab(readers.get(m), own)
        decoder = tok.added_tokens_decoder
        added_names = {info.content for info in decoder.values()}
        for t, i in sorted(own.items(), key=lambda kv: kv[1]):  # id order (mergekit: the hash map's, any)
            if i < limit and t not in added_names:
                out_vocab.setdefault(t)
        for i, info in sorted(decoder.items()):
            if i < limit:
                added.setdefault(info.content, info)
    res = _clone(base_tok)
    base_vocab = base_tok.get_vocab()
    for t in out_vocab:
        if t not in added and t not in base_vocab:
            res.add_tokens(t)
    for info in added.values():
        res.add_tokens(info)
    return res


def rows_for(ov: OutVocab, models: list[str], base: str | None, tensor: str) -> VocabRows:
    """The rebuild of one tensor whose sources are ``models`` (in order); ``base`` the slice's base."""
    perms = [ov.perms[m] for m in models]
    n = len(ov.vocab)
    have = np.stack([p >= 0 for p in perms])  # (models, n)
    forced = []
    defaults = []
    for tok, cfg in ov.tokens.items():
        tid = ov.vocab[tok]
        cfg = cfg or {}
        if cfg.get("force"):
            forced.append(tid)
        src = cfg.get("source")
        if src is None:  # as mergekit: the rules below do not apply to a listed token
            if cfg.get("force") or not have[:, tid].all():
                raise FastmergeError(f"tokenizer.tokens: {tok!r} needs a source (some model lacks it, or force)")
            continue
        if isinstance(src, dict) and src.get("kind") == "zero":
            defaults.append((tid, ("zero",)))
            continue
        model = src.get("model") if isinstance(src, dict) else src
        if model not in models:
            raise FastmergeError(f"tokenizer.tokens: {tok!r} needs tensor {tensor} of model {model}, "
                                 "which is not a source of it")
        k = models.index(model)
        if isinstance(src, dict):
            row = src.get("token_id")
            if row is None:
                name = src.get("token")
                if name not in ov.original.get(model, {}):
                    raise FastmergeError(f"tokenizer.tokens: {tok!r}: token {name!r} not found in model {model}")
                row = ov.original[model][name]
            row = int(row)
        else:
            row = int(perms[k][tid])
            if row < 0:
                raise FastmergeError(f"tokenizer.tokens: {tok!r} not found in model {model}")
        defaults.append((tid, ("row", k, row)))
    listed = {ov.vocab[t] for t in ov.tokens}
    count = have.sum(axis=0)
    missing = np.nonzero(count < len(models))[0]
    b = models.index(base) if base in models else None
    for tid in missing.tolist():
        if tid in listed:
            continue
        c = int(count[tid])
        if c == 0:
            defaults.append((tid, ("zero",)))
        elif c == 1:
            k = int(np.argmax(have[:, tid]))
            defaults.append((tid, ("row", k, int(perms[k][tid]))))
        elif b is not None and have[b, tid]:
            defaults.append((tid, ("row", b, int(perms[b][tid]))))
        else:
            defaults.append((tid, ("mean", tuple(int(k) for k in np.nonzero(have[:, tid])[0]))))
    return VocabRows(ov.size, n, tuple(perms), np.array(sorted(set(forced)), dtype=np.int64), tuple(defaults))


def rebuild(vr: VocabRows, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each source tensor with its rows for the output vocabulary (dtype: the sources' promoted)."""
    import torch

    dtype = tensors[0].dtype
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    shape = tuple(tensors[0].shape[1:])
    for t in tensors:
        if tuple(t.shape[1:]) != shape:
            raise FastmergeError(f"vocabulary tensors differ beyond the first dimension: {list(t.shape)} vs {list(shape)}")
    defaults: dict[int, torch.Tensor] = {}
    for tid, how in vr.defaults:
        if how[0] == "zero":
            defaults[tid] = torch.zeros(shape, dtype=dtype)
        elif how[0] == "row":
            _, k, row = how
            if not 0 <= row < tensors[k].shape[0]:
                raise FastmergeError(f"token id {row} is out of range for a tensor of {tensors[k].shape[0]} rows")
            defaults[tid] = tensors[k][row].to(dtype)
        else:
            e = torch.zeros(shape, dtype=dtype)
            for k in how[1]:
                e = e + tensors[k][int(vr.perms[k][tid])].to(dtype)
            defaults[tid] = e / len(how[1])
    forced = torch.from_numpy(vr.forced)
    out = []
    for t, p in zip(tensors, vr.perms):
        new = torch.zeros((vr.size, *shape), dtype=dtype)
        perm = torch.from_numpy(p)
        own = perm >= 0
        if len(forced):
            own[forced] = False
        ids = torch.nonzero(own).flatten()
        new[ids] = t[perm[ids]].to(dtype)
        for tid, e in defaults.items():
            if not own[tid]:
                new[tid] = e
        if vr.size > vr.n:
            new[vr.n:] = new[: vr.n].mean(dim=0)
        out.append(new)
    return out


def is_named_template(value: str) -> bool:
    """mergekit's rule: a short single line without ``{`` names a template (``chatml``, ``auto``, ...)."""
    return len(value) < 256 and "\n" not in value and "{" not in value


def chat_template_text(value: str, models: list[str]) -> str:
    """The Jinja text of a recipe's ``chat_template``: the text itself; ``auto``: the template most of
    the models' tokenizers carry; a name: mergekit's template of that name (from the installed
    mergekit package, which ships them)."""
    if not is_named_template(value):
        return value
    if value == "auto":
        from collections import Counter

        found = []
        for m in models:
            try:
                t = _load(m).chat_template
            except Exception:  # noqa: BLE001 - as mergekit: a model without a loadable tokenizer is skipped
                continue
            if t:
                found.append(t)
        if not found:
            raise FastmergeError("chat_template: auto: none of the models' tokenizers has a chat template")
        return Counter(found).most_common(1)[0][0]
    try:
        import importlib.resources

        from mergekit._data import chat_templates
    except ImportError:
        raise FastmergeError(f"chat_template: {value!r}: named templates are read from the installed mergekit "
                             "package, which is not installed; give the Jinja template text") from None
    f = importlib.resources.files(chat_templates).joinpath(value + ".jinja")
    if not f.is_file():
        names = sorted(x.name[:-6] for x in importlib.resources.files(chat_templates).iterdir()
                       if x.name.endswith(".jinja"))
        raise FastmergeError(f"chat_template: unknown template {value!r} (known: {', '.join(names)}, auto)")
    return f.read_text(encoding="utf-8")
