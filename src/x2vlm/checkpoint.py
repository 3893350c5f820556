"""Checkpoints: the released (official) layouts, our directory format, strict loading.

Official ``.th``/``.pth`` files hold ``{'model': state_dict, 'config': yaml}`` or a bare state dict
whose layout depends on the official class (see ``../shared/parity`` key listings). Loading maps
every key explicitly: it is renamed (``official_to_native``), adapted (relative-position tables
resized, frame positions copied), or ignored by a named rule (regenerated buffers, tied aliases).
Whatever is left must match the model exactly, or one error lists every missing, unexpected and
mis-shaped key.

Our format is a directory: ``config.json`` + ``model.safetensors`` (native names) + tokenizer files.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from x2vlm.config import X2VLMConfig
from x2vlm.models.beit import relative_position_index, resize_abs_pos_embed, resize_relative_position_bias_table
from x2vlm.models.x2vlm import X2VLM

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model; the message lists every offending key."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], mis_shaped: list[str]):
        self.missing, self.unexpected, self.mis_shaped = missing, unexpected, mis_shaped
        lines = [f"checkpoint {source} does not match the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mis_shaped)):
            if keys:
                lines.append(f"  {title} ({len(keys)}):")
                lines.extend(f"    {k}" for k in keys)
        super().__init__("\n".join(lines))


# -- reading files ---------------------------------------------------------------------------------
def read_state_dict(path: str | Path, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors``, ``.th``, ``.pth``, ``.bin`` or ``.tar`` file (bare or under ``model``).

    Torch files are opened with ``weights_only=True``. Some official files also pickle their YAML
    config objects, which that refuses; they are then read with full unpickling only when
    ``allow_unsafe_pickle`` is set, because unpickling runs code from the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return dict(load_file(str(path)))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_unsafe_pickle:
            raise ValueError(
                f"{path}: the file contains Python objects besides tensors, which safe loading refuses "
                f"({str(err).splitlines()[0]}). If you trust its origin, pass allow_unsafe_pickle=True "
                "(CLI: --allow-unsafe-pickle): unpickling can execute code stored in the file."
            ) from err
        log.warning("%s: loading with full unpickling (allow_unsafe_pickle) — only do this for files you trust", path)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (or a dict with key 'model'), got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    others = sorted(k for k in obj if k not in tensors)
    if others:
        raise ValueError(f"{path}: state dict entries that are not tensors: {others[:10]}")
    return tensors


# -- official layout -> native ---------------------------------------------------------------------
# Renames, most specific first. The tied decoder aliases are handled by IGNORED_TIED below.
_RENAMES: list[tuple[str, str]] = [
    ("text_encoder.bert.", "text_encoder."),
    ("text_encoder.roberta.", "text_encoder."),
    ("text_encoder.cls.predictions.transform.", "mlm_head.transform."),
    ("text_encoder.cls.predictions.bias", "mlm_head.bias"),
    ("text_decoder.bert.", "answer_decoder."),
    ("text_decoder.cls.predictions.transform.", "answer_head.transform."),
    ("text_decoder.cls.predictions.bias", "answer_head.bias"),
    # XVLMPlus / CCLM: ``mlm_head = BertOnlyMLMHead`` beside the text encoder, its decoder not tied
    ("mlm_head.predictions.transform.", "mlm_head.transform."),
    ("mlm_head.predictions.bias", "mlm_head.bias"),
    ("mlm_head.predictions.decoder.weight", "mlm_head.decoder.weight"),
]

# Keys that are copies of another tensor (weight tying); value = the key it must equal.
_TIED: dict[str, str] = {
    "text_encoder.cls.predictions.decoder.weight": "text_encoder.embeddings.word_embeddings.weight",
    "text_encoder.cls.predictions.decoder.bias": "mlm_head.bias",
    "text_decoder.cls.predictions.decoder.weight": "answer_decoder.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "answer_head.bias",
    "mlm_head.predictions.decoder.bias": "mlm_head.bias",
}

# Buffers the model regenerates for its own shape; loading ignores them by rule.
_REGENERATED = (
    re.compile(r".*\.relative_position_index$"),
    re.compile(r".*embeddings\.position_ids$"),
    re.compile(r".*embeddings\.token_type_ids$"),
    re.compile(r"^crit_mask_lm_smoothed\.one_hot$"),  # label-smoothing constant of the captioning loss
)


def official_to_native(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an official state dict to native names. Returns (native dict, ignored keys with reasons).

    Tied aliases must equal their partner (checked after renaming); regenerated buffers are dropped.
    """
    native: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    tied: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if any(p.match(key) for p in _REGENERATED):
            ignored.append(f"{key} (regenerated buffer)")
            continue
        if key in _TIED:
            tied[key] = value
            continue
        new = key
        for old_prefix, new_prefix in _RENAMES:
            if key.startswith(old_prefix):
                new = new_prefix + key[len(old_prefix):]
                break
        if new in native:
            raise ValueError(f"checkpoint has two keys for {new!r} (one of them is {key!r})")
        native[new] = value
    for key, value in tied.items():
        partner = _TIED[key]
        if partner in native and not torch.equal(native[partner], value):
            raise ValueError(f"checkpoint key {key!r} should be tied to {partner!r} but holds different values")
        if partner not in native:
            # Only the alias was stored; use it as the real tensor.
            native[partner] = value
        ignored.append(f"{key} (tied to {partner})")
    return native, ignored


