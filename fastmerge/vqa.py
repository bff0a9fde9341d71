"""Visual question answering as fitness: EvoVLM-JP's metric on a vision-language model.

:class:`VQAEvaluator` asks a VLM (LLaVA-style: any ``AutoModelForImageTextToText`` whose processor
takes ``images=`` and ``text=``) a question about each image, by batched greedy generation through
the model's processor and chat template, and scores the answers by ROUGE-L against reference
answers with a Japanese word tokenizer, a response not in the target language scoring 0
(:mod:`fastmerge.rouge`). It is called like every evaluator, ``evaluator(model, tokenizer)``, on a
live module (the evolve loop writes candidates into one VLM in place) or, through
:func:`fastmerge.evaluate.evaluate_checkpoint`, on a checkpoint directory (:func:`load_vlm`).

Data: JSONL, one ``{"image": "img/0.png", "question": "...", "answers": ["...", ...]}`` per line
(``"answer": "..."`` for a single reference). Image paths are relative to the JSONL file's directory
and may not leave it: an absolute path or one whose ``..`` climbs above the directory is an error.
The rule reads the file's text only (it is the untrusted part, e.g. a downloaded data set); a
symlink that the user placed inside the directory is followed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from . import rouge
from ._optional import require
from .errors import FastmergeError

__all__ = ["METRICS", "VQAEvaluator", "load_vlm"]

#: what :class:`VQAEvaluator` reports (``score`` is the fitness: the language-gated ROUGE-L)
METRICS = ("score", "rouge_l", "rouge_l_ungated", "acc_lang", "n")
#: files that mark a directory as holding an image processor
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

Progress = Callable[[int, int], None]


def _image_module() -> Any:
    return require("PIL.Image", "the VQA evaluator (reading images)")


def _references(rec: dict) -> list[str]:
    """``answers`` (a non-empty list of strings) or ``answer`` (a string), as a list."""
    where = rec["_where"]
    if "answers" in rec:
        v = rec["answers"]
        if not isinstance(v, list) or not v or not all(isinstance(a, str) for a in v):
            raise FastmergeError(f"{where}: 'answers' must be a non-empty list of strings, got {v!r}")
        return list(v)
    if "answer" in rec:
        v = rec["answer"]
        if not isinstance(v, str):
            raise FastmergeError(f"{where}: 'answer' must be a string, got {type(v).__name__}")
        return [v]
    raise FastmergeError(f"{where}: no reference answer (give 'answers': [...] or 'answer': '...')")


def _image_path(rec: dict, root: Path) -> Path:
    """The record's image file under ``root``; a path that is absolute or climbs out is refused."""
    where = rec["_where"]
    if "image" not in rec:
        raise FastmergeError(f"{where}: 'image' is missing (a path relative to the data file)")
    v = rec["image"]
    if not isinstance(v, str) or not v.strip():
        raise FastmergeError(f"{where}: 'image' must be a path (a non-empty string), got {v!r}")
    posix = PurePosixPath(v.replace("\\", "/"))
    if posix.is_absolute() or os.path.isabs(v) or (posix.parts and posix.parts[0].endswith(":")):
        raise FastmergeError(f"{where}: 'image' {v!r} is an absolute path; give it relative to {root}")
    if os.path.normpath(posix.as_posix()).split("/")[0] == "..":
        raise FastmergeError(f"{where}: 'image' {v!r} leaves the data directory {root}")
    return root / posix


