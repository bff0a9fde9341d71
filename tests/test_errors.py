"""Bad input gets one clear line naming the file and tensor, and nothing is left half-written."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import warnings
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


def bin_model(src: Path, dst: Path) -> Path:
    """``src``'s weights as one pickled ``pytorch_model.bin`` (with its config) in ``dst``."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = {}
    for f in src.glob("*.safetensors"):
        state.update(load_file(f))
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def ta_recipe(base: Path, *models: Path) -> dict:
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in models]}


def merge_fails(recipe: dict, out: Path, match: str) -> None:
    """The merge raises a FastmergeError matching ``match`` and leaves nothing at or beside ``out``."""
    with pytest.raises(FastmergeError, match=match):
        fastmerge.merge(recipe, out)
    assert_clean(out)


def open_files_under(root: Path) -> list[str]:
    """Files under ``root`` this process still has open (Linux /proc; [] elsewhere)."""
    found = []
    for fd in Path("/proc/self/fd").iterdir() if Path("/proc/self/fd").is_dir() else []:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(root)):
            found.append(target)
    return found


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
    merge_fails(ta_recipe(base, ft0, ft1), tmp_path / "out", rf"{tmp_path / 'out'}/model\.safetensors: cannot reserve .* No space left")
    assert not open_files_under(tmp_path), "the shard's descriptor was left open (its blocks stay allocated)"
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
    binmodel = bin_model(ft1, tmp_path / "binmodel")
    merge_fails(ta_recipe(base, ft0, binmodel), tmp_path / "out", r"binmodel: only pickled .bin weights found; pass --allow-bin")
    res = fastmerge.merge(ta_recipe(base, ft0, binmodel), tmp_path / "out", MergeOptions(allow_bin=True))
    assert res.tensors == len(torch.load(binmodel / "pytorch_model.bin", weights_only=True))


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


# ------------------------------------------------------------------------------------------------
# Every bad input through the CLI: exit code 2, one line naming the file and the tensor or key,
# nothing at or beside the target, every input byte-identical afterwards.
# ------------------------------------------------------------------------------------------------


def digest(*roots: Path) -> dict[Path, str]:
    """sha256 of every file under ``roots`` (the inputs must not change)."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")) if Path(root).is_dir() else [Path(root)]:
            if p.is_file():
                out[p] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cli_fails(argv: list[str], capsys, *needles: str) -> str:
    """``fastmerge ARGV`` returns 2 and prints one line (no traceback) holding every needle."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("fastmerge: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def merge_cli_fails(recipe: dict, out: Path, capsys, *needles: str, inputs: tuple[Path, ...] = ()) -> str:
    """``fastmerge merge`` of ``recipe`` fails with one line; nothing is left; inputs unchanged."""
    path = out.parent / f"{out.name}-recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    before = digest(path, *inputs)
    line = cli_fails(["merge", str(path), str(out), "--no-progress"], capsys, *needles)
    assert_clean(out)
    assert digest(path, *inputs) == before, "an input changed"
    return line


def rewrite_header(shard: Path, mutate) -> None:
    """Replace the shard's JSON header by ``mutate(header)`` (a dict, or raw header text); the
    tensor bytes stay as they were."""
    data = shard.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + hlen])
    new = mutate(header)
    raw = (new if isinstance(new, str) else json.dumps(new)).encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + hlen :])


def _entry(edit):
    """A header mutation of NAME's entry."""
    def mutate(header):
        edit(header, header[NAME])
        return header
    return mutate


def _other(header) -> str:
    return next(k for k in header if k not in ("__metadata__", NAME))