def native_to_official(model: X2VLM) -> dict[str, torch.Tensor]:
    """The model's weights in the official layout of its task's class, in the official key order,
    with the buffers (relative-position index, position ids) and tied aliases the releases store."""
    cfg = model.cfg
    if cfg.cross_num_layers:
        return _native_to_cclm(model)
    has_mlm = "mlm" in cfg.heads
    text_prefix = "text_encoder.bert." if has_mlm else "text_encoder."
    renames = [
        ("text_encoder.", text_prefix),
        ("mlm_head.", "text_encoder.cls.predictions."),
        ("answer_decoder.", "text_decoder.bert."),
        ("answer_head.", "text_decoder.cls.predictions."),
    ]
    position_ids = torch.arange(cfg.text.max_position_embeddings).unsqueeze(0)
    out: dict[str, torch.Tensor] = {}
    native = model.state_dict()
    for key, value in native.items():
        new = next((official + key[len(ours):] for ours, official in renames if key.startswith(ours)), key)
        if new.endswith("embeddings.word_embeddings.weight"):
            out[new.replace("word_embeddings.weight", "position_ids")] = position_ids  # a buffer: listed first
        out[new] = value
        if new.endswith("attn.relative_position_bias_table"):
            block = int(new.split(".")[2])
            out[new.replace("bias_table", "index")] = model.vision_encoder.blocks[block].attn.relative_position_index.clone()
        if new.endswith("cls.predictions.transform.LayerNorm.bias"):  # tied decoder after the transform
            head = new[: -len("transform.LayerNorm.bias")]
            words = out[head.replace("cls.predictions.", "bert.embeddings.word_embeddings.weight")]
            out[head + "decoder.weight"] = words
            out[head + "decoder.bias"] = out[head + "bias"]
    if cfg.task == "captioning":
        out["crit_mask_lm_smoothed.one_hot"] = _smoothed_one_hot(cfg)
    return out


def _native_to_cclm(model: X2VLM) -> dict[str, torch.Tensor]:
    """The CCLM / ``XVLMPlus*`` layout (spec §2.4): ``text_encoder.{embeddings,encoder}.*`` (a bare
    RoBERTa/XLM-R, with its ``position_ids`` buffer), ``cross_encoder.encoder.layer.*``, the MLM head
    at ``mlm_head.predictions.*`` with its own decoder (the word embeddings when ours is tied) and
    ``decoder.bias`` aliasing ``predictions.bias``."""
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.startswith("mlm_head."):
            continue
        if key == "text_encoder.embeddings.word_embeddings.weight":
            out["text_encoder.embeddings.position_ids"] = torch.arange(cfg.text.max_position_embeddings).unsqueeze(0)
        out[key] = value
        if key.endswith("attn.relative_position_bias_table"):
            block = int(key.split(".")[2])
            out[key.replace("bias_table", "index")] = model.vision_encoder.blocks[block].attn.relative_position_index.clone()
    if "mlm" in cfg.heads:
        head = model.mlm_head
        for name, value in head.transform.state_dict().items():
            out[f"mlm_head.predictions.transform.{name}"] = value
        out["mlm_head.predictions.bias"] = head.bias.detach()
        decoder = head.decoder.weight if cfg.untied_mlm_decoder else model.text_encoder.embeddings.word_embeddings.weight
        out["mlm_head.predictions.decoder.weight"] = decoder.detach().clone()
        out["mlm_head.predictions.decoder.bias"] = out["mlm_head.predictions.bias"]
    return out


def _smoothed_one_hot(cfg: X2VLMConfig) -> torch.Tensor:
    """The official captioning criterion's buffer: ε/(V-2) everywhere, 0 at the ignore id ([CLS])."""
    vocab = cfg.text.vocab_size
    one_hot = torch.full((1, vocab), cfg.label_smoothing / (vocab - 2))
    one_hot[0, cfg.text.cls_token_id] = 0.0
    return one_hot


