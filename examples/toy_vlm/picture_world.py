"""The toy visual world: procedurally drawn pictures of coloured shapes, with counting questions and
answers in English and Japanese.

A picture (48 x 48 pixels, dark background) holds 1-4 shapes (circle, square, triangle; red, blue, green,
yellow), one per quadrant, slightly jittered. A question asks how many shapes there are, how many of a
colour, or how many of a kind (a colour or kind the picture holds):

- "How many red shapes are there?" -> "There are 2 red shapes."
- 「赤い図形はいくつありますか？」 -> 「赤い図形は2個あります。」

Every answer opens with words that carry its language but not its content ("There are", 「赤い図形は」), then
the number, which is the same token in both languages (digits are pre-split by the tokenizer), then words
again. So the language of a reply is decided at its first token and the content at a later one: the skill
"count what is in the picture" can be the same in both languages, and a merge can take the language from
one model and the counting from another. (NOTES.md: the first versions of this world asked for colours
and shapes, answered 「赤です。」 / 「図形の色は赤です。」, and no merge produced Japanese with the right
word; the text toy world, ../toy_world/NOTES.md, found the same.) fastText lid.176 calls every Japanese
answer Japanese.

The same scene can also be written as text (``describe(scene, lang)``), which is how the text-only
models meet the world: a description in the prompt where the picture would be.

Splits: every picture is drawn from its own seeded rng, train / search / test from disjoint seed
ranges, so the search and test pictures are pictures no model was trained on (scenes -- which colours
and kinds where -- may repeat: there are 4 x 3 per quadrant).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

COLORS = {  # name -> (RGB, Japanese adjective before a noun)
    "red": ((220, 40, 40), "赤い"),
    "blue": ((40, 80, 230), "青い"),
    "green": ((40, 190, 60), "緑の"),
    "yellow": ((230, 210, 40), "黄色い"),
}
SHAPES = {"circle": ("circles", "丸"), "square": ("squares", "四角"), "triangle": ("triangles", "三角")}
KINDS = ("total", "color", "shape")
IMAGE_SIZE = 48
#: seed offsets of the splits (each picture: its own rng seeded split offset + index)
SPLIT_SEEDS = {"train": 0, "search": 1_000_000, "test": 2_000_000}


@dataclass(frozen=True)
class Scene:
    """Up to four shapes, one per quadrant: (quadrant, colour, shape, jitter x, jitter y) each."""

    shapes: tuple[tuple[int, str, str, int, int], ...]

    def count(self, color: str | None = None, shape: str | None = None) -> int:
        return sum(1 for _, c, s, _, _ in self.shapes if (color is None or c == color) and (shape is None or s == shape))


@dataclass(frozen=True)
class Question:
    kind: str  # total | color | shape
    target: str | None = None  # the colour or shape asked about


def draw_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, 4)
    cells = sorted(rng.sample(range(4), n))
    return Scene(tuple((c, rng.choice(list(COLORS)), rng.choice(list(SHAPES)), rng.randint(-3, 3), rng.randint(-3, 3))
                       for c in cells))


def pick_question(scene: Scene, rng: random.Random, kind: str | None = None) -> Question:
    """A question about ``scene`` (its colour or shape one that the picture holds)."""
    kind = kind or rng.choice(KINDS)
    if kind == "total":
        return Question("total")
    idx = 1 if kind == "color" else 2
    return Question(kind, rng.choice(sorted({s[idx] for s in scene.shapes})))


def render(scene: Scene, rng: random.Random | None = None):
    """The picture as a PIL image (a little colour noise per shape when ``rng`` is given)."""
    from PIL import Image, ImageDraw

    s = IMAGE_SIZE
    im = Image.new("RGB", (s, s), (20, 20, 28))
    d = ImageDraw.Draw(im)
    r = 7
    for cell, color, shape, jx, jy in scene.shapes:
        cx = (cell % 2) * (s // 2) + s // 4 + jx
        cy = (cell // 2) * (s // 2) + s // 4 + jy
        col = tuple(max(0, min(255, c + (rng.randint(-25, 25) if rng else 0))) for c in COLORS[color][0])
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif shape == "square":
            d.rectangle([cx - r + 1, cy - r + 1, cx + r - 1, cy + r - 1], fill=col)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r - 1), (cx + r, cy + r - 1)], fill=col)
    return im


def describe(scene: Scene, lang: str) -> str:
    """The scene as one sentence: each (colour, shape) with its count, in quadrant order."""
    groups: dict[tuple[str, str], int] = {}
    for _, c, s, _, _ in scene.shapes:
        groups[(c, s)] = groups.get((c, s), 0) + 1
    if lang == "en":
        parts = [f"{n} {c} {SHAPES[s][0] if n > 1 else s}" for (c, s), n in groups.items()]
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"In the picture: {body}."
    return "画像には" + "、".join(f"{COLORS[c][1]}{SHAPES[s][1]}が{n}個" for (c, s), n in groups.items()) + "あります。"


def _subject(q: Question, lang: str, n: int = 2) -> str:
    if q.kind == "total":
        return ("shapes" if n != 1 else "shape") if lang == "en" else "図形"
    if q.kind == "color":
        return f"{q.target} {'shapes' if n != 1 else 'shape'}" if lang == "en" else f"{COLORS[q.target][1]}図形"
    return (SHAPES[q.target][0] if n != 1 else q.target) if lang == "en" else SHAPES[q.target][1]


def question(q: Question, lang: str) -> str:
    if lang == "en":
        return f"How many {_subject(q, 'en')} are there?"
    return f"{_subject(q, 'ja')}はいくつありますか？"


def answer(scene: Scene, q: Question, lang: str) -> str:
    """``There are 2 red shapes.`` / 「赤い図形は2個あります。」: the language-bearing words first, then the
    number (the same token in both languages), then more words."""
    n = scene.count(q.target if q.kind == "color" else None, q.target if q.kind == "shape" else None)
    if lang == "en":
        return f"There {'is' if n == 1 else 'are'} {n} {_subject(q, 'en', n)}."
    return f"{_subject(q, 'ja')}は{n}個あります。"


@dataclass(frozen=True)
class Item:
    """One picture with one question (its split-local index picks the picture's seed)."""

    split: str
    index: int
    scene: Scene
    q: Question

    @property
    def kind(self) -> str:
        return self.q.kind

    def question(self, lang: str) -> str:
        return question(self.q, lang)

    def answer(self, lang: str) -> str:
        return answer(self.scene, self.q, lang)

    def image(self):
        return render(self.scene, random.Random(SPLIT_SEEDS[self.split] + self.index + 7))


def make_items(split: str, n: int) -> list[Item]:
    """``n`` pictures of ``split``, each with a question (kinds cycled, so every kind is as frequent)."""
    out = []
    for i in range(n):
        rng = random.Random(SPLIT_SEEDS[split] + i)
        scene = draw_scene(rng)
        out.append(Item(split, i, scene, pick_question(scene, rng, KINDS[i % len(KINDS)])))
    return out


def write_vqa(items: list[Item], out_dir: str | Path, lang: str, name: str | None = None) -> Path:
    """``{name}.jsonl`` (default ``{split}_{lang}``) and the pictures under ``out_dir/img/{split}/``, in
    the vqa evaluator's format (image path relative to the file)."""
    out_dir = Path(out_dir)
    lines = []
    for it in items:
        rel = Path("img") / it.split / f"{it.index:05d}.png"
        path = out_dir / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            it.image().save(path)
        lines.append(json.dumps({"image": rel.as_posix(), "question": it.question(lang), "answer": it.answer(lang),
                                 "kind": it.kind}, ensure_ascii=False))
    f = out_dir / f"{name or f'{items[0].split}_{lang}'}.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f
