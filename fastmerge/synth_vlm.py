"""Tiny LLaVA-style vision-language models for tests and the VLM demo: a tiny CLIP vision tower, a
projector and a tiny Mistral language model, saved with a processor (CLIP image processor, a
word-level tokenizer with an ``<image>`` token, a chat template), next to text-only fine-tunes of
the same Mistral base, as EvoVLM-JP's sources are (LLaVA-1.6-Mistral and Shisa Gamma, both
fine-tunes of Mistral-7B-v0.1). No hub, no training.

A LLaVA checkpoint's tensors are named one of three ways on disk (``fastmerge.vlm``): ``legacy``
(``language_model.model.layers.N...``, ``language_model.lm_head``, ``vision_tower...``: what the hub
holds), ``v5`` (transformers 5's module names) or ``mixed`` (what transformers 5.4's
``save_pretrained`` writes). Whatever the installed transformers writes, the saved keys are
rewritten to the ``naming`` asked for, so a test sees the same layout on every release.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .synth import ModelSpec, make_family, word_tokenizer

IMAGE_TOKEN = "<image>"
#: the word vocabulary of the tiny models: chat roles, the image token, some words to answer with
WORDS = [IMAGE_TOKEN, "USER:", "ASSISTANT:", "user", "assistant"] + [f"w{i}" for i in range(40)]
#: the chat template of the tiny VLMs (LLaVA-1.5 style: "USER: <image> question ASSISTANT:")
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def tokenizer(words=None):
    """The tiny models' tokenizer: ``word_tokenizer`` with ``<image>`` marked special."""
    tok = word_tokenizer(words or WORDS)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def vision_config(image_size: int = 32, patch_size: int = 8, hidden: int = 32, layers: int = 2):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                            projection_dim=hidden)


def processor(tok, image_size: int = 32, patch_size: int = 8):
    """A LLaVA processor for the tiny vision tower (one image token per patch, CLS dropped)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size, num_additional_image_tokens=1,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE)


def rename_to(path: str | Path, naming: str) -> None:
    """Rewrite a saved LLaVA checkpoint's tensor names, in place, from the naming it has to
    ``naming`` (``legacy``, ``v5`` or ``mixed``)."""
    from safetensors.torch import load_file, save_file

    from .vlm import naming_of, rename

    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    states = {f: load_file(path / f) for f in files}
    src = naming_of([k for state in states.values() for k in state], path)
    if src == naming:
        return
    weight_map = {}
    for f, state in states.items():
        state = {rename(k, src, naming): v for k, v in state.items()}
        save_file(state, path / f, metadata={"format": "pt"})
        weight_map.update({k: f for k in state})
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = dict(sorted(weight_map.items()))
        index.write_text(json.dumps(data, indent=2))


def make_vlm_family(
    root: str | Path,
    spec: ModelSpec | None = None,
    text_finetunes: int = 1,
    seed: int = 0,
    delta_scale: float = 0.02,
    naming: str = "legacy",
    shard_size: str = "100KB",
    image_size: int = 32,
    patch_size: int = 8,
) -> dict[str, Path | list[Path]]:
    """Write ``base`` (a text Mistral), ``vlm`` (a LLaVA whose language model is a fine-tune of base)
    and ``text0..`` (text fine-tunes of base) under root, each with the same tokenizer; returns
    ``{"base": path, "vlm": path, "text": [paths]}``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if naming not in ("legacy", "v5", "mixed"):
        raise ValueError(f"naming must be 'legacy', 'v5' or 'mixed', not {naming!r}")
    root = Path(root)
    tok = tokenizer()
    spec = spec or ModelSpec(arch="mistral", vocab=len(tok))
    if spec.vocab < len(tok):
        raise ValueError(f"vocab {spec.vocab} is smaller than the tokenizer's {len(tok)} tokens")
    text = make_family(root / "_text", spec, finetunes=text_finetunes + 1, seed=seed, delta_scale=delta_scale,
                       shard_size=shard_size)
    out = {"base": root / "base", "text": [root / f"text{i}" for i in range(text_finetunes)], "vlm": root / "vlm"}
    text[0].rename(out["base"])
    for src, dst in zip(text[2:], out["text"]):
        src.rename(dst)
    for p in [out["base"], *out["text"]]:
        tok.save_pretrained(p)

    torch.manual_seed(seed + 7)
    cfg = LlavaConfig(vision_config=vision_config(image_size, patch_size), text_config=spec.config(),
                      image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
                      vision_feature_select_strategy="default", torch_dtype=str(spec.dtype).replace("torch.", ""))
    vlm = LlavaForConditionalGeneration(cfg).to(spec.dtype)
    with torch.no_grad():
        for p in vlm.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    # the language model is the first extra fine-tune of the text base
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(text[1], torch_dtype=spec.dtype)
    with torch.no_grad():
        vlm.model.language_model.load_state_dict(lm.model.state_dict())
        vlm.lm_head.load_state_dict(lm.lm_head.state_dict())
    del lm
    vlm.save_pretrained(out["vlm"], max_shard_size=shard_size)
    processor(tok, image_size, patch_size).save_pretrained(out["vlm"])
    rename_to(out["vlm"], naming)
    import shutil

    shutil.rmtree(text[1])
    (root / "_text").rmdir()
    return out