# -- pre-training checkpoint -> a task model ---------------------------------------------------------
def pretrain_to_task(native: dict[str, torch.Tensor], cfg: X2VLMConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The official pre-train -> fine-tune mapping for ``cfg.task``, as explicit rules.

    Heads the task's class lacks are dropped (listed in the returned notes); for VQA the answer
    decoder is filled from the fusion layers (decoder layer d <- fusion layer ``fusion_start + d``,
    or only the odd fusion layers when the decoder has half as many), its embeddings from the text
    embeddings and its head from the MLM head.
    """
    heads = set(cfg.heads)
    head_prefixes = {
        "itc": ("temp", "vision_proj.", "text_proj."),
        "itm": ("itm_head.",),
        "bbox": ("bbox_head.",),
        "mlm": ("mlm_head.",),
    }
    out = dict(native)
    notes: list[str] = []
    if "answer_decoder" in heads and not any(k.startswith("answer_decoder.") for k in native):
        out.update(_answer_decoder_from_fusion(native, cfg))
        notes.append("answer_decoder filled from the fusion layers, text embeddings and MLM head")
    for head, prefixes in head_prefixes.items():
        if head in heads:
            continue
        dropped = [k for k in out if k.startswith(prefixes)]
        for k in dropped:
            del out[k]
        if dropped:
            notes.append(f"dropped {len(dropped)} '{head}' head weights the '{cfg.task}' model does not have")
    return out, notes


def _answer_decoder_from_fusion(native: dict[str, torch.Tensor], cfg: X2VLMConfig) -> dict[str, torch.Tensor]:
    """Decoder layers from the fusion layers (``text_encoder.encoder.layer.<fusion_start + d>``, or
    with a separate cross encoder ``cross_encoder.encoder.layer.<d>`` as ``XVLMPlusForVQA`` does),
    embeddings from the text encoder's and the head from the MLM head where the checkpoint has them.
    (The official XVLMPlus decoder trains its embeddings and LM head from scratch; here they start
    from the text encoder's word embeddings, a better start for the same vocabulary.)"""
    if cfg.cross_num_layers:
        fusion_start, num_fusion, layer_prefix = 0, cfg.cross_num_layers, "cross_encoder.encoder.layer."
    else:
        fusion_start, num_fusion, layer_prefix = cfg.text.fusion_start, cfg.text.num_layers - cfg.text.fusion_start, "text_encoder.encoder.layer."
    if cfg.num_dec_layers == num_fusion:
        source = {d: fusion_start + d for d in range(cfg.num_dec_layers)}
    elif 2 * cfg.num_dec_layers == num_fusion:
        source = {d: fusion_start + 2 * d + 1 for d in range(cfg.num_dec_layers)}
    else:
        raise ValueError(f"cannot initialise {cfg.num_dec_layers} decoder layers from {num_fusion} fusion layers")
    if cfg.vision.width != cfg.text.hidden_size:
        raise ValueError("answer decoder initialisation needs vision width == text width (cross-attention K/V reuse)")
    out: dict[str, torch.Tensor] = {}
    for d, layer in source.items():
        prefix = f"{layer_prefix}{layer}."
        for key, value in native.items():
            if key.startswith(prefix):
                out[f"answer_decoder.encoder.layer.{d}." + key[len(prefix):]] = value.clone()
    for key, value in native.items():
        if key.startswith("text_encoder.embeddings."):
            out["answer_decoder." + key[len("text_encoder."):]] = value.clone()
        elif key.startswith("mlm_head."):
            out["answer_head." + key[len("mlm_head."):]] = value.clone()
    return out


# -- adaptation to the model's resolution and frame count -------------------------------------------
def adapt_to_model(native: dict[str, torch.Tensor], model: X2VLM) -> list[str]:
    """Resize relative-position tables and frame positions in place to the model's shapes."""
    notes = []
    own = model.state_dict()
    for key in list(native):
        if key.endswith("relative_position_bias_table") and key in own and native[key].shape != own[key].shape:
            src = native[key].shape[0]
            native[key] = resize_relative_position_bias_table(native[key], model.vision_encoder.grid)
            notes.append(f"{key}: resized {src} -> {native[key].shape[0]} rows")
    key = "vision_encoder.pos_embed"
    if key in native and key in own and native[key].shape != own[key].shape:
        src = native[key].shape
        native[key] = resize_abs_pos_embed(native[key], model.vision_encoder.grid)
        notes.append(f"{key}: resized {tuple(src)} -> {tuple(native[key].shape)}")
    key = "absolute_frame_pos_embed"
    if key in native and key in own and native[key].shape != own[key].shape:
        src = native[key]
        if src.shape[0] != 1 or src.shape[2:] != own[key].shape[2:]:
            raise CheckpointMismatchError("(frame positions)", [], [], [f"{key}: {tuple(src.shape)} vs {tuple(own[key].shape)}"])
        dst = own[key].clone()
        n = min(src.shape[1], dst.shape[1])
        dst[:, :n] = src[:, :n]
        native[key] = dst
        notes.append(f"{key}: copied {n} of {src.shape[1]} frame positions into {dst.shape[1]}")
    return notes


def check_and_load(model: X2VLM, native: Mapping[str, torch.Tensor], source: str, allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Strict load: every key must exist with the same shape. ``allow_missing`` prefixes name new heads
    that keep their fresh initialisation; those keys are returned (the 'new parameters')."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in native)
    new_params = [k for k in missing if k.startswith(allow_missing)] if allow_missing else []
    missing = [k for k in missing if k not in new_params]
    unexpected = sorted(k for k in native if k not in own)
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(native[k].shape)} vs model {tuple(own[k].shape)}"
        for k in native
        if k in own and native[k].shape != own[k].shape
    )
    if missing or unexpected or mis_shaped:
        raise CheckpointMismatchError(source, missing, unexpected, mis_shaped)
    # A model built on the meta device (shape checks, deferred allocation) takes the tensors as they are.
    assign = any(p.is_meta for p in model.parameters())
    model.load_state_dict({**{k: own[k] for k in new_params}, **native}, strict=True, assign=assign)
    return new_params


def load_official(
    model: X2VLM, path_or_state: str | Path | Mapping[str, torch.Tensor], from_pretraining: bool | None = None, allow_unsafe_pickle: bool = False
) -> list[str]:
    """Load an official checkpoint into ``model`` strictly; returns the names of newly initialised parameters.

    ``from_pretraining``: the file is a pre-training checkpoint being turned into a task model (the
    official ``load_pretrained(is_eval=False)``): heads the task lacks are dropped, the VQA decoder
    is built from the fusion layers, and task heads absent from pre-training (``cls_head``) start
    fresh. By default this is decided from the keys (a pre-training file has ``text_encoder.cls``
    and ``itm_head``) and the model's task.
    """
    if isinstance(path_or_state, (str, Path)):
        source, state = str(path_or_state), read_state_dict(path_or_state, allow_unsafe_pickle)
    else:
        source, state = "(state dict)", dict(path_or_state)
    native, ignored = official_to_native(state)
    for note in ignored:
        log.debug("ignored %s", note)
    if is_cclm_state(native) and not model.cfg.cross_num_layers:
        raise ValueError(
            f"{source}: a CCLM / XVLMPlus checkpoint (a separate cross encoder, cross_encoder.encoder.layer.*, and an "
            f"XLM-R/RoBERTa text encoder of vocabulary {_text_vocab(native)}), but the model {model.cfg.name!r} has no cross "
            "encoder. Its text encoder's configuration is missing: give the Hugging Face directory of the text encoder "
            "it was trained with (XLM-R: config.json + sentencepiece.bpe.model) — `x2vlm convert SRC OUT --preset "
            "x2vlm-base --text-encoder HF_DIR` — or, for training, a multilingual model config (`model:` a config.json "
            "with cross_num_layers, as `x2vlm convert --text-encoder` writes)."
        )
    _tie_or_keep_mlm_decoder(native, model, source)
    if from_pretraining is None:
        from_pretraining = model.cfg.task != "pretrain" and "itm_head.0.weight" in native and "mlm_head.bias" in native
    allow_missing: tuple[str, ...] = ()
    if from_pretraining:
        native, notes = pretrain_to_task(native, model.cfg)
        for note in notes:
            log.info("%s", note)
        allow_missing = ("cls_head.",)
    if model.cfg.add_frame_pos:  # an image checkpoint continued as a video model (1B stage 2)
        allow_missing += ("absolute_frame_pos_embed",)
    for note in adapt_to_model(native, model):
        log.info("%s", note)
    return check_and_load(model, native, source, allow_missing)


def is_cclm_state(native: Mapping[str, torch.Tensor]) -> bool:
    """A CCLM / XVLMPlus state dict (native names): it has a separate cross encoder."""
    return any(k.startswith("cross_encoder.") for k in native)


def _text_vocab(native: Mapping[str, torch.Tensor]) -> str:
    words = native.get("text_encoder.embeddings.word_embeddings.weight")
    return "unknown" if words is None else str(words.shape[0])


def _tie_or_keep_mlm_decoder(native: dict[str, torch.Tensor], model: X2VLM, source: str) -> None:
    """An untied MLM decoder (``mlm_head.decoder.weight``) in the checkpoint for a model whose head is
    tied: dropped when it equals the word embeddings, refused (by name) otherwise. Models without an
    MLM head drop it with the head (``pretrain_to_task``)."""
    key = "mlm_head.decoder.weight"
    if key not in native or model.cfg.untied_mlm_decoder or "mlm" not in model.cfg.heads:
        return
    words = native.get("text_encoder.embeddings.word_embeddings.weight")
    if words is not None and torch.equal(words, native[key]):
        del native[key]
        return
    raise ValueError(f"{source}: the MLM decoder (mlm_head.predictions.decoder.weight) is not tied to the word embeddings; "
                     "build the model with untied_mlm_decoder=true (infer_config / cclm_config set it from the checkpoint)")


# -- our directory format ------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_pretrained(
    model: X2VLM,
    directory: str | Path,
    tokenizer_files: Mapping[str, str | Path] | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (atomically), plus tokenizer files if given.
    ``state``: the full state dict when the model itself is sharded (see ``full_state_dict``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in (state if state is not None else model.state_dict()).items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "x2vlm_task": model.cfg.task}))
    _atomic_write(directory / CONFIG_NAME, lambda tmp: model.cfg.save(tmp))
    for name, src in (tokenizer_files or {}).items():
        data = Path(src).read_bytes()
        _atomic_write(directory / name, lambda tmp, data=data: Path(tmp).write_bytes(data))
    return directory


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copy of the weights; a collective under FSDP (every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in model.state_dict().items()}


