"""The one interface an evaluator scores a candidate through (DESIGN 8).

An evaluator needs two things from a model: greedy continuations of prompts, and the log-likelihood
of a continuation given a context (with whether it is the greedy one, as lm-eval's multiple choice
asks). A backend owns the engine that answers them and the live model it holds: ``hf`` runs our own
batched loop over any module honouring the HF forward contract (a ``Merger``'s module, the DFS
``PathModel``); ``vllm`` runs an in-process ``vllm.LLM`` whose weights are replaced in place for every
candidate. Token ids are the common currency: prompts are tokenized once, here, with the HF tokenizer,
so every backend sees the same ids and its outputs can be compared token for token.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

Progress = Callable[[int, int], None]
#: (context ids, continuation ids): lm-eval's loglikelihood request, tokenized
LoglikRequest = tuple[list[int], list[int]]


def first_stop(text: str, stop: Sequence[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else -1


def eos_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """The tokenizer's eos plus the model's generation_config eos (an int or a list: chat models end
    a turn with a token other than the tokenizer's eos, e.g. Llama 3's <|eot_id|>)."""
    ids: set[int] = set()
    for c in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, (list, tuple)):
            ids.update(int(x) for x in c)
    return ids


class Backend(ABC):
    """What a candidate is scored on. Subclasses implement :meth:`generate_ids`, :meth:`loglikelihood`
    and :meth:`load_weights`; text in, text out (:meth:`generate`) is shared, so stop strings and
    decoding are the same whatever the engine."""

    #: "hf" or "vllm": logged with the metrics, and how configs name it
    name: str = ""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    # -- what an engine provides

    @abstractmethod
    def generate_ids(self, rows: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str] = (),
                     batch_size: int = 16, progress: Progress | None = None) -> list[list[int]]:
        """Greedy continuation ids of each row (eos excluded), in row order. A row may stop once its
        decoded text holds a ``stop`` string; ids after the stop may or may not be there (text is cut
        by :meth:`generate`)."""

    @abstractmethod
    def loglikelihood(self, requests: Sequence[LoglikRequest], batch_size: int = 16,
                      progress: Progress | None = None) -> list[tuple[float, bool]]:
        """Per request: (sum of log p(continuation token | everything before it), whether every
        continuation token is the argmax), as lm-eval's ``loglikelihood`` returns."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the live model's weights with these (HF checkpoint names), in place, no disk."""

    def weight_targets(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Tensors inside the engine, one per name of ``params`` (same shape and dtype), that a merge
        can write straight into, so that an update costs no copy (then :meth:`weights_written`);
        None where the engine has none, and :meth:`load_weights` copies instead."""
        return None

    def weights_written(self) -> None:
        """The tensors :meth:`weight_targets` returned hold new weights: make the engine use them."""
        raise NotImplementedError(f"the {self.name} backend has no weight targets")

    def close(self) -> None:  # noqa: B027 -- a no-op where the caller owns the model
        """Free the engine."""

    # -- shared

    @property
    def eos(self) -> set[int]:
        return eos_ids(self.tokenizer, self.generation_config)

    @property
    def generation_config(self) -> Any:
        return None

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Prompt ids, with the tokenizer's special tokens (a bos where the model has one)."""
        if not prompts:
            return []
        return [list(r) for r in self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 128, stop: Sequence[str] | None = None,
                 batch_size: int = 16, progress: Progress | None = None) -> list[str]:
        """Greedy continuations of ``prompts`` as text (special tokens skipped), each cut before its
        first ``stop`` string, in prompt order."""
        stop = list(stop or ())
        ids = self.generate_ids(self.encode(prompts), max_new_tokens, stop, batch_size, progress)
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in ids]
        if stop:
            texts = [t[:k] if (k := first_stop(t, stop)) >= 0 else t for t in texts]
        return texts

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_backend(model: Any, tokenizer: Any) -> Backend:
    """``model`` itself when it is a backend, else the ``hf`` backend over it: an evaluator called as
    ``evaluator(model, tokenizer)`` scores a plain module exactly as before backends existed."""
    if isinstance(model, Backend):
        return model
    from .hf import HFBackend

    return HFBackend(model, tokenizer)
