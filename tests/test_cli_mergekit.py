"""mergekit-yaml's command line on ``fastmerge merge``: its flags parse and do what they say,
``--out-shard-size`` reads sizes as mergekit does (parameters) unless they carry a byte unit, and the
output holds ``mergekit_config.yml`` and a model card with mergekit's YAML header."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from fastmerge.cli import ShardParams, _size, build_parser, main
from fastmerge.engine import TOKENIZER_FILES
from fastmerge.recipe import load_recipe


def parse(*flags: str):
    return build_parser().parse_args(["merge", "r.yml", "out", *flags])


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def dare_recipe(base: Path, *models: Path) -> dict:
    return {"merge_method": "dare_ties", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in models]}


def run(*argv: str) -> int:
    return main(["merge", *map(str, argv), "--no-progress"])


@pytest.mark.parametrize("flags, expected", [
    ([], dict(seed=None, device=None, cuda=False, threads=None, no_progress=False, copy_tokenizer=True,
              write_model_card=True, allow_crimes=False, lazy_unpickle=False, low_cpu_memory=False,
              safe_serialization=True, trust_remote_code=False, transformers_cache=None, lora_merge_cache=None,
              out_shard_size=5 * 1024**3)),
    (["--random-seed", "7"], dict(seed=7)),
    (["--seed", "7"], dict(seed=7)),
    (["--cuda"], dict(cuda=True, device=None)),
    (["--no-cuda"], dict(cuda=False)),
    (["--num-threads", "3"], dict(threads=3)),
    (["-j", "2"], dict(threads=2)),
    (["--quiet"], dict(no_progress=True)),
    (["--no-copy-tokenizer"], dict(copy_tokenizer=False)),
    (["--copy-tokenizer"], dict(copy_tokenizer=True)),
    (["--no-write-model-card"], dict(write_model_card=False)),
    (["--allow-crimes", "--lazy-unpickle", "--low-cpu-memory"],
     dict(allow_crimes=True, lazy_unpickle=True, low_cpu_memory=True)),
    (["--no-allow-crimes", "--no-lazy-unpickle", "--no-low-cpu-memory"],
     dict(allow_crimes=False, lazy_unpickle=False, low_cpu_memory=False)),
    (["--safe-serialization"], dict(safe_serialization=True)),
    (["--no-safe-serialization"], dict(safe_serialization=False)),
    (["--trust-remote-code"], dict(trust_remote_code=True)),
    (["--transformers-cache", "/c", "--lora-merge-cache", "/l"], dict(transformers_cache="/c", lora_merge_cache="/l")),
    (["--out-shard-size", "5B"], dict(out_shard_size=5 * 10**9)),
])
def test_flags_parse(flags, expected):
    args = parse(*flags)
    for key, value in expected.items():
        assert getattr(args, key) == value, (flags, key)


@pytest.mark.parametrize("text, kind, value", [
    ("5B", ShardParams, 5 * 10**9), ("5b", ShardParams, 5 * 10**9), ("1M", ShardParams, 10**6),
    ("500m", ShardParams, 500 * 10**6), ("100K", ShardParams, 100_000), ("4096", ShardParams, 4096),
    ("1.5B", ShardParams, 1_500_000_000),
    ("5G", int, 5 * 1024**3), ("5GB", int, 5 * 1024**3), ("5GiB", int, 5 * 1024**3), ("1.5G", int, int(1.5 * 1024**3)),
    ("4MB", int, 4 * 1024**2), ("4mib", int, 4 * 1024**2), ("2KB", int, 2048), ("1T", int, 1024**4),
    ("1TB", int, 1024**4),
])
def test_shard_size_rule(text, kind, value):
    """mergekit's spellings (a plain number, K/M/B) are parameters; a byte unit (G, T, KB, MB, GB,
    TB, KiB, ...) is bytes, binary, as fastmerge has always read them."""
    n = _size(text)
    assert n == value and (type(n) is kind)


@pytest.mark.parametrize("text", ["0", "0B", "-1", "lots", "infG", "5X", "5 GBB", "", "nanB"])
def test_shard_size_rejects(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="expected"):
        _size(text)


def test_help_states_the_size_rule(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "5B = 5e9 parameters" in text and "bytes with a byte unit" in text
    for flag in ("--random-seed", "--cuda", "--no-copy-tokenizer", "--allow-crimes", "--lazy-unpickle",
                 "--write-model-card", "--trust-remote-code"):
        assert flag in text


def test_random_seed_is_seed(families, tmp_path):
    base, ft0, ft1 = families("llama")
    recipe = write_recipe(tmp_path / "r.yml", dare_recipe(base, ft0, ft1))
    assert run(recipe, tmp_path / "a", "--seed", "11") == 0
    assert run(recipe, tmp_path / "b", "--random-seed", "11") == 0
    assert run(recipe, tmp_path / "c", "--random-seed", "12") == 0
    a, b, c = ((tmp_path / d / "model.safetensors").read_bytes() for d in "abc")
    assert a == b and a != c


def test_cuda_without_gpu_falls_back(families, tmp_path, monkeypatch):
    base, ft0, ft1 = families("llama")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = write_recipe(tmp_path / "r.yml", dare_recipe(base, ft0, ft1))
    with pytest.warns(UserWarning, match="no CUDA GPU is present: falling back to the fused CPU path"):
        assert run(recipe, tmp_path / "gpu", "--cuda", "--seed", "3") == 0
    assert run(recipe, tmp_path / "cpu", "--seed", "3") == 0
    assert (tmp_path / "gpu" / "model.safetensors").read_bytes() == (tmp_path / "cpu" / "model.safetensors").read_bytes()


def test_explicit_device_wins_over_cuda(families, tmp_path, recwarn):
    base, ft0, ft1 = families("llama")
    recipe = write_recipe(tmp_path / "r.yml", dare_recipe(base, ft0, ft1))
    assert run(recipe, tmp_path / "out", "--cuda", "--device", "cpu") == 0
    assert not [w for w in recwarn if "CUDA" in str(w.message)]


def _with_tokenizer(model: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(model, dst)
    (dst / "tokenizer.json").write_text('{"version": "1.0"}')
    (dst / "tokenizer_config.json").write_text('{"model_max_length": 8}')
    (dst / "special_tokens_map.json").write_text("{}")
    return dst


def test_copy_tokenizer_flags(families, tmp_path):
    base, ft0, ft1 = families("llama")
    base = _with_tokenizer(base, tmp_path / "base")
    recipe = write_recipe(tmp_path / "r.yml", dare_recipe(base, ft0, ft1))
    assert run(recipe, tmp_path / "yes") == 0
    assert run(recipe, tmp_path / "yes2", "--copy-tokenizer") == 0
    assert run(recipe, tmp_path / "no", "--no-copy-tokenizer") == 0
    for d in ("yes", "yes2"):
        assert (tmp_path / d / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert not [f for f in TOKENIZER_FILES if (tmp_path / "no" / f).exists()]
    assert (tmp_path / "no" / "config.json").exists() and (tmp_path / "no" / "model.safetensors").exists()
    # as mergekit: a tokenizer the recipe names is written all the same
    named = write_recipe(tmp_path / "t.yml", {**dare_recipe(base, ft0, ft1), "tokenizer_source": str(base)})
    assert run(named, tmp_path / "named", "--no-copy-tokenizer") == 0
    assert (tmp_path / "named" / "tokenizer.json").exists()


def _wide_model(path: Path, seed: int) -> Path:
    """8 tensors of 256 x 1024 fp32 (1 MiB each, 262144 parameters)."""
    path.mkdir()
    g = torch.Generator().manual_seed(seed)
    save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(256, 1024, generator=g) for i in range(8)},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                  "num_hidden_layers": 8, "torch_dtype": "float32"}))
    return path


def _shards(out: Path) -> int:
    index = out / "model.safetensors.index.json"
    return len(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else 1


@pytest.mark.parametrize("dtype, size, shards", [
    ("float32", "1M", 3),   # 4e6 bytes: 3 tensors of 1 MiB a shard
    ("float32", "4MB", 2),  # 4 MiB: 4 a shard
    ("bfloat16", "1M", 3),  # 2e6 bytes: 3 tensors of 512 KiB a shard
    ("bfloat16", "4MB", 1),  # 4 MiB: all 8
])
def test_out_shard_size_params_vs_bytes(tmp_path, dtype, size, shards):
    a, b = _wide_model(tmp_path / "a", 0), _wide_model(tmp_path / "b", 1)
    recipe = write_recipe(tmp_path / "r.yml", {"merge_method": "linear", "dtype": dtype,
                                               "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                                          {"model": str(b), "parameters": {"weight": 0.5}}]})
    out = tmp_path / "out"
    assert run(recipe, out, "--out-shard-size", size) == 0
    assert _shards(out) == shards
    itemsize = 4 if dtype == "float32" else 2
    limit = 10**6 * itemsize if size == "1M" else 4 * 1024**2
    for f in out.glob("model*.safetensors"):
        assert f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") <= limit


def test_mergekit_config_round_trips(families, tmp_path):
    base, ft0, ft1 = families("llama")
    text = ("# my recipe\n" + yaml.safe_dump(dare_recipe(base, ft0, ft1), sort_keys=False)
            + "dtype: float32\n")
    recipe = tmp_path / "r.yml"
    recipe.write_text(text)
    assert run(recipe, tmp_path / "out") == 0
    written = tmp_path / "out" / "mergekit_config.yml"
    assert written.read_text() == text  # the recipe as given, as mergekit writes it
    assert load_recipe(written) == load_recipe(recipe)
    from mergekit.config import MergeConfiguration

    config = MergeConfiguration.model_validate(yaml.safe_load(written.read_text()))
    assert config.merge_method == "dare_ties" and len(config.models) == 2


def test_mergekit_config_from_a_dict_recipe(families, tmp_path):
    import fastmerge

    base, ft0, ft1 = families("llama")
    recipe = dare_recipe(base, ft0, ft1)
    fastmerge.merge(recipe, tmp_path / "out")
    assert load_recipe(tmp_path / "out" / "mergekit_config.yml") == load_recipe(recipe)


def test_mergekit_config_with_a_tokenizer_block_is_mergekits(families, tmp_path):
    """A validated recipe carries the block's source in tokenizer_source too; the dump writes the block
    alone (mergekit refuses both), and it reads back to the same recipe."""
    from mergekit.config import MergeConfiguration

    from fastmerge.recipe import dump_recipe

    base, ft0, ft1 = families("llama")
    recipe = load_recipe({**dare_recipe(base, ft0, ft1), "tokenizer": {"source": "base", "pad_to_multiple_of": 8}})
    assert recipe.tokenizer_source == "base"
    data = yaml.safe_load(dump_recipe(recipe))
    assert "tokenizer_source" not in data and data["tokenizer"]["source"] == "base"
    MergeConfiguration.model_validate(data)
    assert load_recipe(data) == recipe


def _header(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_header_as_mergekit(families, tmp_path):
    base, ft0, ft1 = families("llama")
    recipe = write_recipe(tmp_path / "r.yml", dare_recipe(base, ft0, ft1))
    assert run(recipe, tmp_path / "out") == 0
    card = (tmp_path / "out" / "README.md").read_text()
    header = _header(card)
    assert header["base_model"] == [str(base), str(ft0), str(ft1)]
    assert {"merge", "mergekit"} <= set(header["tags"]) and header["library_name"] == "transformers"
    assert "## Recipe" in card and "dare_ties" in card and str(ft1) in card  # fastmerge's recipe section
    from mergekit.card import generate_card
    from mergekit.config import MergeConfiguration

    theirs = _header(generate_card(MergeConfiguration.model_validate(yaml.safe_load(recipe.read_text())),
                                   recipe.read_text(), name="out"))
    assert set(theirs) == set(header) and set(theirs["tags"]) <= set(header["tags"])


def test_no_write_model_card(families, tmp_path):
    base, ft0, ft1 = families("llama")
    recipe = write_recipe(tmp_path / "r.yml", dare_recipe(base, ft0, ft1))
    assert run(recipe, tmp_path / "out", "--no-write-model-card") == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert "README.md" not in names and "mergekit_config.yml" not in names and "config.json" in names


def test_no_safe_serialization_is_one_line(families, tmp_path, capsys):
    base, ft0, ft1 = families("llama")
    recipe = write_recipe(tmp_path / "r.yml", dare_recipe(base, ft0, ft1))
    assert run(recipe, tmp_path / "out", "--no-safe-serialization") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "safetensors only" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, match", [
    (["--trust-remote-code"], "--trust-remote-code has no effect"),
    (["--transformers-cache", "/nowhere"], "--transformers-cache has no effect"),
    (["--lora-merge-cache", "/nowhere"], "--lora-merge-cache has no effect"),
])
def test_ignored_flags_warn_and_merge(families, tmp_path, flags, match):
    base, ft0, ft1 = families("llama")
    recipe = write_recipe(tmp_path / "r.yml", dare_recipe(base, ft0, ft1))
    with pytest.warns(UserWarning, match=match):
        assert run(recipe, tmp_path / "out", *flags) == 0


def test_no_op_flags_change_nothing(families, tmp_path):
    base, ft0, ft1 = families("llama")
    recipe = write_recipe(tmp_path / "r.yml", dare_recipe(base, ft0, ft1))
    assert run(recipe, tmp_path / "a") == 0
    assert run(recipe, tmp_path / "b", "--allow-crimes", "--lazy-unpickle", "--low-cpu-memory",
               "--safe-serialization", "-j", "1", "--quiet") == 0
    for name in ("model.safetensors", "config.json", "mergekit_config.yml"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
