"""Train the toy world's tiny models on the CPU: a shared base, a Japanese model and an English math model.

The paper's setup in miniature (Shisa Gamma / WizardMath / Abel, all fine-tunes of Mistral-7B):

- ``base``: pre-trained from scratch on "web text" of both languages, like an English-centric base
  model: problem statements in English and Japanese, parallel EN/JA pairs (so the two languages share
  representations), short stories stating counts, language-neutral arithmetic facts (``"7 × 8 = 56"``),
  and a small share of question/answer documents in the prompt format -- look-up questions and worked
  word problems -- where Japanese questions are answered in Japanese only 10% of the time. Its worked
  problems carry arithmetic slips (``base_slips``: the right equations, each result off by a few), like a
  sloppy crawl: the base knows how to set a problem up, in both languages, but not how to compute it.
- ``ja``: the base fine-tuned on Japanese chat -- look-up questions answered in Japanese, and Japanese
  word problems where only the Japanese header and conclusion are targets (the worked equations are
  context, ``ja_math_style="conclusion"``). It answers Japanese questions in Japanese, and computes no
  better than the base.
- ``math_en``: the base fine-tuned on English word problems with correct step-by-step solutions. It
  computes well -- in Japanese questions too, since the equations are the same tokens -- but answers in
  English.

Each fine-tune's data touches the tokens of its own skill (the language is decided at the header, the
arithmetic at the equations), which is what lets a merge take the language of one and the arithmetic of
the other. NOTES.md records every design tried and why this one.

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
WORLD_VERSION = 7


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
    base: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=900, lr=3e-3, batch=32, warmup=40))
    ja: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=150, lr=5e-4, batch=32))
    math_en: PhaseConfig = field(default_factory=lambda: PhaseConfig(steps=400, lr=7e-4, batch=32))
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
    ja_answer_in_ja: float = 0.1
    #: share of the Japanese fine-tune that is word problems answered without solving (the rest: look-ups)
    ja_math_frac: float = 0.5
    #: how the Japanese fine-tune meets word problems without learning to solve them: "conclusion" (the
    #: worked equations are given as context, the model only learns the Japanese header before them and the
    #: Japanese conclusion and answer line after them) or "restate" (the given facts, no equations)
    ja_math_style: str = "conclusion"
    #: probability that a solved problem in the base corpus carries arithmetic slips (each result off by a
    #: few, carried through the later steps and the conclusion): the base, and so the Japanese model, learns
    #: to set up the right equations but not to compute them; the math model's data computes them right
    base_slips: float = 1.0
    #: which tokens of the math fine-tune carry the loss: "solution" (all) or "equations" (the worked
    #: steps; the English conclusion sentence and answer line are context only)
    math_loss: str = "solution"
    #: fraction of base-corpus documents replayed in each fine-tune batch (keeps fine-tunes near the base)
    replay: float = 0.1
    corpus_docs: int = 30000

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

def base_corpus(cfg: TrainConfig, train: Sequence[world.Problem]) -> list[str | tuple[str, str]]:
    """The base's pre-training documents (see the module docstring). Uses only train-split problems.

    Documents in the prompt format are (prompt, response) pairs, tokenized part by part as at inference
    (the prompt ends with a space: tokenized whole, "A: Let's" would hide the lone " " token that every
    generated answer starts after).

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
            docs.append((world.prompt((q if lang == "en" else a).question), (q if answer_lang == "en" else a).response))
        else:
            t = rng.choice(list(world.TEMPLATES))
            en, ja = world.render_pair(t, rng.choice(keys[t]), rng)
            sol = (en if answer_lang == "en" else ja).solution
            if rng.random() < cfg.base_slips:
                sol = sloppy_solution(sol, rng)
            docs.append((world.prompt((en if lang == "en" else ja).question), sol))
    return docs


_EQ = re.compile(r"^(\d+) ([-+×÷]) (\d+) = (\d+)$")


def _solution_parts(solution: str) -> tuple[str, str, str]:
    """(header line, equation lines, conclusion + answer line) of a solution, as fine-tune segments."""
    header, *eqs, concl, ans = solution.split("\n")
    return header + "\n", "\n".join(eqs) + "\n", f"{concl}\n{ans}"


