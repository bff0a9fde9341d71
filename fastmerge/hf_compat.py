"""Where transformers' API moved between the releases fastmerge supports, the name to use now.

transformers 5.24 renamed the KV-cache argument of models, decoder layers and mask builders from
``past_key_values`` to ``cache`` (the old name warns until its removal), and model outputs carry
the cache as ``.cache``. Code that hands a cache to a transformers callable asks here which name
that callable takes, by its signature, so one code path serves every supported release.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

#: The field a causal-LM output holds its KV cache in (``cache`` from 5.24, ``past_key_values`` before).
CACHE_OUTPUT_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} \
    else "past_key_values"


@functools.cache
def cache_kwarg(fn: Callable) -> str:
    """The keyword ``fn`` takes its KV cache as: ``cache`` where its signature names it, else
    ``past_key_values`` (a callable that takes only ``**kwargs`` gets the old name, which every
    supported release still accepts)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@functools.cache
def takes_logits_to_keep(fn: Callable) -> bool:
    """Whether ``fn`` (a model's forward) names ``logits_to_keep``: then greedy decoding asks for the
    last position's logits only, not the whole prompt's (a vocabulary-wide matmul per prompt token)."""
    try:
        return "logits_to_keep" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def output_cache(out: Any) -> Any:
    """The KV cache a forward returned, whichever name the model's release gives it."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def no_init_weights() -> Any:
    """transformers' context that skips weight initialization (weights are loaded or merged next):
    ``transformers.initialization`` from 5.x, ``modeling_utils`` in 4.x."""
    try:
        from transformers.initialization import no_init_weights as ctx
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights as ctx
    return ctx()
