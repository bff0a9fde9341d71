"""Train the toy visual world's tiny models on the CPU: a text base, a Japanese text model and an English VLM.

EvoVLM-JP's setup in miniature (LLaVA-1.6-Mistral-7B and Shisa Gamma 7B, both fine-tunes of Mistral-7B):

- ``base``: a tiny Mistral pre-trained from scratch on text about the world in both languages: scene
  descriptions, EN/JA parallel pairs, and question/answer documents in the chat format where the
  description stands where a picture would be (``USER: <description> <question> ASSISTANT: <answer>``).
  Like an English-centric base, it answers Japanese questions in English (``ja_answer_in_ja`` of the
  time in Japanese).
- ``ja``: the base fine-tuned on Japanese chat, text only: Japanese questions about described scenes
  (described in Japanese or English) answered in Japanese. It has never seen a picture.
- ``vlm_en``: a tiny LLaVA (tiny CLIP vision tower + projector, trained from scratch) whose language
  model starts from the base and is fine-tuned with it on pictures with English questions and English
  answers (LLaVA's visual instruction tuning, in English only), with some of the base's text replayed.

The three language models are one architecture from one base, so fastmerge merges the VLM's language
model with ``ja`` (the VLM's vision side carried). Each model is a normal Hugging Face checkpoint,
cached under ``work_dir/models/{base,ja,vlm_en}`` with the config digest in ``toy_vlm.json``; a second
run with the same config trains nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import picture_world as world  # noqa: E402

SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}
IMAGE_TOKEN = "<image>"
PATCH = 8
#: bump when the world or the training code changes in a way that invalidates cached models
WORLD_VERSION = 4


@dataclass
class ModelConfig:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    vision_hidden: int = 64
    vision_layers: int = 2


@dataclass
class PhaseConfig:
    steps: int
    lr: float
    batch: int = 32
    warmup: int = 20


@dataclass
class TrainConfig:
    seed: int = 0
    vocab: int = 600
    model: ModelConfig = field(default_factory=ModelConfig)
    base: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=600, lr=3e-3, warmup=40))
    ja: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=150, lr=5e-4))
    #: LLaVA's stage 1: the vision tower and projector alone (language model frozen) learn to feed the base
    vlm_align: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=300, lr=2e-3))
    #: stage 2 (visual instruction tuning): the language model, at ``vlm.lr``
    vlm: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=400, lr=3e-4))
    #: the vision tower and projector's learning rate in stage 2 (0: frozen)
    vision_lr: float = 0.0
    #: probability that a Japanese question in the base corpus is answered in Japanese (else English)
    ja_answer_in_ja: float = 0.1
    #: share of the Japanese chat whose prompt has no description (the question alone, answered in Japanese):
    #: Japanese answers to Japanese questions whatever comes before them (as a Japanese LLM gives them)
    ja_no_context: float = 0.3
    #: share of base documents replayed in each fine-tune batch (a text batch every 1/replay steps for the VLM)
    replay: float = 0.1
    corpus_docs: int = 20000
    vlm_pictures: int = 4000
    #: which answer tokens carry the VLM's loss in stage 2: "answer" (all, and eos) or "number" (the count
    #: alone; the English words around it are context), so that visual tuning teaches to count, not which
    #: language to answer in (stage 1 always scores the whole answer)
    vlm_loss: str = "answer"

    def digest(self, model: str | None = None) -> str:
        """The hash of what decides ``model`` (``base``, ``ja``, ``vlm_en``; None: all three), so a change
        to one fine-tune retrains that fine-tune only."""
        d = dataclasses.asdict(self)
        base_keys = ("seed", "vocab", "model", "base", "ja_answer_in_ja", "corpus_docs")
        own = {"base": (), "ja": ("ja", "replay", "ja_no_context"),
               "vlm_en": ("vlm_align", "vlm", "vision_lr", "replay", "vlm_pictures", "vlm_loss")}
        keys = list(d) if model is None else [*base_keys, *own[model]]
        blob = json.dumps({"v": WORLD_VERSION, **{k: d[k] for k in keys}}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def quick_config(seed: int = 0) -> TrainConfig:
    """Smaller and faster (``--quick`` and smoke runs): worse models, same pipeline."""
    return TrainConfig(seed=seed, model=ModelConfig(hidden=64, layers=2, heads=4, intermediate=192, vision_hidden=32),
                       base=PhaseConfig(steps=120, lr=3e-3), ja=PhaseConfig(steps=30, lr=5e-4),
                       vlm_align=PhaseConfig(steps=40, lr=2e-3), vlm=PhaseConfig(steps=40, lr=2e-4),
                       corpus_docs=3000, vlm_pictures=500)


# --- corpora -------------------------------------------------------------------------------------

def text_prompt(context: str, question: str) -> str:
    """The chat prompt with a description where the VLM's picture goes (``USER: <image> q ASSISTANT:``)."""
    return f"USER: {context} {question} ASSISTANT:"