DEEP = 100_000
BAD_HEADERS = {
    "entry-not-object": (lambda h: {**h, NAME: [1, 2]}, "not an object"),
    "entry-string": (lambda h: {**h, NAME: "F32"}, "not an object"),
    "shape-strings": (_entry(lambda h, e: e.update(shape=[str(s) for s in e["shape"]])), "shape"),
    "shape-float": (_entry(lambda h, e: e.update(shape=[float(s) for s in e["shape"]])), "shape"),
    "shape-negative": (_entry(lambda h, e: e.update(shape=[-s for s in e["shape"]])), "shape"),
    "shape-not-list": (_entry(lambda h, e: e.update(shape=7)), "shape"),
    "shape-bytes-mismatch": (_entry(lambda h, e: e.update(shape=[e["shape"][0], e["shape"][1] // 2])), "inconsistent"),
    "one-offset": (_entry(lambda h, e: e.update(data_offsets=e["data_offsets"][1:])), "data_offsets"),
    "three-offsets": (_entry(lambda h, e: e.update(data_offsets=[*e["data_offsets"], 0])), "data_offsets"),
    "string-offsets": (_entry(lambda h, e: e.update(data_offsets=[str(x) for x in e["data_offsets"]])), "data_offsets"),
    "reversed-offsets": (_entry(lambda h, e: e.update(data_offsets=e["data_offsets"][::-1])), "data_offsets"),
    "overlap": (_entry(lambda h, e: h[_other(h)].update(data_offsets=list(e["data_offsets"]), shape=e["shape"],
                                                       dtype=e["dtype"])), "overlap tensor"),
    "out-of-range": (_entry(lambda h, e: e.update(data_offsets=[x + 10**12 for x in e["data_offsets"]])), "ends at byte"),
    "missing-dtype": (_entry(lambda h, e: e.pop("dtype")), "no dtype"),
    "unknown-dtype": (_entry(lambda h, e: e.update(dtype="F33")), "unsupported dtype 'F33'"),
    "dtype-not-string": (_entry(lambda h, e: e.update(dtype=4)), "unsupported dtype 4"),
    "metadata-not-str": (lambda h: {**h, "__metadata__": {"format": 1}}, "__metadata__"),
    "metadata-list": (lambda h: {**h, "__metadata__": ["pt"]}, "__metadata__"),
    "header-list": (lambda h: [h], "not an object"),
    "deeply-nested": (lambda h: json.dumps({**h, NAME: "@"}).replace('"@"', "[" * DEEP + "]" * DEEP), "nested too deeply"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_safetensors_header_is_one_line(fam, tmp_path, capsys, case):
    base, ft0, ft1 = fam
    mutate, what = BAD_HEADERS[case]
    shard = shard_of(ft0, NAME)
    rewrite_header(shard, mutate)
    names_tensor = not case.startswith(("header-", "metadata-", "deeply-"))  # else the file-level key
    needles = [str(shard), what] + ([NAME] if names_tensor else [])
    merge_cli_fails(ta_recipe(base, ft0, ft1), tmp_path / "out", capsys, *needles, inputs=(base, ft0, ft1))


def test_header_gap_and_trailing_bytes(fam, tmp_path, capsys):
    """The tensors tile the data section exactly (as the safetensors library checks)."""
    base, ft0, ft1 = fam
    shard = shard_of(ft0, NAME)
    shard.write_bytes(shard.read_bytes() + b"\0" * 8)
    merge_cli_fails(ta_recipe(base, ft0, ft1), tmp_path / "out", capsys, str(shard), "8 bytes after the last tensor",
                    inputs=(base, ft0, ft1))


def _raw_safetensors(path: Path, header, data_len: int, raw: bytes | None = None) -> Path:
    h = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * data_len)
    return path


GOOD = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}}
HEADER_TABLE = {  # name: (header, data bytes, valid)
    "good": (GOOD, 32, True),
    "metadata": ({**GOOD, "__metadata__": {"format": "pt"}}, 32, True),
    "empty": ({}, 0, True),
    "zero-size-tensor": ({"z": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
                          "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 4, True),
    "extra-entry-key": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, 4, True),
    "metadata-int": ({**GOOD, "__metadata__": {"format": 1}}, 32, False),
    "entry-list": ({"a": [1, 2]}, 0, False),
    "shape-float": ({"a": {"dtype": "F32", "shape": [2.0, 3], "data_offsets": [0, 24]}}, 24, False),
    "shape-bool": ({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, 1, False),
    "one-offset": ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [24]}}, 24, False),
    "overlap": ({"a": GOOD["a"], "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]}}, 24, False),
    "gap": ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [8, 32]}}, 32, False),
    "trailing": (GOOD, 40, False),
    "short": (GOOD, 30, False),
    "nbytes": ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, 20, False),
    "reversed": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}, 4, False),
    "unknown-dtype": ({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, 4, False),
    "list-header": ([1, 2], 0, False),
}


