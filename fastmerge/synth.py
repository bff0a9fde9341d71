"""Synthetic checkpoints: tiny (or bench-sized) random models of real architectures, saved as
sharded safetensors, so tests, benchmarks and the default demo need no hub.

A "family" is a base plus fine-tunes (base + small random deltas of a chosen sparsity), which is
the situation task-arithmetic merges are made for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

ARCHS = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "gpt2": "GPT2Config",  # transformer.h.N, n_layer, Conv1D weights, tied lm_head (tie_embeddings ignored)
}


@dataclass
class ModelSpec:
    arch: str = "llama"
    hidden: int = 64
    layers: int = 2
    intermediate: int = 0  # 0: 2.75 x hidden, rounded to 8
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 256
    tie_embeddings: bool = False
    dtype: torch.dtype = torch.float32

    def config(self):
        import transformers

        cls = getattr(transformers, ARCHS[self.arch])
        inter = self.intermediate or (int(self.hidden * 2.75) + 7) // 8 * 8
        if self.arch == "gpt2":
            return cls(n_embd=self.hidden, n_layer=self.layers, n_head=self.heads, n_inner=self.intermediate or None,
                       vocab_size=self.vocab, n_positions=512, torch_dtype=str(self.dtype).replace("torch.", ""))
        return cls(
            hidden_size=self.hidden,
            intermediate_size=inter,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            max_position_embeddings=512,
            tie_word_embeddings=self.tie_embeddings,
            torch_dtype=str(self.dtype).replace("torch.", ""),
        )


def _save(model, path: Path, shard_size: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, max_shard_size=shard_size)
    return path


def make_family(
    root: str | Path,
    spec: ModelSpec | None = None,
    finetunes: int = 2,
    seed: int = 0,
    delta_scale: float = 0.02,
    shard_size: str = "100KB",
    vocab_overrides: dict[int, int] | None = None,
) -> list[Path]:
    """Write ``base`` and ``ft0..ft{n-1}`` under root; returns their paths (base first).

    ``vocab_overrides`` maps a fine-tune index to a different vocabulary size (rows appended or
    dropped), for the vocab-mismatch path.
    """
    from transformers import AutoModelForCausalLM

    spec = spec or ModelSpec()
    root = Path(root)
    torch.manual_seed(seed)
    config = spec.config()
    model = AutoModelForCausalLM.from_config(config, torch_dtype=spec.dtype)
    with torch.no_grad():
        for p in model.parameters():  # HF init leaves norms at 1: give every tensor some signal
            p.add_(torch.randn_like(p) * 0.02)
    paths = [_save(model, root / "base", shard_size)]
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(finetunes):
        state = {}
        for k, v in base_state.items():
            noise = torch.randn(v.shape, generator=gen) * delta_scale
            state[k] = (v.float() + noise).to(v.dtype)
        cfg = spec.config()
        vocab = (vocab_overrides or {}).get(i)
        if vocab is not None:
            cfg.vocab_size = vocab
        ft = AutoModelForCausalLM.from_config(cfg, torch_dtype=spec.dtype)
        own = ft.state_dict()
        for k in own:
            src = state[k]
            if own[k].shape != src.shape:  # vocab override: keep common rows, random extra rows
                rows = min(own[k].shape[0], src.shape[0])
                fresh = torch.randn(own[k].shape, generator=gen).to(src.dtype) * 0.02
                fresh[:rows] = src[:rows]
                src = fresh
            state[k] = src
        ft.load_state_dict(state, strict=False)
        paths.append(_save(ft, root / f"ft{i}", shard_size))
    return paths


def word_tokenizer(words):
    """A word-level fast tokenizer over ``words`` (whitespace-split; ids 0-3 are [PAD] [BOS] [EOS]
    [UNK], then the words in order, each once; a [BOS] is prepended): tokens that test models can
    be asked about by name, with no hub and no training."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="[PAD]", eos_token="[EOS]", bos_token="[BOS]",
                                   unk_token="[UNK]")