def from_pretrained(directory: str | Path, map_location: str | torch.device = "cpu") -> X2VLM:
    """Build the model from ``config.json`` and load ``model.safetensors`` strictly."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME} (not an x2vlm model directory)")
    cfg = X2VLMConfig.load(directory / CONFIG_NAME)
    model = X2VLM(cfg)
    state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
    check_and_load(model, state, str(directory / WEIGHTS_NAME))
    return model.eval()


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory from what a user may name: the directory itself, a training run (its
    latest checkpoint), a ``checkpoints/`` folder, or its ``latest`` pointer file."""
    path = Path(path)
    for pointer in (path if path.name == "latest" else None, path / "latest", path / "checkpoints" / "latest"):
        if pointer is not None and pointer.is_file():
            return pointer.parent / pointer.read_text().strip()
    if not (path / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (not an x2vlm model directory, run directory or 'latest' pointer)")
    return path


def resolve_trained_model_dir(path: str | Path) -> Path:
    """The model to evaluate or run: a fine-tuning run's selected weights (``best/``) when it has
    them, else what ``resolve_model_dir`` finds (the directory itself or the latest checkpoint)."""
    path = Path(path)
    if (path / "best" / CONFIG_NAME).exists():
        return path / "best"
    return resolve_model_dir(path)


ENCODER_PREFIXES = ("vision_encoder.", "text_encoder.", "cross_encoder.")


def load_ours(model: X2VLM, path: str | Path) -> list[str]:
    """One of our model directories into ``model`` (of any task). A checkpoint of another task (a
    pre-training one, typically) goes through the official mapping (``pretrain_to_task``); tables
    and frame positions are adapted; encoders must load completely, while heads the checkpoint
    lacks (a new classifier, say) start fresh and are returned as the new parameters."""
    directory = resolve_model_dir(path)
    state = load_file(str(directory / WEIGHTS_NAME))
    source_task = X2VLMConfig.load(directory / CONFIG_NAME).task
    notes: list[str] = []
    if source_task != model.cfg.task:
        state, notes = pretrain_to_task(state, model.cfg)
    notes += adapt_to_model(state, model)
    for note in notes:
        log.info("%s: %s", directory, note)
    heads = tuple(sorted({k.split(".")[0] + ("." if "." in k else "") for k in model.state_dict() if not k.startswith(ENCODER_PREFIXES)}))
    new = check_and_load(model, state, str(directory / WEIGHTS_NAME), allow_missing=heads + ("absolute_frame_pos_embed",))
    if new:
        log.info("%s: newly initialised (not in the checkpoint): %s", directory, ", ".join(sorted({k.split(".")[0] for k in new})))
    return new


def infer_config(state: Mapping[str, torch.Tensor], base: X2VLMConfig) -> X2VLMConfig:
    """Adjust a preset to an official state dict: task from its heads, image size from its
    relative-position tables, absolute positions, frame positions and label count from their shapes."""
    native, _ = official_to_native(state)
    changes: dict = {}
    if "answer_decoder.embeddings.word_embeddings.weight" in native:
        changes["task"] = "vqa"
        changes["num_dec_layers"] = 1 + max(int(k.split(".")[3]) for k in native if k.startswith("answer_decoder.encoder.layer."))
    elif "cls_head.0.weight" in native:
        in_dim = native["cls_head.0.weight"].shape[1]
        if in_dim == 2 * base.text.hidden_size:
            changes["task"] = "nlvr"
        else:
            changes["task"] = "classification"
            changes["num_labels"] = native["cls_head.3.weight"].shape[0]
    elif "crit_mask_lm_smoothed.one_hot" in state or ("mlm_head.bias" in native and "itm_head.0.weight" not in native):
        changes["task"] = "captioning"
    elif "mlm_head.bias" in native:
        changes["task"] = "pretrain"
    elif "itm_head.0.weight" in native:
        changes["task"] = "retrieval"
    elif "bbox_head.0.weight" in native:
        changes["task"] = "grounding"
    table = native.get("vision_encoder.blocks.0.attn.relative_position_bias_table")
    if table is not None:
        grid = (round((table.shape[0] - 3) ** 0.5) + 1) // 2
        changes["image_res"] = grid * base.vision.patch_size
    if "vision_encoder.pos_embed" in native:
        changes["vision"] = {"abs_pos_embed": True}
    frames = native.get("absolute_frame_pos_embed")
    if frames is not None:
        changes["frame_len"], changes["add_frame_pos"] = frames.shape[1], True
    elif base.add_frame_pos:
        changes["frame_len"], changes["add_frame_pos"] = 0, False
    words = native.get("text_encoder.embeddings.word_embeddings.weight")
    decoder = native.get("mlm_head.decoder.weight")
    changes["untied_mlm_decoder"] = decoder is not None and (words is None or not torch.equal(words, decoder))
    return base.replace(**changes)


def cclm_config(state: Mapping[str, torch.Tensor], base: X2VLMConfig, text_dir: str | Path | None) -> X2VLMConfig:
    """The config of a released CCLM / XVLMPlus checkpoint (spec §2.4, §2.5.4): ``base`` (an X²-VLM
    preset: vision tower, the cross encoder's BERT settings) adjusted to the file as ``infer_config``
    does, the cross encoder as deep as the file's ``cross_encoder.encoder.layer.*``, and the text
    encoder from the Hugging Face directory ``text_dir`` (its config.json and tokenizer; the file
    alone does not say the text encoder's heads, eps or positions)."""
    native, _ = official_to_native(state)
    if not is_cclm_state(native):
        raise ValueError("not a CCLM / XVLMPlus checkpoint: it has no cross_encoder.encoder.layer.* keys")
    if text_dir is None:
        raise ValueError(
            f"a CCLM / XVLMPlus checkpoint (XLM-R/RoBERTa text encoder of vocabulary {_text_vocab(native)}, separate cross "
            "encoder) needs its text encoder's configuration, which the file does not hold: pass the Hugging Face directory "
            "it was trained with (--text-encoder HF_DIR: config.json + sentencepiece.bpe.model, e.g. xlm-roberta-base)"
        )
    cross_layers = 1 + max(int(k.split(".")[3]) for k in native if k.startswith("cross_encoder.encoder.layer."))
    cfg = infer_config(state, base)
    text = dataclasses.replace(cfg.text, num_layers=cfg.text.fusion_start + cross_layers)
    untied = cfg.untied_mlm_decoder
    cfg = multilingual_config(cfg.replace(text=dataclasses.asdict(text), untied_mlm_decoder=False), text_dir)
    return cfg.replace(name=cfg.name.replace("-multilingual", "-cclm"), untied_mlm_decoder=untied)


def regenerate_buffers_match(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys whose stored relative-position index differs from the one we compute (should be none)."""
    bad = []
    for key, value in state.items():
        if key.endswith("relative_position_index"):
            grid = round((value.shape[0] - 1) ** 0.5)
            if not torch.equal(value, relative_position_index(grid)):
                bad.append(key)
    return bad


# -- text encoder from a Hugging Face BERT directory ------------------------------------------------
def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).exists():
            return read_state_dict(directory / name)
    raise FileNotFoundError(f"{directory}: no model.safetensors or pytorch_model.bin")


def bert_layer_sources(num_bert_layers: int, num_text_layers: int, num_fusion_layers: int) -> tuple[list[int], list[int]]:
    """Which BERT layer initialises each text layer and each fusion layer (official recipe).

    Text layer i <- BERT layer i (or layer 2i+1 when BERT has twice as many layers, the
    ``bert-large-uncased-12l`` recipe); fusion layers <- the upper text-source layers again
    (18-layer X²-VLM from 12-layer BERT: fusion 12..17 <- BERT 6..11)."""
    if num_bert_layers == num_text_layers:
        text_src = list(range(num_text_layers))
    elif num_bert_layers == 2 * num_text_layers:
        text_src = list(range(1, num_bert_layers, 2))
    else:
        raise ValueError(f"cannot map a {num_bert_layers}-layer BERT onto {num_text_layers} text layers")
    if num_fusion_layers > len(text_src):
        raise ValueError(f"cannot initialise {num_fusion_layers} fusion layers from {len(text_src)} text layers")
    return text_src, text_src[len(text_src) - num_fusion_layers :]


def load_hf_bert_text_encoder(model: X2VLM, directory: str | Path) -> list[str]:
    """Initialise the text (and fusion self-attention/FFN) layers, embeddings and, if present, the
    MLM head from a Hugging Face BERT directory. Returns the parameters left new (cross-attention,
    heads), which the optimiser treats as newly initialised."""
    import json

    directory = Path(directory)
    hf_cfg = json.loads((directory / "config.json").read_text())
    t = model.cfg.text
    for ours, theirs in (("hidden_size", "hidden_size"), ("num_heads", "num_attention_heads"), ("intermediate_size", "intermediate_size"), ("vocab_size", "vocab_size")):
        if getattr(t, ours) != hf_cfg.get(theirs):
            raise ValueError(f"{directory}/config.json: {theirs}={hf_cfg.get(theirs)} but the model has text.{ours}={getattr(t, ours)}")
    weights = {}
    for key, value in _read_hf_weights(directory).items():
        key = key.replace(".gamma", ".weight").replace(".beta", ".bias")
        weights[key[len("bert."):] if key.startswith("bert.") else key] = value
    num_text = model.num_text_layers if model.cross_encoder is None else t.num_layers
    num_fusion = t.num_layers - t.fusion_start
    text_src, fusion_src = bert_layer_sources(hf_cfg["num_hidden_layers"], num_text, num_fusion)
    sources = dict(enumerate(text_src)) | {t.fusion_start + j: src for j, src in enumerate(fusion_src)}
    mapped: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if key.startswith("embeddings.") and not key.endswith(("position_ids", "token_type_ids")):
            mapped["text_encoder." + key] = value
        elif key.startswith("cls.predictions.transform."):
            mapped["mlm_head.transform." + key[len("cls.predictions.transform."):]] = value
        elif key == "cls.predictions.bias":
            mapped["mlm_head.bias"] = value
    for layer, src in sources.items():
        prefix = f"encoder.layer.{src}."
        for key, value in weights.items():
            if key.startswith(prefix):
                mapped[f"text_encoder.encoder.layer.{layer}." + key[len(prefix):]] = value.clone()
    own = model.state_dict()
    mapped = {k: v for k, v in mapped.items() if k in own}  # an MLM head only if the task has one
    mis_shaped = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in mapped.items() if v.shape != own[k].shape]
    if mis_shaped:
        raise CheckpointMismatchError(str(directory), [], [], mis_shaped)
    model.load_state_dict(mapped, strict=False)
    text_keys = [k for k in own if k.startswith("text_encoder.") and "crossattention" not in k]
    not_loaded = [k for k in text_keys if k not in mapped]
    if not_loaded:
        raise CheckpointMismatchError(str(directory), not_loaded, [], [])
    return sorted(k for k in own if k not in mapped and not k.startswith("vision_encoder."))


# -- vision encoder from a BEiT-2 ImageNet checkpoint -----------------------------------------------
def load_beit2_vision_encoder(model: X2VLM, path: str | Path, allow_unsafe_pickle: bool = False) -> list[str]:
    """Initialise ``vision_encoder`` from a BEiT-2 checkpoint (``model``/``module`` wrapped or bare).

    The classifier head is dropped, a shared relative-position table is copied into every block,
    index buffers are regenerated and tables resized to the model's grid (the official
    ``load_pretrained_beit2``). Returns the model's parameters that stay new (everything outside
    the vision encoder)."""
    path = Path(path)
    obj = torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    for key in ("model", "module"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    state = {k: v for k, v in obj.items() if not k.startswith("head.") and not k.endswith("relative_position_index")}
    shared = state.pop("rel_pos_bias.relative_position_bias_table", None)
    if shared is not None:
        for i in range(model.cfg.vision.depth):
            state[f"blocks.{i}.attn.relative_position_bias_table"] = shared.clone()
    native = {f"vision_encoder.{k}": v for k, v in state.items()}
    adapt_to_model(native, model)
    own = model.state_dict()
    vision_keys = [k for k in own if k.startswith("vision_encoder.")]
    missing = [k for k in vision_keys if k not in native]
    unexpected = sorted(k for k in native if k not in own)
    mis_shaped = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in native.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        raise CheckpointMismatchError(str(path), missing, unexpected, mis_shaped)
    model.load_state_dict(native, strict=False)
    return sorted(k for k in own if not k.startswith("vision_encoder."))


# -- X²-VLM -> multilingual: an XLM-R/RoBERTa text encoder and a separate cross encoder ---------------
_TEXT_LAYER_KEY = re.compile(r"^text_encoder\.encoder\.layer\.(\d+)\.(.+)$")


def multilingual_config(cfg: X2VLMConfig, text_dir: str | Path) -> X2VLMConfig:
    """The separate-cross-encoder config for an X²-VLM ``cfg`` whose text encoder is replaced by the
    Hugging Face model in ``text_dir`` (spec §1.7): the text stack is that model's (no
    cross-attention), the ``num_layers - fusion_start`` fusion layers become the cross encoder, and
    the tokenizer is the directory's. The cross encoder keeps the X²-VLM text config's LayerNorm eps,
    dropout and drop-path rate (``X2VLMConfig.cross``), so its outputs are those of the fusion layers.

    The cross encoder reads the new text model's states, so that model must have the X²-VLM text
    width (as XLM-R-base/large have for X²-VLM-base/large); its head count and feed-forward size
    may differ (the cross encoder keeps its own)."""
    from x2vlm.models.hf_text import HF_CONFIG_NAME, read_hf_text_config

    if cfg.cross_num_layers:
        raise ValueError(f"config {cfg.name!r} already has a separate cross encoder (cross_num_layers={cfg.cross_num_layers})")
    if "answer_decoder" in cfg.heads:
        raise ValueError(f"task {cfg.task!r}: converting a model with an answer decoder is not supported; convert the pre-training checkpoint")
    src = cfg.text
    new = read_hf_text_config(text_dir)
    where = Path(text_dir) / HF_CONFIG_NAME
    if new.hidden_size != src.hidden_size:
        raise ValueError(
            f"{where}: field 'hidden_size' is {new.hidden_size} but the X²-VLM model has text.hidden_size={src.hidden_size} "
            "(the fusion layers become the cross encoder and read the new text states)"
        )
    new.text_drop_path_rate = src.text_drop_path_rate
    new.cross_drop_path_rate = src.cross_drop_path_rate
    cross_num_layers = src.num_layers - src.fusion_start
    # The cross encoder keeps the fusion layers' own settings (BERT's LayerNorm eps 1e-12 and dropout,
    # while XLM-R's text layers use eps 1e-5); vocabulary and special ids are copied from the new text
    # config as the official config_cross does (unused: the cross encoder has no embeddings).
    cross = dataclasses.replace(
        src, num_layers=cross_num_layers, fusion_start=0, vocab_size=new.vocab_size, pad_token_id=new.pad_token_id,
        cls_token_id=new.cls_token_id, sep_token_id=new.sep_token_id, mask_token_id=new.mask_token_id, unk_token_id=new.unk_token_id,
    )
    return cfg.replace(
        name=f"{cfg.name}-multilingual",
        text=dataclasses.asdict(new),
        cross_num_layers=cross_num_layers,
        cross=dataclasses.asdict(cross),
        tokenizer=str(text_dir),
    )


def multilingual_state_dict(state: Mapping[str, torch.Tensor], cfg: X2VLMConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The official ``is_xvlm_ckpt`` + ``replace_text_encoder`` mapping (spec §2.5.4) of an X²-VLM
    state dict (native or official names) with config ``cfg``.

    Fusion layer ``n >= fusion_start`` becomes ``cross_encoder.encoder.layer.<n - fusion_start>``;
    the old text layers and embeddings are dropped (the new text encoder comes from elsewhere); the
    MLM transform stays at ``mlm_head.transform`` while its vocabulary bias (and tied decoder) is
    dropped; vision encoder, projections and heads are kept. Returns (state, notes)."""
    native, _ = official_to_native(state)
    start = cfg.text.fusion_start
    out: dict[str, torch.Tensor] = {}
    dropped_text, dropped_other = 0, []
    for key, value in native.items():
        match = _TEXT_LAYER_KEY.match(key)
        if match and int(match[1]) >= start:
            out[f"cross_encoder.encoder.layer.{int(match[1]) - start}.{match[2]}"] = value
        elif key.startswith("text_encoder."):
            dropped_text += 1
        elif key == "mlm_head.bias" or key.startswith(("answer_decoder.", "answer_head.")):
            dropped_other.append(key)
        else:
            out[key] = value
    notes = [f"moved fusion layers {start}..{cfg.text.num_layers - 1} to cross_encoder.encoder.layer.0..{cfg.text.num_layers - start - 1}",
             f"dropped {dropped_text} text-encoder weights (layers 0..{start - 1} and embeddings)"]
    if dropped_other:
        notes.append(f"dropped {', '.join(dropped_other)} (tied to the old vocabulary)")
    return out, notes