@pytest.mark.parametrize("case", list(HEADER_TABLE) + ["deep", "utf16", "not-utf8"])
def test_header_validation_agrees_with_safetensors(tmp_path, case):
    """read_header accepts exactly what the safetensors library accepts (on these cases)."""
    from safetensors import safe_open

    from fastmerge.io import read_header

    raws = {"deep": b"[" * DEEP + b"]" * DEEP, "utf16": "{}".encode("utf-16"), "not-utf8": b'{"\xff": 1}'}
    if case in raws:
        path = _raw_safetensors(tmp_path / "x.safetensors", None, 0, raws[case])
        valid = False
    else:
        header, n, valid = HEADER_TABLE[case]
        path = _raw_safetensors(tmp_path / "x.safetensors", header, n)
    try:
        with safe_open(str(path), "pt") as f:
            list(f.keys())
        library_ok = True
    except Exception:  # noqa: BLE001 - whatever the library raises
        library_ok = False
    assert library_ok == valid
    if valid:
        read_header(path)
    else:
        with pytest.raises(FastmergeError, match=re.escape(str(path))):
            read_header(path)


BAD_JSON = {  # (file, content, needles)
    "index-list": ("model.safetensors.index.json", b"[]", ["must be a JSON object, got list"]),
    "index-string": ("model.safetensors.index.json", b'"weights"', ["must be a JSON object, got string"]),
    "index-invalid": ("model.safetensors.index.json", b'{"weight_map": ', ["not valid JSON"]),
    "index-not-utf8": ("model.safetensors.index.json", b'{"weight_map": {"\xff": "x"}}', ["not UTF-8"]),
    "index-deep": ("model.safetensors.index.json", b"[" * DEEP + b"]" * DEEP, ["nested too deeply"]),
    "weight-map-list": ("model.safetensors.index.json", b'{"weight_map": ["model.safetensors"]}', ["weight_map is a list"]),
    "weight-map-missing": ("model.safetensors.index.json", b'{"metadata": {}}', ["weight_map is missing"]),
    "weight-map-value": ("model.safetensors.index.json", json.dumps({"weight_map": {NAME: 3}}).encode(),
                         ["weight_map", NAME, "got 3"]),
    "weight-map-null": ("model.safetensors.index.json", json.dumps({"weight_map": {NAME: None}}).encode(),
                        ["weight_map", NAME]),
    "config-list": ("config.json", b"[1]", ["config must be a JSON object, got list"]),
    "config-string": ("config.json", b'"llama"', ["config must be a JSON object, got string"]),
    "config-invalid": ("config.json", b"{", ["not valid JSON"]),
    "config-not-utf8": ("config.json", b'{"model_type": "\xfe"}', ["not UTF-8"]),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_bad_index_or_config_is_one_line(fam, tmp_path, capsys, case):
    base, ft0, ft1 = fam
    name, content, needles = BAD_JSON[case]
    (ft0 / name).write_bytes(content)
    merge_cli_fails(ta_recipe(base, ft0, ft1), tmp_path / "out", capsys, str(ft0 / name), *needles,
                    inputs=(base, ft0, ft1))


@pytest.mark.parametrize("victim", ["config.json", "README.md", "mergekit_config.yml", "generation_config.json"])
def test_full_disk_writing_metadata(fam, tmp_path, capsys, monkeypatch, victim):
    """A full disk after the shards (config, model card, copied files): one line naming the file,
    nothing left; with --force the old output stays as it was."""
    base, ft0, ft1 = fam
    assert (base / "generation_config.json").exists()
    real_write_text, real_copy2 = Path.write_text, shutil.copy2

    def write_text(self, *args, **kwargs):
        if self.name == victim and ".fastmerge-tmp" in str(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, *args, **kwargs)

    def copy2(src, dst, *args, **kwargs):
        if Path(dst).name == victim:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_copy2(src, dst, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(shutil, "copy2", copy2)
    out = tmp_path / "out"
    merge_cli_fails(ta_recipe(base, ft0, ft1), out, capsys, f"{out / victim}: cannot", "No space left on device",
                    inputs=(base, ft0, ft1))
    monkeypatch.setattr(Path, "write_text", real_write_text)
    monkeypatch.setattr(shutil, "copy2", real_copy2)
    fastmerge.merge(ta_recipe(base, ft0, ft1), out)
    old = digest(out)
    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(shutil, "copy2", copy2)
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(ta_recipe(base, ft0, ft1)))
    cli_fails(["merge", str(recipe), str(out), "--force", "--no-progress"], capsys, f"{out / victim}: cannot")
    assert digest(out) == old
    assert not list(tmp_path.glob(".out.fastmerge-*"))


@pytest.mark.parametrize("waiting", [False, True], ids=["writer-fails", "main-thread-waits-for-a-buffer"])
def test_writer_thread_failure_names_the_shard(fam, tmp_path, capsys, monkeypatch, waiting):
    """A failed write on the writer thread (torch route: tensors made by torch ops) surfaces as
    its own error naming the shard and tensor, not as a generic stop; also when the main thread
    is blocked waiting for an output buffer the failed writer will never give back."""
    import time

    base, ft0, ft1 = fam
    from fastmerge import engine, io

    calls = {"n": 0}

    def disk_full(self, name, tensor):
        calls["n"] += 1
        if waiting:
            time.sleep(0.5)  # the main thread is in _OutputBuffers.take by now
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(engine, "_raw_ok", lambda task, readers: False)  # every result via the writer thread
    monkeypatch.setattr(io.ShardedWriter, "write", disk_full)
    if waiting:
        real_init = engine._OutputBuffers.__init__
        monkeypatch.setattr(engine._OutputBuffers, "__init__", lambda self, capacity, count: real_init(self, capacity, 1))
    out = tmp_path / "out"
    line = merge_cli_fails(ta_recipe(base, ft0, ft1), out, capsys, f"{out / 'model.safetensors'}: cannot write tensor",
                           "No space left on device", inputs=(base, ft0, ft1))
    assert "stopped" not in line
    assert calls["n"] == 1


def test_eval_data_not_utf8(fam, tmp_path, capsys):
    base = fam[0]
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    before = digest(data, base)
    cli_fails(["eval", str(base), "--task", "loglik", "--data", str(data), "--no-progress"], capsys,
              f"{data}:2: not UTF-8")
    assert digest(data, base) == before


def test_dfs_export_refuses_pickled_sources(fam, tmp_path, capsys):
    """dfs export loads its sources through transformers: pickled-only weights need --allow-bin there too."""
    base, _, ft1 = fam
    binmodel = bin_model(ft1, tmp_path / "binmodel")
    file = tmp_path / "path.json"
    file.write_text(json.dumps({"hops": [[0, 0], [1, 1]], "models": [str(base), str(binmodel)]}))
    out = tmp_path / "out"
    before = digest(binmodel, file)
    cli_fails(["dfs", "export", str(file), str(out)], capsys, str(binmodel / "pytorch_model.bin"), "--allow-bin")
    assert digest(binmodel, file) == before
    assert_clean(out)
    assert main(["dfs", "export", str(file), str(out), "--allow-bin"]) == 0
    assert (out / "config.json").exists()


def test_eval_refuses_pickled_weights(fam, tmp_path, capsys):
    base, ft0, ft1 = fam
    binmodel = bin_model(ft1, tmp_path / "binmodel")
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello world"}\n')
    before = digest(binmodel, data)
    cli_fails(["eval", str(binmodel), "--task", "loglik", "--data", str(data), "--no-progress"], capsys,
              str(binmodel / "pytorch_model.bin"), "--allow-bin")
    assert digest(binmodel, data) == before
    from fastmerge.evaluate import load_model

    with pytest.raises(FastmergeError, match="cannot load tokenizer"):  # past the pickle check: it loads
        load_model(binmodel, allow_bin=True)


BAD_PATHS = {  # path file content -> needles (besides the file)
    "list": ([[0, 0]], ["expected an object"]),
    "no-hops": ({"models": ["a"]}, ["missing 'hops'"]),
    "hops-string": ({"hops": "0,0"}, ["hops: expected a list"]),
    "negative-layer": ({"hops": [[0, 0], [1, -1]]}, ["bad hop hops[1] [1, -1]: layer -1 is negative"]),
    "float-layer": ({"hops": [[0, 1.5]]}, ["bad hop hops[0] [0, 1.5]: layer 1.5 is not an integer"]),
    "bool-model": ({"hops": [[True, 0]]}, ["hops[0] [True, 0]: model True is not an integer"]),
    "string-scale": ({"hops": [[0, 0, "big"]]}, ["hops[0] [0, 0, 'big']: scale 'big' is not a number"]),
    "null-scale": ({"hops": [[0, 0, None]]}, ["hops[0] [0, 0, None]: scale None is not a number"]),
    "short-hop": ({"hops": [[0]]}, ["bad hop hops[0] [0]: expected [model, layer]"]),
    "hop-missing-key": ({"hops": [{"model": 0}]}, ["hops[0] {'model': 0}: missing 'layer'"]),
    "hop-unknown-key": ({"hops": [{"model": 0, "layer": 0, "sclae": 1}]}, ["hops[0]", "unknown key 'sclae'"]),
    "dict-negative-model": ({"hops": [{"model": -2, "layer": 0}]}, ["hops[0]", "model -2 is negative"]),
    "head-string": ({"hops": [[0, 0]], "head": "0"}, ["head: expected a non-negative integer"]),
    "head-negative": ({"hops": [[0, 0]], "head": -1}, ["head: expected a non-negative integer"]),
    "head-beyond": ({"hops": [[0, 0]], "head": 2, "models": ["a", "b"]}, ["head: 2 is not one of the 2 models"]),
    "models-string": ({"hops": [[0, 0]], "models": "a"}, ["models: expected a list"]),
    "models-ints": ({"hops": [[0, 0]], "models": [1, 2]}, ["models: expected a list"]),
}


@pytest.mark.parametrize("case", list(BAD_PATHS) + ["invalid-json", "not-utf8"])
def test_bad_dfs_path_file(fam, tmp_path, capsys, case):
    base, _, ft1 = fam
    file = tmp_path / "path.json"
    if case == "invalid-json":
        file.write_text('{"hops": [[0, 0]')
        needles = ["path file is not valid JSON"]
    elif case == "not-utf8":
        file.write_bytes(b'{"hops": [[0, 0]], "models": ["\xff"]}')
        needles = ["not UTF-8"]
    else:
        content, needles = BAD_PATHS[case]
        file.write_text(json.dumps(content))
    out = tmp_path / "out"
    before = digest(file)
    cli_fails(["dfs", "export", str(file), str(out), "--models", str(base), str(ft1)], capsys, f"{file}: ", *needles)
    assert not out.exists()
    assert digest(file) == before


BAD_OPTIONS = [
    ["merge", "R", "OUT", "--threads", "-1"],
    ["merge", "R", "OUT", "--threads", "0"],
    ["merge", "R", "OUT", "--threads", "two"],
    ["merge", "R", "OUT", "--threads", "100000000000"],
    ["merge", "R", "OUT", "--out-shard-size", "0"],
    ["merge", "R", "OUT", "--out-shard-size", "-1"],
    ["merge", "R", "OUT", "--out-shard-size", "lots"],
    ["merge", "R", "OUT", "--out-shard-size", "infG"],
    ["merge", "R", "OUT", "--seed", "-1"],
    ["merge", "R", "OUT", "--seed", "x"],
    ["merge", "R", "OUT", "--seed", str(2**64)],
    ["dfs", "export", "P", "OUT", "--head", "-1"],
    ["eval", "M", "--task", "math", "--limit", "0"],
    ["eval", "M", "--task", "math", "--batch-size", "0"],
    ["eval", "M", "--task", "math", "--max-new-tokens", "-3"],
]


@pytest.mark.parametrize("argv", BAD_OPTIONS, ids=lambda a: " ".join(a[-2:]))
def test_invalid_numeric_options(tmp_path, capsys, argv):
    """A usage error is one line (not argparse's usage block) naming the option and the value, exit 2."""
    out = tmp_path / "out"
    argv = [str(out) if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"argument {argv[-2]}: expected" in lines[0] and repr(argv[-1]) in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("seed", [-1, 2**64, "x"])
def test_recipe_random_seed_in_the_clis_range(fam, tmp_path, capsys, seed):
    """A recipe's random_seed takes what --seed takes (0..2**64-1): one line naming the file and key."""
    base, ft0, ft1 = fam
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({**ta_recipe(base, ft0, ft1), "random_seed": seed}))
    out = tmp_path / "out"
    cli_fails(["merge", str(recipe), str(out)], capsys, f"{recipe}: random_seed: ")
    assert_clean(out)


def test_valid_numeric_options_parse():
    from fastmerge.cli import build_parser

    args = build_parser().parse_args(["merge", "r", "o", "--threads", "3", "--out-shard-size", "1.5G", "--seed", "0"])
    assert (args.threads, args.out_shard_size, args.seed) == (3, int(1.5 * 1024**3), 0)


def test_linear_weights_summing_to_zero_with_normalize(fam, tmp_path, capsys):
    """mergekit's linear divides by the weights' sum (NaN/Inf when it is 0). fastmerge's rule
    (0 -> 1) writes the plain weighted sum, and says so in one warning naming the tensor; a
    warning, not an error: the evolutionary search reaches such weights (genes clipped to the
    range's ends) and its best.yml must rebuild the model it scored."""
    base, ft0, ft1 = fam
    recipe = {"merge_method": "linear",
              "models": [{"model": str(ft0), "parameters": {"weight": 1.0}},
                         {"model": str(ft1), "parameters": {"weight": -1.0}}]}
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.warns(UserWarning, match="sum to 0") as caught:
        assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    err = [str(w.message) for w in caught if "sum to 0" in str(w.message)]
    assert len(err) == 1 and "\n" not in err[0], err
    assert "weights sum to 0 with normalize: true for tensor model.embed_tokens.weight" in err[0]
    assert f"{ft0}: 1, {ft1}: -1" in err[0] and "more tensors" in err[0] and "normalize: false" in err[0]

    def tensor(model: Path) -> torch.Tensor:
        index = model / "model.safetensors.index.json"
        return load_file(shard_of(model, NAME) if index.exists() else model / "model.safetensors")[NAME]

    want = tensor(ft0) - tensor(ft1)
    torch.testing.assert_close(tensor(tmp_path / "out"), want)
    recipe["parameters"] = {"normalize": False}  # the same model, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastmerge.merge(recipe, tmp_path / "out2")
    torch.testing.assert_close(tensor(tmp_path / "out2"), want)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of that many bytes at one directory (root only; skipped where
    mounting is not allowed); unmounted afterwards."""
    import subprocess

    mounted: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)  # lazy: even with a descriptor still open


def test_real_full_disk_at_each_step(fam, tmp_path, capsys, tiny_tmpfs):
    """A real full filesystem (no monkeypatch): room for the shard but not for config.json, the
    generation config, the model card. Each is one line naming the file in the output directory,
    and the filesystem is left empty."""
    base, ft0, ft1 = fam
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    ref = tmp_path / "ref"
    fastmerge.merge(ta_recipe(base, ft0, ft1), ref)
    assert sorted(p.name for p in ref.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                     "mergekit_config.yml", "model.safetensors"], \
        "the tiny family is one shard"
    page = 4096
    pages = -(-(ref / "model.safetensors").stat().st_size // page)
    seen = []
    for extra in range(0, 6):
        fs = tiny_tmpfs((pages + extra) * page)
        out = fs / "out"
        recipe = tmp_path / "r.yml"
        recipe.write_text(yaml.safe_dump(ta_recipe(base, ft0, ft1)))
        capsys.readouterr()
        rc = main(["merge", str(recipe), str(out), "--no-progress"])
        err = capsys.readouterr().err.strip()
        if rc == 0:
            break
        assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert "No space left on device" in err and f"{out}/" in err, err
        assert not list(fs.iterdir()), "something left on the full filesystem"
        assert not open_files_under(fs), "a descriptor left open on the full filesystem"
        seen.append(err.split(f"{out}/")[1].split(":")[0])
    else:
        pytest.fail("never enough room")
    assert {"config.json", "README.md"} <= set(seen), seen  # mergekit_config.yml is written right after README.md
