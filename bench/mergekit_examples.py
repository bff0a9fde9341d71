"""Run mergekit's own example recipes and test recipes through fastmerge and mergekit (issue 15).

    python bench/mergekit_examples.py --mergekit-git DIR [--workdir DIR] [--only SUBSTR]

DIR is a mergekit git directory (bare, e.g. the one the ``fetch`` tool writes) or a checkout. Nothing
of mergekit's repository is copied into this one: the recipes are read from DIR at run time.

What is collected (everything is read at the HEAD commit of DIR):
  * ``examples/**/*.yml|yaml``: every YAML recipe, unchanged;
  * ``tests/**/*.yml|yaml``: every YAML file that parses as a recipe (has ``merge_method``);
  * ``tests/*.py``: the ``MergeConfiguration`` objects the tests build. The tests are not parsed;
    they are *called*: ``tests/`` is written to a temporary directory, each test module is imported
    with ``run_and_check_merge`` replaced by a function that records the configuration it is given,
    and every test function/method whose arguments are all model fixtures of its module (fixtures
    are passed as their own names, e.g. ``"model_a"``) is called. The recorded configuration is
    dumped with mergekit's ``MergeConfiguration.to_yaml``. Tests that build a configuration inside
    ``pytest.raises`` are marked ``expects_error``. Tests needing other fixtures (tmp_path, ...) or
    that build no configuration (unit tests of internals) are not covered. This needs the installed
    mergekit to be able to import mergekit HEAD's tests (a module that fails to import is listed).

Substitution (the only change made to a recipe): every model reference (``model``, ``base_model``,
``tokenizer_source``/``source`` when not ``base``/``union``) is replaced by the path of a tiny local
model made once with ``fastmerge.synth.make_family``. The family is chosen from the id (``mistral``
-> mistral, ``gpt2`` -> gpt2, anything else -> llama; llava/granite ids of the tests get llama, so
their VLM/granite-specific parts are not exercised). Within a recipe, the ``base_model`` id maps to
the family base; every other distinct id maps to its own fine-tune (one per distinct id over all
recipes). Each family is as deep as the largest ``layer_range`` end used with it (hidden 16).

Each recipe is run with ``fastmerge.merge(recipe_dict, out)`` and with mergekit's
``run_merge(MergeConfiguration.model_validate(recipe_dict), out, MergeOptions())`` (the installed
mergekit package, whose version is recorded; it may be older than DIR's HEAD). For recipes both
run, the max abs difference over all tensors (compared in fp32; tensors present in only one output
are counted) is recorded. Deterministic methods agree to ~1e-6 in fp32. bf16/fp16 recipes differ
more (up to ~0.1 for ties): mergekit computes in the recipe's dtype, fastmerge in fp32 with one
rounding at the end (bench/mergekit_dtype.py shows them equal once mergekit computes in fp32 and
writes the same dtype). Stochastic methods (dare_*, della*, breadcrumbs with random pruning, ...)
use different RNGs and are expected to differ.

Column ``max_abs_diff_fp32`` is a diagnostic outside the recipes as written: for recipes both tools
run that set a dtype other than float32, both are run again with ``dtype: float32`` and compared, to
separate output rounding from real differences.

Every local model gets the same small word-level tokenizer (vocab 256), so tokenizer tests that rely
on their fixtures' different vocabularies/added tokens (e.g. ``model_chatml``) run with identical
tokenizers here.

Writes bench/results/mergekit_examples.{md,csv}.
"""

from __future__ import annotations

import argparse
import ast
import csv
import datetime as dt
import importlib
import inspect
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL_KEYS = ("model", "base_model")
SOURCE_KEYS = ("tokenizer_source", "source")
NOT_MODELS = ("base", "union")


# ------------------------------------------------------------------------------------------------
# reading the mergekit repository
# ------------------------------------------------------------------------------------------------


class MergekitRepo:
    def __init__(self, path: str):
        p = Path(path)
        self.git_dir = p / ".git" if (p / ".git").exists() else p

    def git(self, *args: str) -> str:
        return subprocess.run(["git", "--git-dir", str(self.git_dir), *args], check=True,
                              capture_output=True, text=True).stdout

    def commit(self) -> str:
        return self.git("log", "-1", "--format=%H %cs").strip()

    def files(self, under: str) -> list[str]:
        return [f for f in self.git("ls-tree", "-r", "--name-only", "HEAD", under).splitlines() if f]

    def show(self, path: str) -> str:
        return self.git("show", f"HEAD:{path}")