def _open_image(path: Path, where: str) -> Any:
    """The image as RGB (decoded now, so that a broken file fails here with its record's line)."""
    Image = _image_module()
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise FastmergeError(f"{where}: image not found: {path}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise FastmergeError(f"{where}: cannot read image {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None


def _has_processor(d: Any) -> bool:
    try:
        return bool(d) and Path(d).is_dir() and any((Path(d) / f).is_file() for f in _PROCESSOR_FILES)
    except (OSError, TypeError, ValueError):
        return False


def _is_processor(obj: Any) -> bool:
    return obj is not None and hasattr(obj, "image_processor") and hasattr(obj, "tokenizer")


def load_processor(path: str | Path) -> Any:
    """``AutoProcessor`` from a local directory, with a one-line error."""
    from transformers import AutoProcessor

    if not _has_processor(path):
        raise FastmergeError(f"no image processor in {path} (expected {' or '.join(_PROCESSOR_FILES)}: "
                             "the VLM's directory)")
    try:
        proc = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError, ImportError) as e:
        # ImportError: e.g. LLaVA-NeXT's image processor wants torchvision under older transformers
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise FastmergeError(f"cannot load the processor of {path}: {first}") from None
    if not _is_processor(proc):
        raise FastmergeError(f"{path}: AutoProcessor gave {type(proc).__name__}, not a vision-language processor "
                             "(with an image processor and a tokenizer)")
    return proc


def load_vlm(path: str | Path, device: str = "cpu", dtype: torch.dtype | str | None = None,
             allow_bin: bool = False) -> Any:
    """A vision-language model in eval mode on ``device`` from a local checkpoint directory
    (``AutoModelForImageTextToText``; dtype None: float32 on the CPU, the checkpoint's on a GPU)."""
    from transformers import AutoModelForImageTextToText

    from .evaluate import checkpoint_to_load

    path, dtype = checkpoint_to_load(path, device, dtype, allow_bin)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as e:
        raise FastmergeError(f"cannot load {path} as a vision-language model: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def _model_dir(model: Any) -> str | None:
    for obj in (model, getattr(model, "config", None)):
        for attr in ("name_or_path", "_name_or_path"):
            d = getattr(obj, attr, None)
            if isinstance(d, (str, os.PathLike)) and _has_processor(d):
                return os.fspath(d)
    return None


class VQAEvaluator:
    """EvoVLM-JP's VQA metric: ``{"score", "rouge_l", "rouge_l_ungated", "acc_lang", "n"}``.

    ``score`` = ``rouge_l`` = mean ROUGE-L F1 (best reference) with a response not in ``lang``
    scoring 0; ``rouge_l_ungated`` without that gate; ``acc_lang`` the share of responses detected as
    ``lang`` (fastText lid.176). With ``lang`` None there is no gate (``rouge_l`` ==
    ``rouge_l_ungated``, ``acc_lang`` 1.0) and fastText is not loaded.

    ``data``: JSONL path, or a list of records whose ``image`` is a path relative to ``image_root``
    (default: the working directory) or a PIL image. Records are read and every image opened once
    here, so a bad file fails before any model loads; images are decoded again for every call rather
    than kept (a data set's decoded images can be gigabytes).

    ``processor``: the VLM's processor, or its directory. Default: the ``tokenizer`` the evaluator is
    called with when that is a processor, else the directory the model was loaded from
    (``model.name_or_path``), else the tokenizer's; loaded once and kept. The prompt is the
    processor's chat template over one user message holding the image and the question (after an
    optional ``system`` message); ``template`` (a format string with ``{question}`` that places the
    processor's image token itself) replaces it for a processor without a chat template.

    Generation is greedy (``do_sample=False``), ``batch_size`` records at a time, left-padded, and
    the prompt is cut off; outputs are cut at the first ``stop`` string and stripped. After a call,
    ``last_outputs`` holds one dict per record (image, question, output, references, rouge_l, lang,
    lang_ok, rouge_l_gated).
    """

    #: ``fastmerge evolve`` over a VLM (PS) calls it with the VLM's processor in place of the tokenizer
    takes_processor = True

    def __init__(self, data: str | Path | list[dict], lang: str | None = None, batch_size: int = 8,
                 max_new_tokens: int = 64, limit: int | None = None, processor: Any = None,
                 system: str | None = None, template: str | None = None, stop: Sequence[str] | None = None,
                 image_root: str | Path | None = None, progress: Progress | None = None) -> None:
        from .evaluate import _check_template, _limit, _text_field, load_jsonl  # evaluate imports this module

        if batch_size < 1:
            raise FastmergeError(f"batch_size must be at least 1, got {batch_size}")
        if max_new_tokens < 1:
            raise FastmergeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if template is not None:
            _check_template(template)
        records, self.name = load_jsonl(data)
        records = _limit(records, limit)
        if isinstance(data, (str, Path)):
            root = Path(data).parent
        else:
            root = Path(image_root) if image_root is not None else Path.cwd()
        self.questions: list[str] = []
        self.references: list[list[str]] = []
        self.images: list[Any] = []  # a Path per record, or the PIL image given in memory
        self._where = [r["_where"] for r in records]
        Image = _image_module()
        for rec in records:  # record by record, so the first bad line is the one reported
            self.questions.append(_text_field(rec, "question"))
            self.references.append(_references(rec))
            if isinstance(rec.get("image"), Image.Image):
                self.images.append(rec["image"])
                continue
            path = _image_path(rec, root)
            _open_image(path, rec["_where"])
            self.images.append(path)
        self.lang = lang
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.system = system
        self.template = template
        self.stop = [s for s in (stop or ()) if s]
        self.progress = progress
        self.processor = processor
        self._processors: dict[str, Any] = {}
        self.last_outputs: list[dict] = []

    @property
    def metric_names(self) -> set[str]:
        return set(METRICS)

    # -- the processor and the prompts

    def resolve_processor(self, model: Any = None, tokenizer: Any = None) -> Any:
        """The processor to use (see the class doc for the order), loaded once per directory."""
        if self.processor is not None and not isinstance(self.processor, (str, os.PathLike)):
            return self.processor
        if self.processor is not None:
            where = os.fspath(self.processor)
        elif _is_processor(tokenizer):
            return tokenizer
        else:
            where = _model_dir(model) or (_model_dir(tokenizer) if tokenizer is not None else None)
            if where is None:
                raise FastmergeError("vqa evaluator: no processor: the model and tokenizer do not name a directory "
                                     "with one; pass processor: DIR (the VLM's directory)")
        if where not in self._processors:
            self._processors[where] = load_processor(where)
        return self._processors[where]

    def prompt(self, processor: Any, question: str) -> str:
        """The text of one record's prompt: chat template (or ``template``) with the image and question."""
        if self.template is not None:
            return self.template.format(question=question)
        if not getattr(processor, "chat_template", None):
            raise FastmergeError(f"the processor ({type(processor).__name__}) has no chat template; give the "
                                 "evaluator a template with {question} and the image token")
        messages: list[dict] = []
        if self.system is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]})
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _image(self, i: int) -> Any:
        img = self.images[i]
        return img.convert("RGB") if not isinstance(img, Path) else _open_image(img, self._where[i])

    # -- generation

    def generate(self, model: Any, processor: Any) -> list[str]:
        """Greedy answers, one per record, in record order (see the class doc)."""
        if not callable(getattr(model, "generate", None)) or not isinstance(model, torch.nn.Module):
            raise FastmergeError(f"the vqa evaluator runs a vision-language torch module with generate() "
                                 f"(the hf backend), not {type(model).__name__}")
        tok = processor.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        param = next(model.parameters())
        prompts = [self.prompt(processor, q) for q in self.questions]
        image_token = getattr(processor, "image_token", None)
        if isinstance(image_token, str) and image_token:
            # every record has one image: a prompt without the image token cannot take it (newer
            # processors say so; older ones pass it to the model, which fails in the middle of generate)
            for i, p in enumerate(prompts):
                if image_token not in p:
                    raise FastmergeError(f"{self._where[i]}: the processor ({type(processor).__name__}) cannot "
                                         f"encode this batch: the prompt has no image token {image_token!r}")
        # batches of similar prompt length pad less; the order does not change any answer
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            try:
                enc = processor(images=[self._image(i) for i in idx], text=[prompts[i] for i in idx],
                                return_tensors="pt", padding=True, padding_side="left")
            except (ValueError, TypeError, KeyError) as e:  # no pad token, no image token in a template, ...
                raise FastmergeError(f"{self._where[idx[0]]}: the processor ({type(processor).__name__}) cannot "
                                     f"encode this batch: {str(e).splitlines()[0] if str(e) else e!r}") from None
            enc = {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
                   if isinstance(v, torch.Tensor) else v for k, v in enc.items()}
            with torch.no_grad():
                out = model.generate(**enc, do_sample=False, num_beams=1, max_new_tokens=self.max_new_tokens,
                                     pad_token_id=pad_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for i, row in zip(idx, new.tolist()):
                outputs[i] = self._cut(tok.decode(row, skip_special_tokens=True))
            if self.progress is not None:
                self.progress(min(start + self.batch_size, len(order)), len(order))
        return outputs

    def _cut(self, text: str) -> str:
        cut = min((p for p in (text.find(s) for s in self.stop) if p >= 0), default=len(text))
        return text[:cut].strip()

    def __call__(self, model: Any, tokenizer: Any = None) -> dict:
        from .backends import Backend

        if isinstance(model, Backend):  # the hf backend wraps the live module; vLLM has no image path here
            inner = getattr(model, "model", None)
            if not isinstance(inner, torch.nn.Module):
                raise FastmergeError(f"the vqa evaluator runs on the hf backend (a torch module), "
                                     f"not {type(model).__name__}")
            model = inner
        processor = self.resolve_processor(model, tokenizer)
        outputs = self.generate(model, processor)
        items = []
        for img, q, out, refs in zip(self.images, self.questions, outputs, self.references):
            j = rouge.judge(out, refs, self.lang)
            items.append({"image": str(img) if isinstance(img, Path) else "<image>", "question": q, "output": out,
                          "references": refs, **j})
        self.last_outputs = items
        return rouge.aggregate(items)
