"""The bundled default job (until the evolve demo lands): merge locally generated tiny models.

Builds a tiny Llama family (a base and three "fine-tunes") under ``examples/tiny_merge/work``
(cached), merges it with each recipe in ``examples/recipes`` through the ``fastmerge`` CLI, loads
every result back with transformers and greedily generates a few tokens. Offline, CPU, ~1 minute.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
RECIPES = HERE.parent / "recipes"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=HERE / "work", help="where models and merges go")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from fastmerge.synth import ModelSpec, make_family

    models = args.work / "models"
    if not (models / "ft2" / "config.json").exists():
        print(f"building a tiny Llama family in {models} ...")
        spec = ModelSpec(arch="llama", hidden=args.hidden, layers=args.layers, vocab=1024, dtype=torch.bfloat16)
        make_family(models, spec, finetunes=3, shard_size="2MB")
    for recipe_path in sorted(RECIPES.glob("tiny_*.yml")):
        text = recipe_path.read_text().replace("MODELS", str(models))
        recipe = args.work / recipe_path.name
        recipe.write_text(text)
        out = args.work / "merged" / recipe_path.stem
        method = yaml.safe_load(text)["merge_method"]
        print(f"\n== {recipe_path.name}: {method}")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fastmerge", "merge", str(recipe), str(out), "--force"], check=True)
        model = AutoModelForCausalLM.from_pretrained(out)
        ids = torch.tensor([[1, 17, 42, 7]])
        gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        print(f"loaded with transformers ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
              f"greedy tokens: {gen[0, 4:].tolist()}  [{time.perf_counter() - t:.1f} s]")
    print(f"\nmerged checkpoints are in {args.work / 'merged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
