"""The toy visual world: procedurally drawn pictures of coloured shapes, with questions and answers in
English and Japanese.

A picture (48 x 48 pixels, dark background) holds 1-4 shapes of one colour and one kind, one per
quadrant, slightly jittered. Four questions are asked about it, in either language:

- colour: "What color are the shapes?" -> "They are red." / 「図形は何色ですか？」 -> 「赤です。」
- shape: "What shape are they?" -> "They are circles." / 「どんな形ですか？」 -> 「丸です。」
- count: "How many shapes are there?" -> "There are two." / 「図形はいくつありますか？」 -> 「二つです。」
- describe: "Describe the picture." -> "There are two red circles." / 「画像を説明してください。」 -> 「赤い丸が二つあります。」

The Japanese answers are short but long enough for fastText lid.176 to call them Japanese (checked:
「赤です。」 -> ja 1.00), so the VQA metric's language gate applies to them as to real answers.

The same scene can also be written as text (``describe(scene, lang)``), which is how the text-only
models meet the world: a description in the prompt where the picture would be.

Splits: every picture is drawn from its own seeded rng, train / search / test from disjoint seed
ranges, so the search and test pictures are pictures no model was trained on (the scenes themselves --
colour, kind, count -- repeat: there are only 48).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

COLORS = {  # name -> (RGB, Japanese adjective before a noun, Japanese noun for "what colour")
    "red": ((220, 40, 40), "赤い", "赤"),
    "blue": ((40, 80, 230), "青い", "青"),
    "green": ((40, 190, 60), "緑の", "緑"),
    "yellow": ((230, 210, 40), "黄色い", "黄色"),
}
SHAPES = {"circle": ("circles", "丸"), "square": ("squares", "四角"), "triangle": ("triangles", "三角")}
COUNTS_EN = {1: "one", 2: "two", 3: "three", 4: "four"}
COUNTS_JA = {1: "一つ", 2: "二つ", 3: "三つ", 4: "四つ"}
KINDS = ("color", "shape", "count", "describe")
IMAGE_SIZE = 48
QUESTIONS = {
    "en": {"color": "What color are the shapes?", "shape": "What shape are they?",
           "count": "How many shapes are there?", "describe": "Describe the picture."},
    "ja": {"color": "図形は何色ですか？", "shape": "どんな形ですか？",
           "count": "図形はいくつありますか？", "describe": "画像を説明してください。"},
}
#: seed offsets of the splits (each picture: its own rng seeded split offset + index)
SPLIT_SEEDS = {"train": 0, "search": 1_000_000, "test": 2_000_000}


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    count: int
    cells: tuple[int, ...]  # which quadrants (0-3) hold a shape
    jitter: tuple[tuple[int, int], ...]  # per shape, pixel offset from its quadrant's centre


def draw_scene(rng: random.Random) -> Scene:
    count = rng.randint(1, 4)
    cells = tuple(sorted(rng.sample(range(4), count)))
    jitter = tuple((rng.randint(-3, 3), rng.randint(-3, 3)) for _ in cells)
    return Scene(rng.choice(list(COLORS)), rng.choice(list(SHAPES)), count, cells, jitter)


def render(scene: Scene, rng: random.Random | None = None):
    """The picture as a PIL image (a little colour noise per shape when ``rng`` is given)."""
    from PIL import Image, ImageDraw

    s = IMAGE_SIZE
    im = Image.new("RGB", (s, s), (20, 20, 28))
    d = ImageDraw.Draw(im)
    r = 7
    rgb = COLORS[scene.color][0]
    for cell, (jx, jy) in zip(scene.cells, scene.jitter):
        cx = (cell % 2) * (s // 2) + s // 4 + jx
        cy = (cell // 2) * (s // 2) + s // 4 + jy
        col = tuple(max(0, min(255, c + (rng.randint(-25, 25) if rng else 0))) for c in rgb)
        if scene.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif scene.shape == "square":
            d.rectangle([cx - r + 1, cy - r + 1, cx + r - 1, cy + r - 1], fill=col)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r - 1), (cx + r, cy + r - 1)], fill=col)
    return im


def describe(scene: Scene, lang: str) -> str:
    """The scene as one sentence (what the describe question's answer says)."""
    if lang == "en":
        noun = SHAPES[scene.shape][0] if scene.count > 1 else scene.shape
        article = COUNTS_EN[scene.count] if scene.count > 1 else "one"
        verb = "are" if scene.count > 1 else "is"
        return f"There {verb} {article} {scene.color} {noun}."
    return f"{COLORS[scene.color][1]}{SHAPES[scene.shape][1]}が{COUNTS_JA[scene.count]}あります。"


def answer(scene: Scene, kind: str, lang: str) -> str:
    if kind == "describe":
        return describe(scene, lang)
    if lang == "en":
        plural = scene.count > 1
        if kind == "color":
            return f"{'They are' if plural else 'It is'} {scene.color}."
        if kind == "shape":
            return f"{'They are' if plural else 'It is a'} {SHAPES[scene.shape][0] if plural else scene.shape}."
        return f"There {'are' if plural else 'is'} {COUNTS_EN[scene.count]}."
    if kind == "color":
        return f"{COLORS[scene.color][2]}です。"
    if kind == "shape":
        return f"{SHAPES[scene.shape][1]}です。"
    return f"{COUNTS_JA[scene.count]}です。"


@dataclass(frozen=True)
class Item:
    """One picture with one question (its split-local index picks the picture's seed)."""

    split: str
    index: int
    scene: Scene
    kind: str

    def question(self, lang: str) -> str:
        return QUESTIONS[lang][self.kind]

    def answer(self, lang: str) -> str:
        return answer(self.scene, self.kind, lang)

    def image(self):
        return render(self.scene, random.Random(SPLIT_SEEDS[self.split] + self.index + 7))


def make_items(split: str, n: int) -> list[Item]:
    """``n`` pictures of ``split``, each with a question kind (cycled, so every kind is as frequent)."""
    out = []
    for i in range(n):
        rng = random.Random(SPLIT_SEEDS[split] + i)
        out.append(Item(split, i, draw_scene(rng), KINDS[i % len(KINDS)]))
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