def base_corpus(cfg: TrainConfig) -> list[str | tuple[str, str]]:
    """The base's documents: QA in the chat format (prompt, response), descriptions, parallel pairs."""
    rng = random.Random(cfg.seed)
    docs: list[str | tuple[str, str]] = []
    words = [(c, v[1]) for c, v in world.COLORS.items()] + [(k, v[1]) for k, v in world.SHAPES.items()]
    for _ in range(cfg.corpus_docs):
        scene = world.draw_scene(rng)
        u = rng.random()
        if u < 0.65:
            ctx_lang, q_lang = rng.choice(["en", "ja"]), rng.choice(["en", "ja"])
            a_lang = "en" if q_lang == "en" or rng.random() >= cfg.ja_answer_in_ja else "ja"
            q = world.pick_question(scene, rng)
            docs.append((text_prompt(world.describe(scene, ctx_lang), world.question(q, q_lang)),
                         world.answer(scene, q, a_lang)))
        elif u < 0.8:
            docs.append(world.describe(scene, rng.choice(["en", "ja"])))
        elif u < 0.93:
            a, b = world.describe(scene, "en"), world.describe(scene, "ja")
            docs.append(f"{a} = {b}" if rng.random() < 0.5 else f"{b} = {a}")
        else:
            en, ja = rng.choice(words)
            docs.append(f"{en} = {ja}" if rng.random() < 0.5 else f"{ja} = {en}")
    return docs


def ja_sft(cfg: TrainConfig, n: int) -> list[tuple[str, str]]:
    """Japanese chat, text only: Japanese questions about a described scene, answered in Japanese."""
    rng = random.Random(cfg.seed + 1)
    out = []
    for _ in range(n):
        scene = world.draw_scene(rng)
        q = world.pick_question(scene, rng)
        if rng.random() < cfg.ja_no_context:
            prompt = f"USER: {world.question(q, 'ja')} ASSISTANT:"
        else:
            prompt = text_prompt(world.describe(scene, rng.choice(["en", "ja"])), world.question(q, "ja"))
        out.append((prompt, world.answer(scene, q, "ja")))
    return out


# --- tokenizer and models ------------------------------------------------------------------------

def train_tokenizer(texts: Sequence[str], vocab: int):
    """Byte-level BPE, runs of one Japanese script pre-split (as the text toy world's), plus <image>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d+|\p{Han}+|[\p{Katakana}ー]+|\p{Hiragana}+|\n"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[*SPECIAL.values(), IMAGE_TOKEN],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bos = SPECIAL["bos"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIAL["pad"], bos_token=SPECIAL["bos"],
                                   eos_token=SPECIAL["eos"], padding_side="left", add_bos_token=True,
                                   extra_special_tokens={"image_token": IMAGE_TOKEN})


def text_config(cfg: ModelConfig, tok):
    from transformers import MistralConfig

    return MistralConfig(vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, sliding_window=None)


def make_processor(tok):
    from fastmerge.synth_vlm import processor

    return processor(tok, world.IMAGE_SIZE, PATCH)


def make_vlm(cfg: ModelConfig, tok, base_dir: Path, seed: int):
    """A LLaVA whose language model is the base's weights, vision tower and projector new."""
    from transformers import AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    from fastmerge.synth_vlm import vision_config

    torch.manual_seed(seed)
    vc = vision_config(world.IMAGE_SIZE, PATCH, cfg.vision_hidden, cfg.vision_layers)
    conf = LlavaConfig(vision_config=vc, text_config=text_config(cfg, tok),
                       image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-1,
                       vision_feature_select_strategy="default")
    vlm = LlavaForConditionalGeneration(conf)
    lm = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    vlm.model.language_model.load_state_dict(lm.model.state_dict())
    vlm.lm_head.load_state_dict(lm.lm_head.state_dict())
    return vlm


