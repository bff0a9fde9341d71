"""LLaVA-style vision-language models as merge sources: their language model merged with text LLMs.

A VLM checkpoint (config.json with a ``text_config`` and a ``vision_config``: LLaVA, LLaVA-NeXT, ...)
holds a language model under one of these on-disk namings, and everything else (vision tower,
projector, LLaVA-NeXT's ``image_newline``) beside it:

============  ==========================================  ==============================
naming        language model                              its output head
============  ==========================================  ==============================
``legacy``    ``language_model.model.*`` (layers, embeds)  ``language_model.lm_head.*``
``v5``        ``model.language_model.*``                  ``lm_head.*``
``mixed``     ``model.language_model.model.*``            ``language_model.lm_head.*``
``flat``      ``model.*`` (Qwen2-VL's older checkpoints)   ``lm_head.*``
============  ==========================================  ==============================

(``legacy`` is what ``save_pretrained`` writes (transformers 5.24) and what the hub holds; ``v5`` is
transformers 5's module names; ``mixed`` is what transformers 5.4's ``save_pretrained`` writes, with
the vision side under ``model.``: checkpoints saved with it are on disk too.) ``LMView`` is a ``CheckpointReader`` of such a checkpoint that shows the language
model under a text model's names (``model.layers.N...``, ``model.embed_tokens``, ``model.norm``,
``lm_head``) and its ``text_config`` as its config, so the plan pairs its tensors with the text
models' exactly as it pairs text models. The other tensors (``extra``) stay readable under their
own names: the plan carries them from the output's frame unchanged.

Which name keys a tensor's random stream (DARE / DELLA masks, the Philox stream of the fused op and
the torch-route methods): the text name (``TensorPlan.key``), so the merged VLM's language model
equals, bit for bit and mask for mask, the text-only merge of the same tensors. The output keeps
the frame's on-disk naming (``TensorPlan.name``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import FastmergeError
from .io import CheckpointReader, TensorMeta

#: naming -> (on-disk prefix, text-model prefix) of the language model's tensors, head last
NAMINGS: dict[str, tuple[tuple[str, str], ...]] = {
    "legacy": (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
    "v5": (("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    "mixed": (("model.language_model.model.", "model."), ("language_model.lm_head.", "lm_head.")),
    # Qwen2-VL's older checkpoints: the language model at the top, as a text model's (``visual.*`` beside)
    "flat": (("model.", "model."), ("lm_head.", "lm_head.")),
}
#: naming -> the tensor that shows a checkpoint uses it (tried in this order)
_MARKS = {"mixed": "model.language_model.model.", "legacy": "language_model.model.", "v5": "model.language_model.",
          "flat": "model.layers."}
#: the processor files a VLM output carries from its frame (the tokenizer files: engine.TOKENIZER_FILES)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja", "special_tokens_map.json")
#: config keys of the image (and video) token id, remapped when the output vocabulary is rebuilt
IMAGE_TOKEN_KEYS = ("image_token_index", "image_token_id", "video_token_index", "video_token_id")
#: what the one error of a DFS search over a VLM says
DFS_UNSUPPORTED = "DFS over a VLM's language model is not supported"


def is_vlm(config: dict) -> bool:
    """A vision-language model's config: nested ``text_config`` and ``vision_config``."""
    return isinstance(config.get("text_config"), dict) and isinstance(config.get("vision_config"), dict)


def read_config(file: Path) -> dict:
    """A config.json as a dict ({} when there is none)."""
    from .io import read_json_object

    return read_json_object(file, "config") if file.is_file() else {}


def naming_of(names, where: Path | str) -> str:
    """``mixed``, ``legacy``, ``v5`` or ``flat``: how a VLM checkpoint names its language model's tensors."""
    names = list(names)
    for naming, mark in _MARKS.items():
        if any(n.startswith(mark) for n in names):
            return naming
    raise FastmergeError(f"{where}: config.json describes a vision-language model (text_config + vision_config), "
                         "but no language-model tensors were found (language_model.model.*, "
                         "model.language_model.* or model.layers.*)")


def to_text(name: str, naming: str) -> str | None:
    """A VLM tensor's name in its language model as a text model names it, or None (not the LM's)."""
    for disk, text in NAMINGS[naming]:
        if name.startswith(disk):
            return text + name[len(disk):]
    return None


def to_disk(text_name: str, naming: str) -> str:
    """A text-model tensor name as a VLM of ``naming`` stores its language model's."""
    for disk, text in NAMINGS[naming]:
        if text_name.startswith(text):
            return disk + text_name[len(text):]
    raise FastmergeError(f"tensor {text_name}: not a language-model tensor name (model.* or lm_head.*)")


def module_name(name: str, naming: str) -> str:
    """A VLM checkpoint's tensor name as transformers 5's module names it: ``v5`` names are module
    names already; otherwise the language model goes to ``model.language_model``, its head to the
    top, everything else under ``model.`` (where ``mixed`` has it already)."""
    if naming == "v5":
        return name
    text = to_text(name, naming)
    if text is not None:
        return text if text.startswith("lm_head.") else "model.language_model." + text[len("model."):]
    return name if naming == "mixed" else "model." + name


