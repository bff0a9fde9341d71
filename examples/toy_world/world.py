"""The toy world: grade-school math word problems in English and Japanese, with step-by-step solutions.

This is the miniature of MGSM (the paper's benchmark). Every problem is one *template* (prices,
quantities, rates, multi-step) filled with small numbers, and can be rendered in English or in
Japanese. Solutions are written the same way in both languages so that a merge can combine skills:

    <header in the language>                   "Let's work it out." / "順番に計算します。"
    <one equation per line, language-neutral>  e.g. "3 × 4 = 12"
    <conclusion sentence in the language>      e.g. "So Tom spends 12 dollars." / "太郎が使ったお金は12円です。"
    <answer line in the language>              "Answer: 12" / "答え: 12"

The language is chosen once, by the header, before any number; the arithmetic is written the same in
both languages, so an English math model's skill applies to Japanese questions token for token; the
conclusion follows the header's language (fastText lid.176 reads bare equations as "en", which is why
the sentences are there). The last number of a solution is always its answer.

Splits are disjoint by the *underlying problem* -- the key (template, numbers) -- not by the rendered
text: a test problem never shares its numbers and template with a train or search problem in either
language, whatever the names and items. The key space of each template is shuffled with the seed and
cut into train / search / test fractions, then problems are drawn from each part.

Besides problems, the world provides the other text the tiny models are trained on (see train.py):
arithmetic facts (``"7 × 8 = 56"``), English/Japanese "stories" with look-up questions whose answer is
stated in the text (non-math Japanese chat, for the Japanese model), and parallel EN/JA pairs.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: the zero-shot prompt every model is trained and evaluated with (language-neutral on purpose: the
#: question alone tells which language to answer in, as in MGSM-JA)
PROMPT_TEMPLATE = "Q: {question}\nA: "
LANGS = ("en", "ja")
SPLITS = ("train", "search", "test")
#: fractions of each template's key space given to each split
SPLIT_FRACTIONS = {"train": 0.7, "search": 0.15, "test": 0.15}
#: default number of problems per split and language
DEFAULT_SIZES = {"train": 3000, "search": 100, "test": 300}


@dataclass(frozen=True)
class Item:
    """A countable thing: English singular/plural, Japanese word and its counter (個, 本, 冊, 枚)."""

    en: str
    en_pl: str
    ja: str
    counter: str


NAMES_EN = ("Tom", "Emma", "Ken", "Lucy", "Sam", "Mia", "Ben", "Amy")
NAMES_JA = ("太郎", "花子", "健太", "さくら", "翔太", "美咲", "大輝", "結衣")
ITEMS = (
    Item("apple", "apples", "りんご", "個"),
    Item("pencil", "pencils", "鉛筆", "本"),
    Item("notebook", "notebooks", "ノート", "冊"),
    Item("candy", "candies", "あめ", "個"),
    Item("egg", "eggs", "卵", "個"),
    Item("cookie", "cookies", "クッキー", "枚"),
    Item("sticker", "stickers", "シール", "枚"),
    Item("banana", "bananas", "バナナ", "本"),
)
MOVERS = (("turtle", "カメ"), ("robot", "ロボット"), ("toy car", "おもちゃの車"), ("snail", "カタツムリ"))


@dataclass(frozen=True)
class Step:
    """One arithmetic operation of a solution: ``a op b = result``."""

    a: int
    op: str
    b: int

    @property
    def result(self) -> int:
        """The exact value (division in this world always divides evenly)."""
        if self.op == "+":
            return self.a + self.b
        if self.op == "-":
            return self.a - self.b
        if self.op == "×":
            return self.a * self.b
        if self.op == "÷":
            q, r = divmod(self.a, self.b)
            assert r == 0, f"{self.a} ÷ {self.b} does not divide"
            return q
        raise ValueError(f"unknown op {self.op!r}")

    def render(self) -> str:
        return f"{self.a} {self.op} {self.b} = {self.result}"


@dataclass(frozen=True)
class Problem:
    """One rendered problem. ``key`` identifies the underlying problem (template + numbers)."""

    template: str
    lang: str
    question: str
    solution: str
    answer: int
    numbers: tuple[int, ...]
    names: tuple[int, ...] = field(default=(), compare=False)

    @property
    def key(self) -> tuple:
        return (self.template, *self.numbers)

    def to_json(self) -> dict:
        """The record the evaluators read: ``question`` and numeric ``answer`` (+ context fields)."""
        d = asdict(self)
        d["numbers"] = list(self.numbers)
        del d["names"]
        return d


@dataclass(frozen=True)
class Template:
    """A problem family: its number space, its steps, and its two renderings."""

    name: str
    keys: Callable[[], list[tuple[int, ...]]]
    steps: Callable[[tuple[int, ...]], list[Step]]
    #: render(lang, numbers, rng) -> (question, conclusion with an {ans} slot, indices of chosen names/items)
    render: Callable[[str, tuple[int, ...], random.Random], tuple[str, str, tuple[int, ...]]]


def _rng_pick(rng: random.Random, seq: Sequence, k: int = 1) -> list[int]:
    return rng.sample(range(len(seq)), k)


def _who_what(rng: random.Random, n_items: int = 1) -> tuple[int, list[int]]:
    return rng.randrange(len(NAMES_EN)), _rng_pick(rng, ITEMS, n_items)


# --- templates -----------------------------------------------------------------------------------
R2_9 = range(2, 10)


def _price_render(lang: str, nums: tuple[int, ...], rng: random.Random):
    a, p = nums
    n, (i,) = _who_what(rng)
    it = ITEMS[i]
    if lang == "en":
        N = NAMES_EN[n]
        q = f"{N} buys {a} {it.en_pl} that cost {p} dollars each. How many dollars does {N} spend?"
        return q, f"So {N} spends {{ans}} dollars.", (n, i)
    N = NAMES_JA[n]
    q = f"{N}は{it.ja}を{a}{it.counter}買いました。{it.ja}は1{it.counter}{p}円です。全部で何円使いましたか?"
    return q, f"{N}が使ったお金は{{ans}}円です。", (n, i)


def _change_render(lang: str, nums: tuple[int, ...], rng: random.Random):
    a, p, m = nums
    n, (i,) = _who_what(rng)
    it = ITEMS[i]
    if lang == "en":
        N = NAMES_EN[n]
        q = (f"{N} buys {a} {it.en_pl} at {p} dollars each and pays with {m} dollars. "
             f"How many dollars of change does {N} get?")
        return q, "So the change is {ans} dollars.", (n, i)
    N = NAMES_JA[n]
    q = f"{N}は{it.ja}を{a}{it.counter}買いました。{it.ja}は1{it.counter}{p}円です。{m}円払うと、おつりは何円ですか?"
    return q, "おつりは{ans}円です。", (n, i)


def _quantity_render(lang: str, nums: tuple[int, ...], rng: random.Random):
    a, b, c = nums
    n, (i,) = _who_what(rng)
    it = ITEMS[i]
    if lang == "en":
        N = NAMES_EN[n]
        q = (f"{N} has {a} {it.en_pl}. {N} gets {b} more and then gives {c} to a friend. "
             f"How many {it.en_pl} does {N} have now?")
        return q, f"So {N} has {{ans}} {it.en_pl} now.", (n, i)
    N = NAMES_JA[n]
    k = it.counter
    q = f"{N}は{it.ja}を{a}{k}持っています。{b}{k}もらって、友だちに{c}{k}あげました。{N}の{it.ja}は今何{k}ですか?"
    return q, f"{N}の{it.ja}は今{{ans}}{k}です。", (n, i)


def _distance_render(lang: str, nums: tuple[int, ...], rng: random.Random):
    s, h = nums
    v = rng.randrange(len(MOVERS))
    if lang == "en":
        q = f"A {MOVERS[v][0]} moves {s} meters every minute. How many meters does it move in {h} minutes?"
        return q, f"So the {MOVERS[v][0]} moves {{ans}} meters.", (v,)
    q = f"{MOVERS[v][1]}は1分に{s}メートル進みます。{h}分では何メートル進みますか?"
    return q, f"{MOVERS[v][1]}は{{ans}}メートル進みます。", (v,)


def _fill_render(lang: str, nums: tuple[int, ...], rng: random.Random):
    r, q_ = nums
    t = r * q_
    if lang == "en":
        q = f"A tap fills {r} liters of water every minute. How many minutes does it take to fill a tank of {t} liters?"
        return q, "So it takes {ans} minutes.", ()
    q = f"じゃぐちから1分に{r}リットルの水が出ます。{t}リットルのタンクをいっぱいにするには何分かかりますか?"
    return q, "{ans}分かかります。", ()


def _share_render(lang: str, nums: tuple[int, ...], rng: random.Random):
    k, q_ = nums
    a = k * q_
    n, (i,) = _who_what(rng)
    it = ITEMS[i]
    if lang == "en":
        N = NAMES_EN[n]
        q = (f"{N} has {a} {it.en_pl} and shares them equally among {k} friends. "
             f"How many {it.en_pl} does each friend get?")
        return q, f"So each friend gets {{ans}} {it.en_pl}.", (n, i)
    N = NAMES_JA[n]
    c = it.counter
    q = f"{N}は{it.ja}を{a}{c}持っていて、{k}人の友だちに同じ数ずつ分けます。1人何{c}もらえますか?"
    return q, f"1人{{ans}}{c}もらえます。", (n, i)


def _boxes_render(lang: str, nums: tuple[int, ...], rng: random.Random):
    b, k, x = nums
    n, (i,) = _who_what(rng)
    it = ITEMS[i]
    if lang == "en":
        N = NAMES_EN[n]
        q = (f"{N} has {b} boxes with {k} {it.en_pl} in each box and {x} more {it.en_pl} outside the boxes. "
             f"How many {it.en_pl} does {N} have in all?")
        return q, f"So {N} has {{ans}} {it.en_pl} in all.", (n, i)
    N = NAMES_JA[n]
    c = it.counter
    q = (f"{N}は箱を{b}箱持っていて、1箱に{it.ja}が{k}{c}ずつ入っています。箱の外にも{it.ja}が{x}{c}あります。"
         f"{it.ja}は全部で何{c}ありますか?")
    return q, f"{it.ja}は全部で{{ans}}{c}あります。", (n, i)


def _two_items_render(lang: str, nums: tuple[int, ...], rng: random.Random):
    a, p, b, q_ = nums
    n, (i, j) = _who_what(rng, 2)
    x, y = ITEMS[i], ITEMS[j]
    if lang == "en":
        N = NAMES_EN[n]
        q = (f"{N} buys {a} {x.en_pl} at {p} dollars each and {b} {y.en_pl} at {q_} dollars each. "
             f"How many dollars does {N} spend in all?")
        return q, f"So {N} spends {{ans}} dollars in all.", (n, i, j)
    N = NAMES_JA[n]
    q = (f"{N}は{x.ja}を{a}{x.counter}と{y.ja}を{b}{y.counter}買いました。"
         f"{x.ja}は1{x.counter}{p}円、{y.ja}は1{y.counter}{q_}円です。全部で何円使いましたか?")
    return q, f"{N}が使ったお金は全部で{{ans}}円です。", (n, i, j)


def _grid(*ranges: Iterable[int], ok: Callable[..., bool] = lambda *a: True) -> Callable[[], list[tuple[int, ...]]]:
    def keys() -> list[tuple[int, ...]]:
        out: list[tuple[int, ...]] = [()]
        for r in ranges:
            out = [k + (v,) for k in out for v in r]
        return [k for k in out if ok(*k)]
    return keys


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    # prices
    Template("price", _grid(R2_9, R2_9), lambda n: [Step(n[0], "×", n[1])], _price_render),
    Template("change", _grid(range(2, 6), R2_9, (20, 50), ok=lambda a, p, m: a * p < m),
             lambda n: [Step(n[0], "×", n[1]), Step(n[2], "-", n[0] * n[1])], _change_render),
    # quantities
    Template("quantity", _grid(range(5, 21), R2_9, R2_9, ok=lambda a, b, c: c < a + b),
             lambda n: [Step(n[0], "+", n[1]), Step(n[0] + n[1], "-", n[2])], _quantity_render),
    Template("share", _grid(R2_9, R2_9), lambda n: [Step(n[0] * n[1], "÷", n[0])], _share_render),
    # rates
    Template("distance", _grid(R2_9, R2_9), lambda n: [Step(n[0], "×", n[1])], _distance_render),
    Template("fill", _grid(R2_9, R2_9), lambda n: [Step(n[0] * n[1], "÷", n[0])], _fill_render),
    # multi-step
    Template("boxes", _grid(R2_9, R2_9, range(1, 10)),
             lambda n: [Step(n[0], "×", n[1]), Step(n[0] * n[1], "+", n[2])], _boxes_render),
    Template("two_items", _grid(range(2, 6), range(2, 6), range(2, 6), range(2, 6)),
             lambda n: [Step(n[0], "×", n[1]), Step(n[2], "×", n[3]), Step(n[0] * n[1], "+", n[2] * n[3])],
             _two_items_render),
)}

ANSWER_WORD = {"en": "Answer", "ja": "答え"}
#: the first line of every solution: it carries the language before any number, so that the equations
#: that follow are the same tokens in both languages and the conclusion follows the header's language
HEADER = {"en": "Let's work it out.", "ja": "順番に計算します。"}


def render(template: str, numbers: tuple[int, ...], lang: str, rng: random.Random) -> Problem:
    """Render one underlying problem in one language (names/items drawn from rng)."""
    t = TEMPLATES[template]
    steps = t.steps(numbers)
    question, conclusion, names = t.render(lang, numbers, rng)
    answer = steps[-1].result
    lines = [HEADER[lang], *(s.render() for s in steps), conclusion.format(ans=answer),
             f"{ANSWER_WORD[lang]}: {answer}"]
    return Problem(template, lang, question, "\n".join(lines), answer, tuple(numbers), names)


def render_pair(template: str, numbers: tuple[int, ...], rng: random.Random) -> tuple[Problem, Problem]:
    """The same problem in English and Japanese, with the same names and items (a parallel pair)."""
    state = rng.getstate()
    en = render(template, numbers, "en", rng)
    rng.setstate(state)
    ja = render(template, numbers, "ja", rng)
    return en, ja


def _stable_shuffle(keys: list[tuple], seed: int) -> list[tuple]:
    """Shuffle by a hash of (seed, key): independent of Python's hash seed and of list order."""
    def h(k: tuple) -> bytes:
        return hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest()
    return sorted(keys, key=h)