# --- data encoding and the training loop ---------------------------------------------------------

def encode(tok, docs: Sequence[str | tuple[str, str]]) -> list[tuple[list[int], list[bool]]]:
    """(ids, scored): a string is scored everywhere; a (prompt, response) pair on the response and eos.
    Prompt and response are tokenized apart, as at generation time."""
    out = []
    for d in docs:
        ids = [tok.bos_token_id]
        if isinstance(d, str):
            ids += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
            out.append((ids, [False] + [True] * (len(ids) - 1)))
        else:
            p = tok.encode(d[0], add_special_tokens=False)
            r = tok.encode(d[1], add_special_tokens=False) + [tok.eos_token_id]
            out.append((ids + p + r, [False] * (1 + len(p)) + [True] * len(r)))
    return out


def encode_vqa(proc, items: Sequence[world.Item], lang: str,
               loss: str = "answer") -> list[tuple[list[int], list[bool], torch.Tensor]]:
    """(ids, scored, pixel_values) per picture question, the prompt through the processor's chat template;
    ``loss="number"`` scores the answer's digits only."""
    import re

    tok = proc.tokenizer
    out = []
    for it in items:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it.question(lang)}]}]
        prompt = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        enc = proc(images=it.image(), text=prompt, return_tensors="pt")
        p = enc["input_ids"][0].tolist()
        ids, scored = list(p), [False] * len(p)
        for piece in re.split(r"(\d+)", it.answer(lang)):
            if piece:
                t = tok.encode(piece, add_special_tokens=False)
                ids += t
                scored += [loss == "answer" or piece.isdigit()] * len(t)
        ids.append(tok.eos_token_id)
        scored.append(loss == "answer")
        out.append((ids, scored, enc["pixel_values"][0]))
    return out


def collate(rows, pad_id: int):
    width = max(len(r[0]) for r in rows)
    x = torch.full((len(rows), width), pad_id, dtype=torch.long)
    y = torch.full((len(rows), width), -100, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, scored, *_) in enumerate(rows):
        t = torch.tensor(ids)
        x[i, :len(ids)] = t
        att[i, :len(ids)] = 1
        y[i, :len(ids)] = torch.where(torch.tensor(scored), t, -100)
    batch = {"input_ids": x, "attention_mask": att, "labels": y}
    if len(rows[0]) == 3:
        batch["pixel_values"] = torch.stack([r[2] for r in rows])
    return batch