def collect_yaml(repo: MergekitRepo) -> list[dict]:
    import yaml

    out = []
    for prefix in ("examples/", "tests/"):
        for f in repo.files(prefix):
            if not f.endswith((".yml", ".yaml")):
                continue
            try:
                doc = yaml.safe_load(repo.show(f))
            except Exception as e:  # noqa: BLE001
                out.append({"name": f, "source": f, "recipe": None, "error": f"yaml: {e}"})
                continue
            if isinstance(doc, dict) and "merge_method" in doc:
                out.append({"name": f, "source": f, "recipe": doc, "expects_error": False})
    return out


def _fixture_names(src: str) -> set[str]:
    names = set()
    for node in ast.parse(src).body:
        if isinstance(node, ast.FunctionDef) and any("fixture" in ast.unparse(d) for d in node.decorator_list):
            names.add(node.name)
    return names


def collect_tests(repo: MergekitRepo, notes: list[str]) -> list[dict]:
    """Call mergekit's tests with run_and_check_merge replaced by a recorder (see the docstring)."""
    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="mk_tests_"))
    py = [f for f in repo.files("tests/") if f.endswith(".py")]
    for f in py:
        (tmp / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp / f).write_text(repo.show(f))
    saved_path, saved_tests = list(sys.path), {k: v for k, v in sys.modules.items() if k == "tests" or k.startswith("tests.")}
    for k in saved_tests:
        del sys.modules[k]
    sys.path.insert(0, str(tmp))
    out: list[dict] = []
    try:
        for f in sorted(py):
            src = (tmp / f).read_text()
            if "MergeConfiguration(" not in src and "make_config" not in src:
                continue
            modname = f[:-3].replace("/", ".")
            try:
                mod = importlib.import_module(modname)
            except Exception as e:  # noqa: BLE001
                notes.append(f"{f}: not imported ({type(e).__name__}: {str(e).splitlines()[0][:150]})")
                continue
            fixtures = _fixture_names(src)
            recorded: list = []

            def record(config, *a, _into=recorded, **k):
                _into.append(config)

            mod.run_and_check_merge = record
            tests = []
            for name, obj in vars(mod).items():
                if inspect.isclass(obj) and name.startswith("Test"):
                    for mname, m in vars(obj).items():
                        if mname.startswith("test_") and callable(m):
                            tests.append((f"{name}.{mname}", m, obj))
                elif name.startswith("test_") and inspect.isfunction(obj):
                    tests.append((name, obj, None))
            for tname, fn, cls in tests:
                params = [p for p in inspect.signature(fn).parameters if p != "self"]
                if any(p not in fixtures for p in params):
                    notes.append(f"{f}::{tname}: skipped (needs fixtures {[p for p in params if p not in fixtures]})")
                    continue
                recorded.clear()
                expects_error = "pytest.raises" in inspect.getsource(fn)
                try:
                    args = {p: p for p in params}
                    fn(cls(), **args) if cls else fn(**args)
                except BaseException as e:  # noqa: BLE001  (pytest.raises' Failed is a BaseException)
                    if isinstance(e, KeyboardInterrupt):
                        raise
                    if not recorded:
                        notes.append(f"{f}::{tname}: no configuration built ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
                        continue
                if not recorded:
                    continue
                for i, cfg in enumerate(recorded):
                    suffix = f"#{i}" if len(recorded) > 1 else ""
                    try:
                        doc = yaml.safe_load(cfg.to_yaml())
                    except Exception as e:  # noqa: BLE001
                        notes.append(f"{f}::{tname}{suffix}: not dumped ({e})")
                        continue
                    out.append({"name": f"{f}::{tname}{suffix}", "source": f, "recipe": doc,
                                "expects_error": expects_error})
    finally:
        sys.path[:] = saved_path
        for k in [k for k in sys.modules if k == "tests" or k.startswith("tests.")]:
            del sys.modules[k]
        sys.modules.update(saved_tests)
    return out


# ------------------------------------------------------------------------------------------------
# substitution of model references
# ------------------------------------------------------------------------------------------------


def family_of(model_id: str) -> str:
    s = model_id.lower()
    if "mistral" in s:
        return "mistral"
    if "gpt2" in s:
        return "gpt2"
    return "llama"


def walk_refs(obj, key=None):
    """Yield (container, key) for every model reference string in a recipe."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str) and (k in MODEL_KEYS or (k in SOURCE_KEYS and v not in NOT_MODELS)):
                yield obj, k
            else:
                yield from walk_refs(v, k)
    elif isinstance(obj, list):
        for v in obj:
            yield from walk_refs(v, key)


def layer_ends(obj, out: list[int]):
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "layer_range" and isinstance(v, list) and len(v) == 2:
                out.append(int(v[1]))
            else:
                layer_ends(v, out)
    elif isinstance(obj, list):
        for v in obj:
            layer_ends(v, out)


def plan_models(items: list[dict]):
    """Distinct non-base ids per family (each gets a fine-tune) and the depth each family needs."""
    finetunes: dict[str, list[str]] = {}
    depth: dict[str, int] = {}
    for it in items:
        r = it["recipe"]
        if r is None:
            continue
        base = r.get("base_model")
        fams = set()
        for c, k in walk_refs(r):
            mid = c[k]
            fam = family_of(mid)
            fams.add(fam)
            if mid != base and mid not in finetunes.setdefault(fam, []):
                finetunes[fam].append(mid)
        if base is not None:
            fams.add(family_of(base))
        ends: list[int] = []
        layer_ends(r, ends)
        for fam in fams:
            depth[fam] = max(depth.get(fam, 2), max(ends, default=2))
    return finetunes, depth


def make_models(workdir: Path, finetunes, depth):
    from fastmerge.synth import ModelSpec, make_family

    paths = {}
    for fam in sorted(set(finetunes) | set(depth)):
        n = max(1, len(finetunes.get(fam, [])))
        root = workdir / f"{fam}_L{depth[fam]}_ft{n}"
        spec = ModelSpec(arch=fam, hidden=16, layers=depth[fam], heads=4, kv_heads=2, vocab=256)
        if not (root / f"ft{n - 1}" / "config.json").exists():
            made = make_family(root, spec, finetunes=n, seed=0)
        else:
            made = [root / "base"] + [root / f"ft{i}" for i in range(n)]
        for d in made:
            if not (Path(d) / "tokenizer.json").exists():
                write_tokenizer(Path(d), spec.vocab)
        paths[fam] = {"base": str(made[0]), "ft": [str(p) for p in made[1:]]}
    return paths


def write_tokenizer(d: Path, vocab: int) -> None:
    """The same small word-level tokenizer (vocab ids 0..vocab-1) in every local model."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab)]  # token names the test recipes use
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(d)


def substitute(recipe: dict, finetunes, paths) -> dict:
    import copy

    r = copy.deepcopy(recipe)
    base = recipe.get("base_model")
    for c, k in list(walk_refs(r)):
        mid = c[k]
        fam = family_of(mid)
        c[k] = paths[fam]["base"] if mid == base else paths[fam]["ft"][finetunes[fam].index(mid)]
    return r


# ------------------------------------------------------------------------------------------------
# running and comparing
# ------------------------------------------------------------------------------------------------


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:220] if msg else ''}"


