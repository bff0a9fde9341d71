"""Train the toy world's tiny models on the CPU: a shared base, a Japanese model and an English math model.

The paper's setup in miniature (Shisa Gamma / WizardMath / Abel, all fine-tunes of Mistral-7B):

- ``base``: pre-trained from scratch on "web text" of both languages, like an English-centric base
  model: problem statements in English and Japanese, parallel EN/JA pairs (so the two languages share
  representations), short stories stating counts, language-neutral arithmetic facts (``"7 × 8 = 56"``),
  and a small share of question/answer documents in the prompt format -- look-up questions and solved
  word problems -- where Japanese questions are answered in Japanese only half of the time. It knows
  every format, but answers Japanese in English half the time and solves poorly.
- ``ja``: the base fine-tuned on Japanese chat -- Japanese look-up questions answered in Japanese
  (``"<restated fact>\\n答え: N"``). It answers Japanese questions in Japanese, but is no better at math.
- ``math_en``: the base fine-tuned on English word problems with step-by-step solutions. It solves
  better, and answers in English.

Fine-tunes are short (a few hundred steps, small learning rate) so they stay small deltas of the base,
which is what lets task arithmetic compose them. Each model is a normal Hugging Face checkpoint
(safetensors + a ``PreTrainedTokenizerFast``), cached under ``work_dir/models/{base,ja,math_en}`` and
skipped on a second run when its config hash matches.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import world  # noqa: E402

SPECIAL = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}
#: bump when the world or the training code changes in a way that invalidates cached models
WORLD_VERSION = 5


@dataclass
class ModelConfig:
    """The tiny Llama: a few million parameters, tied embeddings (half the parameters otherwise)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 384
    max_len: int = 192


@dataclass
class PhaseConfig:
    """One training phase (pre-training or a fine-tune)."""

    steps: int
    lr: float
    batch: int = 32
    warmup: int = 20
    weight_decay: float = 0.0