def split_keys(seed: int = 0) -> dict[str, dict[str, list[tuple[int, ...]]]]:
    """{split: {template: [numbers, ...]}}: each template's key space cut into disjoint parts."""
    out: dict[str, dict[str, list[tuple[int, ...]]]] = {s: {} for s in SPLITS}
    for name, t in TEMPLATES.items():
        keys = _stable_shuffle(t.keys(), seed)
        n_test = max(2, round(len(keys) * SPLIT_FRACTIONS["test"]))
        n_search = max(2, round(len(keys) * SPLIT_FRACTIONS["search"]))
        out["test"][name] = keys[:n_test]
        out["search"][name] = keys[n_test:n_test + n_search]
        out["train"][name] = keys[n_test + n_search:]
    return out


def make_splits(seed: int = 0, sizes: dict[str, int] | None = None,
                langs: Sequence[str] = LANGS) -> dict[str, list[Problem]]:
    """{"train"|"search"|"test": problems}, ``sizes[split]`` problems per language, templates balanced.

    Disjoint by underlying problem (template, numbers); deterministic for a seed. Within a split, the
    EN and JA problems are drawn independently (so the JA test set is not a translation of the EN one).
    """
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    keys = split_keys(seed)
    out: dict[str, list[Problem]] = {}
    for split in SPLITS:
        rng = random.Random(f"{seed}:{split}")
        probs: list[Problem] = []
        for lang in langs:
            names = list(TEMPLATES)
            for i in range(sizes[split]):
                tname = names[i % len(names)]
                nums = rng.choice(keys[split][tname])
                probs.append(render(tname, nums, lang, rng))
        out[split] = probs
    return out


