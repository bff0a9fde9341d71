"""Bad input gets one clear line naming the file and tensor, and nothing is left half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import fastmerge
from fastmerge import FastmergeError, MergeOptions
from fastmerge.cli import main

NAME = "model.layers.1.mlp.up_proj.weight"


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_of(model: Path, name: str) -> Path:
    index = json.loads((model / "model.safetensors.index.json").read_text())
    return model / index["weight_map"][name]


def edit_shard(model: Path, edit) -> Path:
    """Rewrite the shard holding NAME after ``edit(tensors)`` changed its tensor dict."""
    shard = shard_of(model, NAME)
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    return shard


def ta_recipe(base: Path, *models: Path) -> dict:
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in models]}


def merge_fails(recipe: dict, out: Path, match: str) -> None:
    """The merge raises a FastmergeError matching ``match`` and leaves nothing at or beside ``out``."""
    with pytest.raises(FastmergeError, match=match):
        fastmerge.merge(recipe, out)
    assert_clean(out)


def assert_clean(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.fastmerge-*")), "temporary directory left behind"


@pytest.fixture
def fam(families, tmp_path):
    base, ft0, ft1 = families("llama")
    return base, copy_model(ft0, tmp_path / "ft0"), ft1


def test_missing_model(fam, tmp_path):
    base, ft0, _ = fam
    merge_fails(ta_recipe(base, ft0, tmp_path / "nope"), tmp_path / "out", r"nope: model not found")


def test_missing_tensor_in_one_source(fam, tmp_path):
    base, ft0, ft1 = fam
    shard = edit_shard(ft0, lambda t: t.pop(NAME))
    index_path = ft0 / "model.safetensors.index.json"
    merge_fails(ta_recipe(base, ft0, ft1), tmp_path / "out", rf"{shard.name}: tensor {NAME} listed in .* is missing")
    index = json.loads(index_path.read_text())
    del index["weight_map"][NAME]
    index_path.write_text(json.dumps(index))
    merge_fails(ta_recipe(base, ft0, ft1), tmp_path / "out", rf"ft0: tensor {NAME} is missing")


def test_shape_mismatch(fam, tmp_path):
    base, ft0, ft1 = fam
    shard = edit_shard(ft0, lambda t: t.update({NAME: t[NAME][:, :-1].contiguous()}))
    merge_fails(ta_recipe(base, ft0, ft1), tmp_path / "out", rf"{shard.name}: tensor {NAME} has shape \[176, 63\], but .*base has \[176, 64\]")


def test_truncated_shard(fam, tmp_path):
    base, ft0, ft1 = fam
    shard = shard_of(ft0, NAME)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    merge_fails(ta_recipe(base, ft0, ft1), tmp_path / "out", rf"{shard.name}: truncated shard: tensor .* ends at byte")


def test_corrupt_header(fam, tmp_path):
    base, ft0, ft1 = fam
    shard = shard_of(ft0, NAME)
    data = bytearray(shard.read_bytes())
    data[10:20] = b"\xff" * 10
    shard.write_bytes(bytes(data))
    merge_fails(ta_recipe(base, ft0, ft1), tmp_path / "out", rf"{shard.name}: unreadable safetensors header")
    shard.write_bytes(b"\x00\x01")
    merge_fails(ta_recipe(base, ft0, ft1), tmp_path / "out", rf"{shard.name}: truncated safetensors file")


def test_nonfinite_inputs_warn_with_counts(fam, tmp_path):
    base, ft0, ft1 = fam

    def poison(tensors):
        tensors[NAME][0, :3] = float("nan")
        tensors[NAME][1, 0] = float("inf")

    shard = edit_shard(ft0, poison)
    with pytest.warns(UserWarning, match=rf"{shard.name}: tensor {NAME}: 4 non-finite values"):
        res = fastmerge.merge(ta_recipe(base, ft0, ft1), tmp_path / "out")
    assert list(res.nonfinite.values()) == [4]


def test_interrupted_merge_leaves_nothing(fam, tmp_path):
    base, ft0, ft1 = fam
    out = tmp_path / "out"

    def interrupt(ev):
        if ev.tensors_done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fastmerge.merge(ta_recipe(base, ft0, ft1), out, progress=interrupt)
    assert_clean(out)


def test_failure_keeps_existing_output(fam, tmp_path, monkeypatch):
    """--force replaces an old output only once the new one is complete."""
    base, ft0, ft1 = fam
    out = tmp_path / "out"
    fastmerge.merge(ta_recipe(base, ft0, ft1), out)
    before = sorted(p.name for p in out.iterdir())

    from fastmerge import io

    def disk_full(self, name, *args):
        raise OSError(28, "No space left on device")

    # fused tensors are merged into the mapped shard, the others written with pwrite: both fail
    monkeypatch.setattr(io.ShardedWriter, "write", disk_full)
    monkeypatch.setattr(io.ShardedWriter, "map_out", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fastmerge.merge(ta_recipe(base, ft0, ft1), out, MergeOptions(force=True))
    assert sorted(p.name for p in out.iterdir()) == before
    assert not list(tmp_path.glob(".out.fastmerge-*"))


def test_full_disk_is_an_error_before_the_merge(fam, tmp_path, monkeypatch):
    """The output shards' blocks are reserved up front: no space is a one-line error naming the
    shard, and nothing is left behind."""
    import errno

    base, ft0, ft1 = fam
    from fastmerge import io

    monkeypatch.setattr(io, "_fallocate", lambda fd, size: errno.ENOSPC)
    merge_fails(ta_recipe(base, ft0, ft1), tmp_path / "out", r"model\.safetensors: cannot reserve .* No space left")
    monkeypatch.setattr(io, "_fallocate", lambda fd, size: errno.EOPNOTSUPP)  # a filesystem without it: fine
    fastmerge.merge(ta_recipe(base, ft0, ft1), tmp_path / "out")


def test_reader_failure_mid_merge(fam, tmp_path, monkeypatch):
    base, ft0, ft1 = fam
    from fastmerge import io

    real = io.CheckpointReader.map_bytes  # both the raw (no torch) and the torch path read through it
    calls = {"n": 0}

    def flaky(self, name):
        calls["n"] += 1
        if calls["n"] > 20:
            raise FastmergeError(f"{self.path}: truncated shard while reading tensor {name}")
        return real(self, name)

    monkeypatch.setattr(io.CheckpointReader, "map_bytes", flaky)
    merge_fails(ta_recipe(base, ft0, ft1), tmp_path / "out", "truncated shard while reading")


def test_bin_weights_refused_unless_allowed(fam, tmp_path):
    base, ft0, ft1 = fam
    binmodel = tmp_path / "binmodel"
    binmodel.mkdir()
    shutil.copy(ft1 / "config.json", binmodel / "config.json")
    state = {}
    for f in ft1.glob("*.safetensors"):
        state.update(load_file(f))
    torch.save(state, binmodel / "pytorch_model.bin")
    merge_fails(ta_recipe(base, ft0, binmodel), tmp_path / "out", r"binmodel: only pickled .bin weights found; pass --allow-bin")
    res = fastmerge.merge(ta_recipe(base, ft0, binmodel), tmp_path / "out", MergeOptions(allow_bin=True))
    assert res.tensors == len(state)


def test_cli_errors_are_one_line(fam, tmp_path, capsys):
    base, ft0, ft1 = fam
    recipe = tmp_path / "r.yml"
    bad = ta_recipe(base, ft0, ft1)
    bad["merge_method"] = "frobnicate"
    recipe.write_text(yaml.safe_dump(bad))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastmerge: error:") and "frobnicate" in err[0]
    bad = ta_recipe(base, ft0, ft1)
    bad["models"][0]["parameters"]["wieght"] = 1.0
    recipe.write_text(yaml.safe_dump(bad))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wieght" in err[0]
    assert_clean(tmp_path / "out")