def train(model, data, phase: PhaseConfig, pad_id: int, seed: int, desc: str, param_groups=None,
          replay=(), replay_frac: float = 0.0, text_replay_every: int = 0, log: Callable[[str], None] | None = None):
    """AdamW, linear warm-up, cosine decay to 10%. ``replay_frac`` of each batch from ``replay`` (text
    models); ``text_replay_every`` > 0: every that many steps an extra batch of ``replay`` text (the VLM)."""
    model.train()
    opt = torch.optim.AdamW(param_groups or model.parameters(), lr=phase.lr, betas=(0.9, 0.98), weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < phase.warmup:
            return (step + 1) / phase.warmup
        t = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(seed)
    n_rep = round(phase.batch * replay_frac) if replay and not text_replay_every else 0
    losses = []
    for step in range(phase.steps):
        rows = [data[rng.randrange(len(data))] for _ in range(phase.batch - n_rep)]
        rows += [replay[rng.randrange(len(replay))] for _ in range(n_rep)]
        loss = model(**collate(rows, pad_id)).loss
        if text_replay_every and replay and step % text_replay_every == 0:
            text = collate([replay[rng.randrange(len(replay))] for _ in range(phase.batch)], pad_id)
            loss = loss + model(**text).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    if log:
        log(f"{desc}: {phase.steps} steps, loss {sum(losses[:10]) / 10:.3f} -> {sum(losses[-20:]) / 20:.3f}")
    return losses


def _save(model, out: Path, meta: dict, tok=None, proc=None) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (proc or tok).save_pretrained(tmp)
    (tmp / "toy_vlm.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _cached(out: Path, digest: str) -> bool:
    meta = out / "toy_vlm.json"
    return meta.exists() and json.loads(meta.read_text()).get("digest") == digest


MODEL_NAMES = ("base", "ja", "vlm_en")


def build_models(work_dir: str | Path = HERE / "work", quick: bool = False, seed: int = 0,
                 config: TrainConfig | None = None, log: Callable[[str], None] | None = print) -> dict[str, Path]:
    """Train (or reuse) base, ja and vlm_en under ``work_dir/models`` (``models-quick`` with ``quick``)."""
    from transformers import AutoModelForCausalLM, MistralForCausalLM, PreTrainedTokenizerFast

    cfg = config or (quick_config(seed) if quick else TrainConfig(seed=seed))
    root = Path(work_dir) / ("models-quick" if quick else "models")
    paths = {n: root / n for n in MODEL_NAMES}
    digest = {n: cfg.digest(n) for n in MODEL_NAMES}
    if all(_cached(p, digest[n]) for n, p in paths.items()):
        return paths
    log = log or (lambda s: None)
    t0 = time.perf_counter()
    docs = base_corpus(cfg)
    if _cached(paths["base"], digest["base"]):
        tok = PreTrainedTokenizerFast.from_pretrained(paths["base"])
        base = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    else:
        texts = [d if isinstance(d, str) else d[0] + d[1] for d in docs]
        tok = train_tokenizer(texts, cfg.vocab)
        torch.manual_seed(cfg.seed)
        base = MistralForCausalLM(text_config(cfg.model, tok))
        train(base, encode(tok, docs), cfg.base, tok.pad_token_id, cfg.seed, "base", log=log)
        _save(base, paths["base"], {"digest": digest["base"], "model": "base"}, tok=tok)
        log(f"base trained in {time.perf_counter() - t0:.0f} s ({sum(p.numel() for p in base.parameters())} params)")
    replay = encode(tok, docs[: max(1000, len(docs) // 5)])
    if not _cached(paths["ja"], digest["ja"]):
        t1 = time.perf_counter()
        ja = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
        data = encode(tok, ja_sft(cfg, cfg.ja.steps * cfg.ja.batch))
        train(ja, data, cfg.ja, tok.pad_token_id, cfg.seed + 1, "ja", replay=replay, replay_frac=cfg.replay, log=log)
        _save(ja, paths["ja"], {"digest": digest["ja"], "model": "ja"}, tok=tok)
        log(f"ja trained in {time.perf_counter() - t1:.0f} s")
    if not _cached(paths["vlm_en"], digest["vlm_en"]):
        t1 = time.perf_counter()
        proc = make_processor(tok)
        vlm = make_vlm(cfg.model, tok, paths["base"], cfg.seed + 2)
        items = world.make_items("train", cfg.vlm_pictures)
        data = encode_vqa(proc, items, "en")
        tuned = data if cfg.vlm_loss == "answer" else encode_vqa(proc, items, "en", cfg.vlm_loss)
        lm = [p for n, p in vlm.named_parameters() if "language_model" in n or n.startswith("lm_head")]
        lm_ids = {id(p) for p in lm}
        vis = [p for p in vlm.parameters() if id(p) not in lm_ids]
        if cfg.vlm_align.steps:
            for p in lm:
                p.requires_grad_(False)
            train(vlm, data, cfg.vlm_align, tok.pad_token_id, cfg.seed + 3, "vlm_en align", param_groups=vis, log=log)
            for p in lm:
                p.requires_grad_(True)
        groups = [{"params": lm, "lr": cfg.vlm.lr}]
        if cfg.vision_lr:
            groups.append({"params": vis, "lr": cfg.vision_lr})
        else:  # stage 2 with the vision side frozen: the projector stays aligned to the base
            for p in vis:
                p.requires_grad_(False)
        every = round(1 / cfg.replay) if cfg.replay else 0
        train(vlm, tuned, cfg.vlm, tok.pad_token_id, cfg.seed + 2, "vlm_en", param_groups=groups, replay=replay,
              text_replay_every=every, log=log)
        _save(vlm, paths["vlm_en"], {"digest": digest["vlm_en"], "model": "vlm_en"}, proc=proc)
        log(f"vlm_en trained in {time.perf_counter() - t1:.0f} s")
    log(f"models ready in {time.perf_counter() - t0:.0f} s")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(HERE / "work"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(build_models(args.work, quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