# --- other text: arithmetic facts, stories with look-up questions, parallel pairs ------------------

def arithmetic_fact(rng: random.Random) -> str:
    """One language-neutral fact such as ``"7 × 8 = 56"``, over the ranges the templates use."""
    op = rng.choice("+-×÷")
    if op == "×":
        s = Step(rng.randint(1, 12), op, rng.randint(1, 12))
    elif op == "÷":
        b, q = rng.randint(1, 12), rng.randint(1, 12)
        s = Step(b * q, op, b)
    elif op == "+":
        a = rng.randint(0, 90)
        s = Step(a, op, rng.randint(0, min(30, 100 - a)))
    else:
        a = rng.randint(0, 100)
        s = Step(a, op, rng.randint(0, a) if a <= 30 else rng.randint(0, 30) if rng.random() < 0.5 else rng.randint(0, a))
    return s.render()


@dataclass(frozen=True)
class LookupQA:
    """A short story stating a few counts, and a question whose answer is stated in it (no arithmetic).

    It is the Japanese model's "chat" data: it learns to read a Japanese question and reply in Japanese
    ("<restated fact>\\n答え: N"), without ever being shown how to compute anything.
    """

    lang: str
    question: str
    response: str
    answer: int


def lookup_qa(rng: random.Random, lang: str) -> LookupQA:
    k = rng.randint(2, 3)
    people = rng.sample(range(len(NAMES_EN)), k)
    items = [rng.randrange(len(ITEMS)) for _ in range(k)]
    counts = [rng.randint(1, 99) for _ in range(k)]
    facts = []
    for p, i, c in zip(people, items, counts):
        it = ITEMS[i]
        facts.append(f"{NAMES_EN[p]} has {c} {it.en_pl if c != 1 else it.en}." if lang == "en"
                     else f"{NAMES_JA[p]}は{it.ja}を{c}{it.counter}持っています。")
    j = rng.randrange(k)
    p, it, c = people[j], ITEMS[items[j]], counts[j]
    if lang == "en":
        q = " ".join(facts) + f" How many {it.en_pl} does {NAMES_EN[p]} have?"
        r = f"{facts[j]}\n{ANSWER_WORD['en']}: {c}"
    else:
        q = "".join(facts) + f"{NAMES_JA[p]}は{it.ja}を何{it.counter}持っていますか?"
        r = f"{facts[j]}\n{ANSWER_WORD['ja']}: {c}"
    return LookupQA(lang, q, r, c)


def lookup_qa_pair(rng: random.Random) -> tuple[LookupQA, LookupQA]:
    """The same look-up question in English and in Japanese (same people, items and counts)."""
    state = rng.getstate()
    en = lookup_qa(rng, "en")
    rng.setstate(state)
    return en, lookup_qa(rng, "ja")


def prompt(question: str) -> str:
    """The zero-shot prompt for a question (see PROMPT_TEMPLATE)."""
    return PROMPT_TEMPLATE.format(question=question)


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    """Write problems as JSON lines (``question``, ``answer``, ``solution``, ``lang``, ``template``, ...)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_splits(out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write ``{split}_{lang}.jsonl`` for every split and language; returns {"test_ja": path, ...}."""
    out_dir = Path(out_dir)
    splits = make_splits(seed, sizes)
    paths = {}
    for split, probs in splits.items():
        for lang in LANGS:
            paths[f"{split}_{lang}"] = write_jsonl([p for p in probs if p.lang == lang], out_dir / f"{split}_{lang}.jsonl")
    return paths


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write the toy world's splits as JSONL.")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name, path in write_splits(args.out_dir, args.seed).items():
        print(f"{name}: {path}")