def run_fastmerge(recipe: dict, out: Path) -> str:
    import fastmerge

    try:
        fastmerge.merge(recipe, out)
        return "ok"
    except Exception as e:  # noqa: BLE001
        return one_line(e)


def run_mergekit(recipe: dict, out: Path) -> str:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    try:
        cfg = MergeConfiguration.model_validate(recipe)
        run_merge(cfg, out_path=str(out), options=MergeOptions())
        return "ok"
    except Exception as e:  # noqa: BLE001
        return one_line(e)


def read_tensors(d: Path) -> dict:
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def compare(a: Path, b: Path):
    ta, tb = read_tensors(a), read_tensors(b)
    only = sorted(set(ta) ^ set(tb))
    diff = 0.0
    shape_mismatch = []
    for k in set(ta) & set(tb):
        x, y = ta[k], tb[k]
        if x.shape != y.shape:
            shape_mismatch.append(k)
            continue
        if x.numel():
            diff = max(diff, (x.float() - y.float()).abs().max().item())
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in ta.values()})
    note = []
    if only:
        note.append(f"{len(only)} tensors in one output only (e.g. {only[0]})")
    if shape_mismatch:
        note.append(f"{len(shape_mismatch)} shape mismatches (e.g. {shape_mismatch[0]})")
    return diff, "/".join(dtypes), "; ".join(note)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-git", required=True, help="mergekit git dir (bare) or checkout")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "fastmerge_mergekit_examples"))
    ap.add_argument("--only", default=None, help="run only recipes whose name contains this")
    ap.add_argument("--results", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    import logging

    logging.disable(logging.WARNING)
    repo = MergekitRepo(args.mergekit_git)
    commit = repo.commit()
    notes: list[str] = []
    items = collect_yaml(repo) + collect_tests(repo, notes)
    if args.only:
        items = [it for it in items if args.only in it["name"]]
    finetunes, depth = plan_models(items)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    paths = make_models(work / "models", finetunes, depth)

    import shutil

    import mergekit

    mk_version = getattr(mergekit, "__version__", None)
    if mk_version is None:
        from importlib.metadata import version

        mk_version = version("mergekit")
    rows = []
    for it in items:
        row = {"recipe": it["name"], "method": "", "dtype": "", "fastmerge": "", "mergekit": "",
               "max_abs_diff": "", "max_abs_diff_fp32": "", "out_dtype": "", "note": "expects_error (pytest.raises)" if it.get("expects_error") else ""}
        if it["recipe"] is None:
            row.update(fastmerge=it["error"], mergekit=it["error"])
            rows.append(row)
            continue
        r = substitute(it["recipe"], finetunes, paths)
        row["method"] = str(r.get("merge_method", ""))
        row["dtype"] = str(r.get("dtype", "") or "")
        safe = it["name"].replace("/", "_").replace(":", "_").replace("#", "_")
        fo, mo = work / "out" / safe / "fastmerge", work / "out" / safe / "mergekit"
        shutil.rmtree(work / "out" / safe, ignore_errors=True)
        row["fastmerge"] = run_fastmerge(r, fo)
        row["mergekit"] = run_mergekit(r, mo)
        if row["fastmerge"] == "ok" and row["mergekit"] == "ok":
            try:
                d, dts, note = compare(fo, mo)
                row["max_abs_diff"], row["out_dtype"] = f"{d:.3g}", dts
                row["note"] = "; ".join(x for x in (row["note"], note) if x)
            except Exception as e:  # noqa: BLE001
                row["note"] = f"compare failed: {one_line(e)}"
            if r.get("dtype") not in (None, "float32"):
                # diagnostic only (not the recipe as written): the same recipe with dtype float32,
                # to tell output rounding from a real difference
                r32 = dict(r, dtype="float32")
                shutil.rmtree(work / "out" / safe, ignore_errors=True)
                a, b = run_fastmerge(r32, fo), run_mergekit(r32, mo)
                if a == b == "ok":
                    row["max_abs_diff_fp32"] = f"{compare(fo, mo)[0]:.3g}"
                else:
                    row["max_abs_diff_fp32"] = f"fp32 run: fastmerge {a}; mergekit {b}"
            elif row["max_abs_diff"]:
                row["max_abs_diff_fp32"] = row["max_abs_diff"]
        shutil.rmtree(work / "out" / safe, ignore_errors=True)
        print(f"{it['name']}: fastmerge={row['fastmerge']} mergekit={row['mergekit']} diff={row['max_abs_diff']}",
              flush=True)
        rows.append(row)

    y = len(rows)
    x = sum(r["fastmerge"] == "ok" for r in rows)
    z = sum(r["mergekit"] == "ok" for r in rows)
    summary = f"fastmerge runs {x} of {y} (mergekit runs {z} of {y})"
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0].keys()) if rows else []
    with open(res / "mergekit_examples.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    fam_desc = ", ".join(f"{fam}: {depth[fam]} layers, base + {len(paths[fam]['ft'])} fine-tunes"
                         for fam in sorted(paths))
    md = [
        "# mergekit's example and test recipes through fastmerge and mergekit",
        "",
        f"- mergekit repository read: commit `{commit}` (examples/ YAML + recipes built by tests/*.py)",
        f"- mergekit run: installed package {mk_version}; fastmerge: this tree",
        f"- local models (fastmerge.synth, hidden 16, fp32 on disk): {fam_desc}",
        f"- run at {dt.datetime.now().isoformat(timespec='seconds')} by `bench/mergekit_examples.py`",
        "",
        f"**{summary}**",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        md.append("| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |")
    if notes:
        md += ["", "Not covered / notes from collecting the tests:", ""] + [f"- {n}" for n in notes]
    (res / "mergekit_examples.md").write_text("\n".join(md) + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