def rename(name: str, src: str, dst: str) -> str:
    """A LLaVA-style checkpoint's tensor name in naming ``src`` as naming ``dst`` writes it (``legacy``,
    ``v5``, ``mixed``: ``flat`` is another model family's layout)."""
    if "flat" in (src, dst):
        raise FastmergeError("rename: the flat naming is not a LLaVA layout")
    text = to_text(name, src)
    if text is not None:
        return to_disk(text, dst)
    module = module_name(name, src)
    return module[len("model."):] if dst == "legacy" and module.startswith("model.") else module


class LMView(CheckpointReader):
    """A VLM checkpoint seen as its language model: ``tensors`` and ``config`` are the language
    model's under text names (``model.layers.N...``, ``lm_head.weight``) and its ``text_config``;
    ``extra`` (on-disk name -> meta) holds every other tensor, read by its own name."""

    full_config: dict
    naming: str
    extra: dict[str, TensorMeta]

    @classmethod
    def of(cls, reader: CheckpointReader) -> LMView:
        """The view of an opened reader (sharing its files and maps)."""
        view = cls.__new__(cls)
        view.__dict__.update(reader.__dict__)
        view.full_config = reader.config
        view.config = dict(reader.config["text_config"])
        view.naming = naming_of(reader.tensors, reader.path)
        view.tensors, view.extra = {}, {}
        for name, meta in reader.tensors.items():
            text = to_text(name, view.naming)
            if text is None:
                view.extra[name] = meta
            else:
                view.tensors[text] = meta
        return view

    def meta(self, name: str) -> TensorMeta:
        meta = self.tensors.get(name) or self.extra.get(name)
        if meta is None:
            raise FastmergeError(f"{self.path}: tensor {name} not found")
        return meta

    def disk_name(self, text_name: str) -> str:
        """Where this checkpoint stores a language-model tensor of that text name."""
        meta = self.tensors.get(text_name)
        return meta.name if meta is not None else to_disk(text_name, self.naming)


def view(reader: CheckpointReader) -> CheckpointReader:
    """The reader as the plan reads it: an ``LMView`` for a VLM, itself otherwise."""
    return LMView.of(reader) if is_vlm(reader.config) and not isinstance(reader, LMView) else reader


@dataclass(frozen=True)
class Frame:
    """The VLM an output is a checkpoint of (the recipe's name for it, its directory, its naming)."""

    model: str
    path: Path
    naming: str


def check_family(models: list[str], readers: dict[str, CheckpointReader]) -> None:
    """A VLM's language model merges with text models of its size: one line naming two models whose
    hidden sizes differ."""
    sizes = [(m, _hidden_size(readers[m])) for m in models]
    sizes = [(m, h) for m, h in sizes if isinstance(h, int)]
    other = next(((m, h) for m, h in sizes if h != sizes[0][1]), None)
    if other is None:
        return

    def what(m: str, h: int) -> str:
        return f"{m} ({'a VLM, its language model has ' if isinstance(readers[m], LMView) else ''}hidden_size {h})"

    raise FastmergeError(f"hidden sizes differ: {what(*sizes[0])} vs {what(*other)}; a VLM's language model "
                         "merges only with text models of the same family and size")


def _hidden_size(reader: CheckpointReader) -> int | None:
    """The config's hidden size, else the embeddings' width (a sparse hub text_config)."""
    h = reader.config.get("hidden_size")
    emb = reader.tensors.get("model.embed_tokens.weight")
    return h if isinstance(h, int) else emb.shape[-1] if emb is not None and len(emb.shape) == 2 else None


def frame_config(view: LMView, model: str, text_config: dict, vocab=None) -> dict:
    """The output VLM's config: the frame's, with the merged language model's ``text_config`` (layer
    count, vocabulary size) and, when the vocabulary was rebuilt, the image token's new id."""
    config = dict(view.full_config)
    text = dict(view.full_config["text_config"])
    # the merged model's layer count and vocabulary size always; other keys where the frame's has them
    # (a hub text_config leaves the text model's defaults out: so does the output's)
    text.update({k: v for k, v in text_config.items() if k in text or k in ("vocab_size", "num_hidden_layers")})
    config["text_config"] = text
    if vocab is not None:
        own = vocab.original.get(model)
        by_id = {i: t for t, i in (own or {}).items()}
        for key in IMAGE_TOKEN_KEYS:
            old = config.get(key)
            if not isinstance(old, int) or not own:
                continue
            token = by_id.get(old)
            if token is None or token not in vocab.vocab:
                raise FastmergeError(f"{view.path}: {key} {old} names no token the output vocabulary keeps; "
                                     "use a tokenizer source that holds the VLM's image token")
            config[key] = vocab.vocab[token]
    return config