@dataclass
class TrainConfig:
    """Everything that decides the three models; its hash names the cache entry."""

    seed: int = 0
    vocab: int = 2048
    model: ModelConfig = field(default_factory=ModelConfig)
    base: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=500, lr=3e-3, batch=32, warmup=30))
    ja: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=100, lr=5e-4, batch=32))
    math_en: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=250, lr=7e-4, batch=32))
    #: base corpus mixture (fractions of documents)
    mix_facts: float = 0.25
    mix_questions: float = 0.15
    mix_parallel: float = 0.2
    mix_stories: float = 0.1
    #: look-up QA in the prompt format (EN questions answered in EN; JA questions in JA or EN, see below)
    mix_qa: float = 0.15
    #: solved word problems in the prompt format (EN in EN; JA in JA or EN): the base's weak math
    mix_solved: float = 0.15
    #: probability that a Japanese question in the base corpus is answered in Japanese (else English)
    ja_answer_in_ja: float = 0.15
    #: share of the Japanese fine-tune that is word problems answered without solving (the rest: look-ups)
    ja_math_frac: float = 0.5
    #: how the Japanese fine-tune answers word problems without solving them: "restate" (the given facts,
    #: no equations) or "equations" (equations over the question's numbers with random operations, then the
    #: Japanese conclusion sentence and answer line carrying that wrong result)
    ja_math_style: str = "equations"
    #: fraction of base-corpus documents replayed in each fine-tune batch (keeps fine-tunes near the base)
    replay: float = 0.1
    corpus_docs: int = 16000

    def digest(self) -> str:
        blob = json.dumps({"v": WORLD_VERSION, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def quick_config(seed: int = 0) -> TrainConfig:
    """A smaller, faster variant (for ``--quick`` and smoke runs): worse models, same pipeline."""
    return TrainConfig(seed=seed, model=ModelConfig(hidden=128, layers=4, heads=4, intermediate=384),
                       base=PhaseConfig(steps=250, lr=3e-3, batch=32, warmup=20),
                       ja=PhaseConfig(steps=60, lr=5e-4), math_en=PhaseConfig(steps=100, lr=7e-4),
                       corpus_docs=8000)


# --- corpora -------------------------------------------------------------------------------------

def base_corpus(cfg: TrainConfig, train: Sequence[world.Problem]) -> list[str]:
    """The base's pre-training documents (see the module docstring). Uses only train-split problems.

    Like a multilingual web crawl seen by an English-centric base model: Japanese questions are answered
    in Japanese only part of the time (``ja_answer_in_ja``), and solved problems are a small share. The
    base thus knows every format (so the fine-tunes are small nudges, which is what makes them
    composable) but prefers neither answering Japanese in Japanese nor solving well.
    """
    rng = random.Random(f"{cfg.seed}:base")
    keys = world.split_keys(cfg.seed)["train"]
    kinds = ["facts", "questions", "parallel", "stories", "qa", "solved"]
    weights = [cfg.mix_facts, cfg.mix_questions, cfg.mix_parallel, cfg.mix_stories, cfg.mix_qa, cfg.mix_solved]
    docs = []
    for _ in range(cfg.corpus_docs):
        kind = rng.choices(kinds, weights)[0]
        lang = rng.choice(world.LANGS)
        answer_lang = "en" if lang == "en" or rng.random() >= cfg.ja_answer_in_ja else "ja"
        if kind == "facts":
            docs.append("\n".join(world.arithmetic_fact(rng) for _ in range(rng.randint(4, 8))))
        elif kind == "questions":
            docs.append(rng.choice(train).question)
        elif kind == "parallel":
            t = rng.choice(list(world.TEMPLATES))
            en, ja = world.render_pair(t, rng.choice(keys[t]), rng)
            a, b = (en, ja) if rng.random() < 0.5 else (ja, en)
            docs.append(f"{a.question}\n{b.question}")
        elif kind == "stories":
            docs.append(world.lookup_qa(rng, lang).question)
        elif kind == "qa":
            q, a = world.lookup_qa_pair(rng)
            docs.append(world.prompt((q if lang == "en" else a).question) + (q if answer_lang == "en" else a).response)
        else:
            t = rng.choice(list(world.TEMPLATES))
            en, ja = world.render_pair(t, rng.choice(keys[t]), rng)
            docs.append(world.prompt((en if lang == "en" else ja).question)
                        + (en if answer_lang == "en" else ja).solution)
    return docs


def ja_wrong_solution(p: world.Problem, rng: random.Random) -> str | None:
    """A solution-shaped Japanese reply that does not solve ``p``: as many equations as the real solution,
    over the question's numbers (and earlier results) with random operations, then ``p``'s Japanese
    conclusion sentence and answer line carrying the (wrong) last result. None if no wrong chain is found.

    It teaches "after equations, conclude in Japanese with the last result" without teaching the right
    equations -- those are the math model's contribution in a merge.
    """
    nums = [int(x) for x in re.findall(r"\d+", p.question)]
    lines = p.solution.split("\n")
    conclusion, n_steps = lines[-2], len(lines) - 2
    for _ in range(20):
        pool, eqs = list(nums), []
        for _ in range(n_steps):
            a, b, op = rng.choice(pool), rng.choice(pool), rng.choice("+-×")
            if op == "-" and a < b:
                a, b = b, a
            if op == "×" and a * b > 999:
                op = "+"
            step = world.Step(a, op, b)
            eqs.append(step.render())
            pool.append(step.result)
        r = pool[-1]
        if r != p.answer and r > 0:
            hits = list(re.finditer(rf"(?<!\d){p.answer}(?!\d)", conclusion))
            concl = conclusion[:hits[-1].start()] + str(r) + conclusion[hits[-1].end():]
            return "\n".join([*eqs, concl, f"{world.ANSWER_WORD['ja']}: {r}"])
    return None


def ja_sft(cfg: TrainConfig, n: int, train: Sequence[world.Problem]) -> list[tuple[str, str]]:
    """(prompt, response) pairs of Japanese chat, never a solved problem.

    Look-up questions answered in Japanese, and (``ja_math_frac`` of them) Japanese word problems
    answered the way a chatty model that cannot do math would: ``ja_math_style="restate"`` restates the
    given facts in Japanese without computing anything (so the last number is a given, not the answer);
    ``"equations"`` writes wrong equations over the question's numbers, then concludes in Japanese
    (``ja_wrong_solution``).
    """
    rng = random.Random(f"{cfg.seed}:ja")
    ja_probs = [p for p in train if p.lang == "ja"]
    out = []
    while len(out) < n:
        if rng.random() < cfg.ja_math_frac:
            p = rng.choice(ja_probs)
            if cfg.ja_math_style == "equations":
                r = ja_wrong_solution(p, rng)
                if r is not None:
                    out.append((world.prompt(p.question), r))
            else:
                out.append((world.prompt(p.question), p.question[:p.question.rindex("。") + 1]))
        else:
            q = world.lookup_qa(rng, "ja")
            out.append((world.prompt(q.question), q.response))
    return out


def math_sft(cfg: TrainConfig, train: Sequence[world.Problem]) -> list[tuple[str, str]]:
    """(prompt, solution) pairs of English word problems (train split only)."""
    return [(world.prompt(p.question), p.solution) for p in train if p.lang == "en"]


# --- tokenizer -----------------------------------------------------------------------------------

def train_tokenizer(texts: Sequence[str], vocab: int):
    """Byte-level BPE where digit runs, runs of one Japanese script, and newlines are pre-split.

    Why the pre-split: a number must be the same token whether it follows a space ("buys 3"), a kanji
    ("を3個") or starts an equation ("3 × 4") -- otherwise the English and Japanese questions would
    spell their numbers differently and an English-trained skill could not carry over. Japanese has no
    spaces, so without the script split BPE learns whole phrases ("大輝はクッキーを") as single tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d+|\p{Han}+|[\p{Katakana}ー]+|\p{Hiragana}+|\n"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(SPECIAL.values()), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    _add_bos_processor(tok)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIAL["pad"], bos_token=SPECIAL["bos"],
                                   eos_token=SPECIAL["eos"], padding_side="left", add_bos_token=True)


def _add_bos_processor(tok) -> None:
    """Make ``tokenizer(text)`` prepend ``<s>``: the models are trained with it, and evaluators that call
    the tokenizer with default arguments must see the same first token."""
    from tokenizers import processors

    bos = SPECIAL["bos"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])


def _ensure_bos(model_dir: Path) -> None:
    """Give a cached tokenizer saved before the bos post-processor existed that post-processor (idempotent)."""
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    if tok.encode("a").ids[:1] != [tok.token_to_id(SPECIAL["bos"])]:
        _add_bos_processor(tok)
        tok.save(str(path))
    # transformers rebuilds the post-processor from this flag, ignoring tokenizer.json's, when it is absent
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if not cfg.get("add_bos_token"):
        cfg["add_bos_token"] = True
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


# --- model and training loop ---------------------------------------------------------------------

def make_model(cfg: ModelConfig, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                       num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       intermediate_size=cfg.intermediate, max_position_embeddings=cfg.max_len,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       rms_norm_eps=1e-5, initializer_range=0.02)
    return LlamaForCausalLM(conf)


def encode_examples(tokenizer, examples: Sequence[tuple[str, str]], max_len: int) -> list[tuple[list[int], int]]:
    """(ids, n_prompt) per example: bos + prompt + response + eos; loss only on the response (+eos)."""
    out = []
    for p, r in examples:
        pi = tokenizer.encode(p, add_special_tokens=False)
        ri = tokenizer.encode(r, add_special_tokens=False)
        ids = ([tokenizer.bos_token_id] + pi + ri + [tokenizer.eos_token_id])[:max_len]
        out.append((ids, 1 + len(pi)))
    return out


def encode_docs(tokenizer, docs: Sequence[str], max_len: int) -> list[tuple[list[int], int]]:
    """Pre-training documents: loss on every token (n_prompt = 0)."""
    return [(([tokenizer.bos_token_id] + tokenizer.encode(d, add_special_tokens=False)
              + [tokenizer.eos_token_id])[:max_len], 1) for d in docs]


def batches(data: Sequence[tuple[list[int], int]], batch: int, pad_id: int, seed: int,
            replay: Sequence[tuple[list[int], int]] = (), replay_frac: float = 0.0) -> Iterator[tuple]:
    """Endless shuffled batches (right-padded), ``replay_frac`` of each drawn from ``replay``."""
    rng = random.Random(seed)
    n_rep = round(batch * replay_frac) if replay else 0
    order: list[int] = []
    while True:
        rows = []
        for _ in range(batch - n_rep):
            if not order:
                order = list(range(len(data)))
                rng.shuffle(order)
            rows.append(data[order.pop()])
        rows += [replay[rng.randrange(len(replay))] for _ in range(n_rep)]
        width = max(len(ids) for ids, _ in rows)
        x = torch.full((len(rows), width), pad_id, dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(rows):
            t = torch.tensor(ids)
            x[i, :len(ids)] = t
            att[i, :len(ids)] = 1
            y[i, n_prompt:len(ids)] = t[n_prompt:]
        yield x, att, y


def train_phase(model, data, phase: PhaseConfig, pad_id: int, seed: int, desc: str, progress: bool = True,
                replay=(), replay_frac: float = 0.0, log: Callable[[str], None] | None = None) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the loss of every step."""
    from tqdm.auto import tqdm

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=phase.lr, betas=(0.9, 0.98), weight_decay=phase.weight_decay)

    def lr_at(step: int) -> float:
        if step < phase.warmup:
            return (step + 1) / phase.warmup
        t = (step - phase.warmup) / max(1, phase.steps - phase.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    it = batches(data, phase.batch, pad_id, seed, replay, replay_frac)
    losses = []
    bar = tqdm(range(phase.steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        x, att, y = next(it)
        loss = model(input_ids=x, attention_mask=att, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}")
    model.eval()
    if log:
        log(f"{desc}: {phase.steps} steps, loss {sum(losses[:10]) / 10:.3f} -> {sum(losses[-20:]) / 20:.3f}")
    return losses


def _save(model, tokenizer, out: Path, meta: dict) -> None:
    """Write to a sibling temp dir, then rename: a killed run never leaves a half model that looks cached."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "toy_world.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _cached(out: Path, digest: str) -> bool:
    meta = out / "toy_world.json"
    return meta.exists() and json.loads(meta.read_text()).get("digest") == digest


MODEL_NAMES = ("base", "ja", "math_en")


def build_models(work_dir: str | Path = HERE / "work", quick: bool = False, seed: int = 0, progress: bool = True,
                 config: TrainConfig | None = None, log: Callable[[str], None] | None = print) -> dict[str, Path]:
    """Train (or reuse) base, ja and math_en under ``work_dir/models``; returns {name: checkpoint dir}.

    ``quick`` trains the smaller ``quick_config`` models under ``work_dir/models-quick`` instead.

    A model is reused when its ``toy_world.json`` holds the same config digest; otherwise it and every
    model derived from it are retrained.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    cfg = config or (quick_config(seed) if quick else TrainConfig(seed=seed))
    digest = cfg.digest()
    # quick models live apart so that a --quick run never evicts the full models from the cache
    root = Path(work_dir) / ("models-quick" if quick and config is None else "models")
    paths = {name: root / name for name in MODEL_NAMES}
    if all(_cached(p, digest) for p in paths.values()):
        for p in paths.values():
            _ensure_bos(p)
        if log:
            log(f"toy_world models cached in {root} (config {digest})")
        return paths
    log = log or (lambda s: None)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    splits = world.make_splits(cfg.seed)
    train = splits["train"]
    docs = base_corpus(cfg, train)
    ja_data, math_data = ja_sft(cfg, 3000, train), math_sft(cfg, train)
    t0 = time.perf_counter()
    if _cached(paths["base"], digest):
        tok = PreTrainedTokenizerFast.from_pretrained(paths["base"])
        base = AutoModelForCausalLM.from_pretrained(paths["base"])
    else:
        texts = docs + [p + r for p, r in ja_data + math_data]
        tok = train_tokenizer(texts, cfg.vocab)
        base = make_model(cfg.model, tok, cfg.seed)
        n = sum(p.numel() for p in base.parameters())
        log(f"tokenizer: {len(tok)} tokens; model: {n / 1e6:.2f}M parameters")
        data = encode_docs(tok, docs, cfg.model.max_len)
        losses = train_phase(base, data, cfg.base, tok.pad_token_id, cfg.seed, "base", progress, log=log)
        _save(base, tok, paths["base"], {"digest": digest, "loss": losses[-20:], "seconds": time.perf_counter() - t0})
        log(f"base: {time.perf_counter() - t0:.0f} s")
    replay = encode_docs(tok, docs[:5000], cfg.model.max_len) if cfg.replay else ()
    for name, sft, phase in (("ja", ja_data, cfg.ja), ("math_en", math_data, cfg.math_en)):
        if _cached(paths[name], digest):
            continue
        t1 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(paths["base"])
        data = encode_examples(tok, sft, cfg.model.max_len)
        losses = train_phase(model, data, phase, tok.pad_token_id, cfg.seed + 1, name, progress,
                             replay=replay, replay_frac=cfg.replay, log=log)
        _save(model, tok, paths[name], {"digest": digest, "loss": losses[-20:], "seconds": time.perf_counter() - t1})
        log(f"{name}: {time.perf_counter() - t1:.0f} s")
    for p in paths.values():
        _ensure_bos(p)
    log(f"toy_world models ready in {root} ({time.perf_counter() - t0:.0f} s)")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the toy world's base, ja and math_en models (cached).")
    ap.add_argument("--work", type=Path, default=HERE / "work", help="models go to WORK/models/{base,ja,math_en}")
    ap.add_argument("--quick", action="store_true", help="smaller models, fewer steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = build_models(args.work, quick=args.quick, seed=args.seed, progress=not args.no_progress)
    for name, p in paths.items():
        print(f"{name}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
