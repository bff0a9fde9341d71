"""The ``hf`` backend: our own batched greedy loop and log-likelihoods over a live torch module.

Our own loop rather than ``model.generate`` so that anything honouring the HF causal-LM forward
contract -- ``model(input_ids=, attention_mask=, position_ids=, cache=, use_cache=True)`` returning
``.logits`` and ``.cache`` (``past_key_values`` in both places before transformers 5.24, and for any
model whose ``forward`` names no ``cache`` argument) -- can be scored, e.g. the DFS executor, which is a
plain ``nn.Module``. The module is the caller's (a ``Merger`` writes candidates into it in place), so
there is nothing to upload between candidates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..errors import FastmergeError
from .base import Backend, LoglikRequest, Progress, first_stop


def pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def left_pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of ``rows`` padded on the left (generation appends on the right,
    so every row's last real token must sit in the last column)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions that start at 0 on each row's first real token (pads get 0, as HF does)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def batches_by_length(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (little padding, and an
    out-of-memory shows up on the first batch rather than the last)."""
    if batch_size < 1:
        raise FastmergeError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class HFBackend(Backend):
    """Scores the caller's live module (a HF causal LM, a ``Merger``'s module, a DFS ``PathModel``)."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.model = model

    @property
    def generation_config(self) -> Any:
        return getattr(self.model, "generation_config", None)

    @torch.inference_mode()
    def generate_ids(self, rows: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str] = (),
                     batch_size: int = 16, progress: Progress | None = None) -> list[list[int]]:
        eos = self.eos
        out: list[list[int]] = [[] for _ in rows]
        done = 0
        for batch in batches_by_length([len(r) for r in rows], batch_size):
            for i, ids in zip(batch, self._generate_batch([rows[i] for i in batch], max_new_tokens, eos, stop)):
                out[i] = ids
            done += len(batch)
            if progress is not None:
                progress(done, len(rows))
        return out

    def _generate_batch(self, rows: list[Sequence[int]], max_new_tokens: int, eos: set[int],
                        stop: Sequence[str]) -> list[list[int]]:
        """Greedy continuation of one batch; each result ends before its eos (exclusive)."""
        from transformers import DynamicCache

        from ..hf_compat import cache_kwarg, output_cache, takes_logits_to_keep

        model, tokenizer = self.model, self.tokenizer
        ids, mask = left_pad(rows, pad_id(tokenizer), model_device(model))
        pos = positions(mask)
        past: Any = DynamicCache()
        forward = getattr(type(model), "forward", type(model).__call__)
        cache_kw = cache_kwarg(forward)
        last_only = {"logits_to_keep": 1} if takes_logits_to_keep(forward) else {}
        out: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for _ in range(max_new_tokens):
            res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: past},
                        **last_only)
            past = output_cache(res)
            nxt = res.logits[:, -1, :].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t in eos:
                    done[i] = True
                    continue
                out[i].append(t)
                if stop and first_stop(tokenizer.decode(out[i], skip_special_tokens=True), stop) >= 0:
                    done[i] = True
            if all(done):
                break
            ids = nxt[:, None]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            pos = pos[:, -1:] + 1
        return out

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[LoglikRequest], batch_size: int = 16,
                      progress: Progress | None = None) -> list[tuple[float, bool]]:
        rows = [(list(ctx) + list(cont), len(ctx)) for ctx, cont in requests]
        for ctx, cont in requests:
            if not ctx or not cont:
                raise FastmergeError("a log-likelihood request needs a non-empty context and continuation "
                                     f"(got {len(ctx)} and {len(cont)} tokens)")
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        done = 0
        for batch in batches_by_length([len(ids) for ids, _ in rows], batch_size):
            for i, res in zip(batch, self._loglik_batch([rows[i] for i in batch])):
                out[i] = res
            done += len(batch)
            if progress is not None:
                progress(done, len(rows))
        return out

    def _loglik_batch(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """Right-padded forward of one batch; per row the continuation's log-prob sum and greediness."""
        device = model_device(self.model)
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad_id(self.tokenizer), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (r, _) in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = ids[:, 1:]
        tok_logp = logp.gather(-1, target[..., None])[..., 0]
        greedy = logp.argmax(-1) == target
        out = []
        for i, (r, start) in enumerate(rows):
            sl = slice(start - 1, len(r) - 1)  # logits at position p predict token p + 1
            out.append((float(tok_logp[i, sl].sum()), bool(greedy[i, sl].all())))
        return out

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        for name, t in weights:
            if name not in params:
                raise FastmergeError(f"load_weights: the live model has no tensor {name!r}")
            params[name].copy_(t)