def sloppy_solution(solution: str, rng: random.Random) -> str:
    """``solution`` with every result off by 1-5 (never negative), later steps using the slipped values
    and the conclusion and answer line carrying the last one: the right procedure, wrong arithmetic."""
    lines = solution.split("\n")
    subst: dict[int, int] = {}
    for i, line in enumerate(lines[1:-2], start=1):
        m = _EQ.match(line)
        if m is None:
            return solution
        a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
        a, b = subst.get(a, a), subst.get(b, b)
        wrong = r
        while wrong == r or wrong < 0:
            wrong = r + rng.choice((-5, -4, -3, -2, -1, 1, 2, 3, 4, 5))
        subst[r] = wrong
        lines[i] = f"{a} {op} {b} = {wrong}"
    final = wrong  # the last step's slipped result
    answer = int(lines[-1].rsplit(" ", 1)[1])
    hits = list(re.finditer(rf"(?<!\d){answer}(?!\d)", lines[-2]))
    if hits:
        lines[-2] = lines[-2][:hits[-1].start()] + str(final) + lines[-2][hits[-1].end():]
    lines[-1] = lines[-1].rsplit(" ", 1)[0] + f" {final}"
    return "\n".join(lines)


def ja_sft(cfg: TrainConfig, n: int, train: Sequence[world.Problem]) -> list[tuple[str, ...]]:
    """Japanese chat examples, never a solved problem: segments (prompt, scored, unscored, scored, ...).

    Look-up questions answered in Japanese, and (``ja_math_frac`` of them) Japanese word problems met the
    way a chatty model that cannot do math would: ``ja_math_style="conclusion"`` scores the Japanese
    header and the Japanese conclusion and answer line, while the worked equations between them are
    context only (the model learns to talk about a result in Japanese, not to compute it);
    ``"restate"`` restates the given facts in Japanese without computing anything.
    """
    rng = random.Random(f"{cfg.seed}:ja")
    ja_probs = [p for p in train if p.lang == "ja"]
    out: list[tuple[str, ...]] = []
    while len(out) < n:
        if rng.random() < cfg.ja_math_frac:
            p = rng.choice(ja_probs)
            if cfg.ja_math_style == "conclusion":
                out.append((world.prompt(p.question), *_solution_parts(p.solution)))
            else:
                out.append((world.prompt(p.question), p.question[:p.question.rindex("。") + 1]))
        else:
            q = world.lookup_qa(rng, "ja")
            out.append((world.prompt(q.question), q.response))
    return out


def math_sft(cfg: TrainConfig, train: Sequence[world.Problem]) -> list[tuple[str, ...]]:
    """(prompt, solution) pairs of English word problems (train split only).

    With ``math_loss="equations"`` the loss covers the worked equations only (segments: prompt, no scored
    text, the header as context, the equations, the conclusion as context), so the fine-tune learns to
    solve, not which language to answer in (the base's habit, and the Japanese model's skill).
    """
    out: list[tuple[str, ...]] = []
    for p in train:
        if p.lang != "en":
            continue
        if cfg.math_loss == "equations":
            out.append((world.prompt(p.question), "", *_solution_parts(p.solution)))
        else:
            out.append((world.prompt(p.question), p.solution))
    return out


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


def encode_examples(tokenizer, examples: Sequence[tuple[str, ...]], max_len: int) -> list[tuple[list[int], list[bool]]]:
    """(ids, scored) per example: bos + segments + eos. Segments alternate: the prompt (no loss), then
    scored, unscored, scored, ... text; eos is scored when the last segment is. A (prompt, response)
    pair is the usual supervised fine-tuning example."""
    out = []
    for prompt, *parts in examples:
        ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
        scored = [False] * len(ids)
        for i, text in enumerate(parts):
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            scored += [i % 2 == 0] * len(piece)
        ids.append(tokenizer.eos_token_id)
        scored.append((len(parts) - 1) % 2 == 0)
        out.append((ids[:max_len], scored[:max_len]))
    return out


def encode_docs(tokenizer, docs: Sequence[str | tuple[str, ...]], max_len: int) -> list[tuple[list[int], list[bool]]]:
    """Pre-training documents: loss on every token after bos; a tuple's parts are tokenized separately."""
    out = []
    for d in docs:
        ids = [tokenizer.bos_token_id]
        for part in (d,) if isinstance(d, str) else d:
            ids += tokenizer.encode(part, add_special_tokens=False)
        ids = (ids + [tokenizer.eos_token_id])[:max_len]
        out.append((ids, [False] + [True] * (len(ids) - 1)))
    return out


def batches(data: Sequence[tuple[list[int], list[bool]]], batch: int, pad_id: int, seed: int,
            replay: Sequence[tuple[list[int], list[bool]]] = (), replay_frac: float = 0.0) -> Iterator[tuple]:
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
        width = max(len(row[0]) for row in rows)
        x = torch.full((len(rows), width), pad_id, dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, scored) in enumerate(rows):
            t = torch.tensor(ids)
            x[i, :len(ids)] = t
            att[i, :len(ids)] = 1
            y[i, :len(ids)] = torch.where(torch.tensor(scored), t, -100)
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
        texts = ["".join(d) for d in docs] + ["".join(ex) for ex in ja_data + math_data]
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