def convert_to_multilingual(
    source: X2VLM | str | Path | Mapping[str, torch.Tensor], text_dir: str | Path, cfg: X2VLMConfig | None = None
) -> tuple[X2VLM, list[str]]:
    """An X²-VLM model (or our model directory, or a state dict with its ``cfg``) with its text
    encoder replaced by the Hugging Face RoBERTa/XLM-R/BERT model in ``text_dir``: fusion layers
    moved to a separate cross encoder (``multilingual_state_dict``), text encoder weights from the
    directory. Loading is strict; returns (model, parameters left newly initialised: ``mlm_head.bias``
    when the task has an MLM head)."""
    from x2vlm.models.hf_text import check_text_weights, hf_text_weights, hf_weights_file

    if isinstance(source, X2VLM):
        label, state, cfg = "(model)", source.state_dict(), source.cfg
    elif isinstance(source, (str, Path)):
        directory = resolve_model_dir(source)
        label, state, cfg = str(directory / WEIGHTS_NAME), load_file(str(directory / WEIGHTS_NAME)), X2VLMConfig.load(directory / CONFIG_NAME)
    else:
        if cfg is None:
            raise ValueError("convert_to_multilingual: a state dict needs its X2VLMConfig (cfg=...)")
        label, state = "(state dict)", source
    new_cfg = multilingual_config(cfg, text_dir)
    mapped, notes = multilingual_state_dict(state, cfg)
    for note in notes:
        log.info("%s", note)
    model = X2VLM(new_cfg)
    text_weights = hf_text_weights(text_dir)
    check_text_weights(text_weights, model.state_dict(), str(hf_weights_file(text_dir)))
    new = check_and_load(model, {**mapped, **text_weights}, label, allow_missing=("mlm_head.bias",))
    return model, new
