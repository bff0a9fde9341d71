"""The README's code runs as written.

Every ```python block runs, in order, in one namespace, in a directory holding what the README
names (`recipe.yml` over local models, `model_a` / `model_b` with a tokenizer). Every `fastmerge`
command line of a ```bash block either runs for real (after `make merge-demo`'s script built what
it names) or, where it is a synopsis (`[--flag]`, upper-case placeholders), parses: its subcommand
exists and each of its flags is one the CLI takes. Every `make TARGET` names a Makefile target.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fastmerge.cli import build_parser, main
from fastmerge.synth import ModelSpec, make_family

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
PLACEHOLDER = re.compile(r"\[|\b[A-Z]{2,}[A-Z_]*\b")


def blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README.read_text()) if kind == lang]


def command_lines(prefix: str) -> list[str]:
    lines = []
    for body in blocks("bash"):
        for line in body.splitlines():
            line = line.split("  #", 1)[0].split(" # ", 1)[0].strip()
            if line.startswith(prefix + " "):
                lines.append(line)
    return lines


def _tokenizer(directory: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


@pytest.fixture
def readme_dir(tmp_path, monkeypatch):
    """What the README's Python names: recipe.yml over base + model_a + model_b, with tokenizers."""
    spec = ModelSpec(arch="llama", hidden=32, layers=4, vocab=64, dtype=torch.float32)
    base, a, b = make_family(tmp_path / "family", spec, finetunes=2)
    for src, name in ((a, "model_a"), (b, "model_b")):
        src.rename(tmp_path / name)
        _tokenizer(tmp_path / name, 64)
    _tokenizer(base, 64)
    recipe = {"merge_method": "dare_ties", "base_model": str(base), "dtype": "float32",
              "models": [{"model": "model_a", "parameters": {"weight": 0.6, "density": 0.5}},
                         {"model": "model_b", "parameters": {"weight": 0.9, "density": 0.7}}]}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_python_and_bash():
    assert len(blocks("python")) >= 3 and command_lines("fastmerge") and command_lines("make")


def test_python_blocks_run(readme_dir):
    namespace: dict = {"__name__": "__readme__"}
    for i, body in enumerate(blocks("python")):
        try:
            exec(compile(body, f"README.md python block {i}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001 -- say which block failed
            pytest.fail(f"README python block {i} failed: {type(e).__name__}: {e}\n{body}")
    # what the blocks promise: a merged checkpoint, a DFS export that loads with its tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (readme_dir / "out" / "config.json").exists()
    exported = [p for p in readme_dir.iterdir() if p.is_dir() and (p / "config.json").exists()
                and "fastmerge_path" in (p / "config.json").read_text()]
    assert exported, "the DFS block exported nothing"
    AutoModelForCausalLM.from_pretrained(exported[0])
    AutoTokenizer.from_pretrained(exported[0])


def _flags(parser, words: list[str]) -> set[str]:
    """The option strings the subcommand named by ``words`` (e.g. ["dfs", "export"]) accepts."""
    for word in words:
        sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = sub.choices[word]
    return {s for a in parser._actions for s in a.option_strings}


def test_bash_synopses_name_real_flags():
    parser = build_parser()
    checked = 0
    for line in command_lines("fastmerge"):
        words = shlex.split(line.replace("[", " ").replace("]", " ").replace("|", " "))[1:]
        sub = [w for w in words[:2] if not w.startswith("-") and w in ("merge", "dfs", "export", "eval", "evolve")]
        flags = {w.split("=", 1)[0] for w in words if w.startswith("--")}
        unknown = flags - _flags(parser, sub)
        assert not unknown, f"README: `{line}` uses flags the CLI does not take: {sorted(unknown)}"
        checked += 1
    assert checked


def test_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for line in command_lines("make"):
        assert line.split()[1] in targets, f"README: `{line}` is not a Makefile target"


def test_runnable_bash_lines_run(tmp_path, monkeypatch):
    """`fastmerge` lines without placeholders run for real, after the script `make merge-demo` runs
    (examples/tiny_merge/run.py) wrote the recipes they name."""
    runnable = [line for line in command_lines("fastmerge") if not PLACEHOLDER.search(line)]
    assert runnable, "the README shows no concrete command"
    work = tmp_path / "examples" / "tiny_merge" / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "tiny_merge" / "run.py"), "--work", str(work),
                           "--hidden", "64"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    monkeypatch.chdir(tmp_path)
    for line in runnable:
        assert main(shlex.split(line)[1:] + ["--no-progress"]) == 0, line


def test_vlm_recipe_runs(tmp_path):
    """The "Merging a VLM's language model" recipe runs as written, over local stand-ins for the
    paper's models (a tiny LLaVA, a text fine-tune, their text base), and gives a loadable VLM."""
    from transformers import AutoModelForImageTextToText

    from fastmerge.synth_vlm import make_vlm_family

    section = README.read_text().split("### Merging a VLM's language model", 1)[1]
    recipe_text = BLOCK.findall(section)[0]
    assert recipe_text[0] == "yaml"
    fam = make_vlm_family(tmp_path / "fam")
    stand_ins = {"mistralai/Mistral-7B-v0.1": fam["base"], "llava-hf/llava-v1.6-mistral-7b-hf": fam["vlm"],
                 "augmxnt/shisa-gamma-7b-v1": fam["text"][0]}
    text = recipe_text[1]
    for hub_id, local in stand_ins.items():
        assert hub_id in text, hub_id
        text = text.replace(hub_id, str(local))
    (tmp_path / "vlm.yml").write_text(text)
    assert main(["merge", str(tmp_path / "vlm.yml"), str(tmp_path / "out"), "--no-progress"]) == 0
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
