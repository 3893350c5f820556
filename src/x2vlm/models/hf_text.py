"""Text encoders from Hugging Face model directories: RoBERTa, XLM-R and BERT.

A Hugging Face directory holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``),
usually with tokenizer files. ``read_hf_text_config`` turns the ``config.json`` into our
``TextConfig`` (a text stack without cross-attention: ``fusion_start == num_layers``), and
``hf_text_weights`` renames the weights onto ``text_encoder.*``: the ``roberta.``/``bert.`` prefix
goes, TF-era ``gamma``/``beta`` LayerNorm names become ``weight``/``bias``, and the pooler, the MLM
heads (``lm_head``, ``cls``) and the position/token-type id buffers are dropped. The layer names
themselves are already ours (``x2vlm.models.bert`` uses the Hugging Face BERT names).

This is the text encoder of the XLM-R variant (spec §1.7, ``XVLMPlusBase``): the model is then
built with a separate cross encoder (``X2VLMConfig.cross_num_layers > 0``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from x2vlm.config import TextConfig
from x2vlm.models.bert import TextTransformer

HF_CONFIG_NAME = "config.json"
HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
ROBERTA_TYPES = ("roberta", "xlm-roberta")
BERT_TYPES = ("bert",)
SUPPORTED_MODEL_TYPES = ROBERTA_TYPES + BERT_TYPES

# Weights of a Hugging Face checkpoint that are not part of the text encoder.
_DROPPED_PREFIXES = ("pooler.", "lm_head.", "cls.")
_DROPPED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")


def _config_field(cfg: Mapping[str, Any], name: str, path: Path, default: Any = None) -> Any:
    """``cfg[name]``, or ``default``; a missing field without default is an error naming the file."""
    if name in cfg:
        return cfg[name]
    if default is None:
        raise ValueError(f"{path}: missing field {name!r}")
    return default


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face model directory, with its model type checked."""
    path = Path(directory) / HF_CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (not a Hugging Face model directory)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{path}: field 'model_type' is {model_type!r}; supported: {list(SUPPORTED_MODEL_TYPES)}")
    return cfg


def _check_architecture(cfg: Mapping[str, Any], path: Path) -> None:
    """Reject configurations our post-LN BERT layers would silently compute differently."""
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{path}: field 'hidden_act' is {act!r}; only exact 'gelu' is supported")
    position_type = cfg.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"{path}: field 'position_embedding_type' is {position_type!r}; only 'absolute' is supported")
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise ValueError(f"{path}: decoder / cross-attention text models are not supported as text encoders")


def _default_special_ids(cfg: Mapping[str, Any], path: Path) -> dict[str, int]:
    """Special-token ids from ``config.json`` and the family's fixed layout, for when no tokenizer is
    at hand. RoBERTa/XLM-R: ``<s>``=bos, ``</s>``=eos, ``<pad>``, ``<unk>``=3, ``<mask>`` = last id;
    BERT: the bert-base-uncased layout."""
    pad = int(_config_field(cfg, "pad_token_id", path, default=1 if cfg["model_type"] in ROBERTA_TYPES else 0))
    if cfg["model_type"] in ROBERTA_TYPES:
        return {
            "pad_token_id": pad,
            "cls_token_id": int(cfg.get("bos_token_id", 0)),
            "sep_token_id": int(cfg.get("eos_token_id", 2)),
            "unk_token_id": 3,
            "mask_token_id": int(cfg["vocab_size"]) - 1,
        }
    return {"pad_token_id": pad, "cls_token_id": 101, "sep_token_id": 102, "unk_token_id": 100, "mask_token_id": 103}


def _tokenizer_special_ids(directory: Path, vocab_size: int) -> dict[str, int] | None:
    """Special-token ids of the tokenizer stored in ``directory``, or None when it has none. A
    tokenizer with more ids than the model has embeddings is an error."""
    from x2vlm.tokenizer import has_tokenizer_files, load_tokenizer

    if not has_tokenizer_files(directory):
        return None
    tok = load_tokenizer(directory)
    if tok.vocab_size > vocab_size:
        raise ValueError(
            f"{directory / HF_CONFIG_NAME}: field 'vocab_size' is {vocab_size} but the directory's tokenizer has {tok.vocab_size} ids"
        )
    names = ("pad_token_id", "cls_token_id", "sep_token_id", "unk_token_id", "mask_token_id")
    return {name: int(getattr(tok, name)) for name in names}


def read_hf_text_config(directory: str | Path, use_tokenizer: bool = True) -> TextConfig:
    """Our ``TextConfig`` for the Hugging Face text model in ``directory``.

    All layers are text layers (``fusion_start == num_layers``). Special-token ids come from the
    directory's tokenizer when it has one (``use_tokenizer``), else from ``config.json`` and the
    family's standard layout (``_default_special_ids``).
    """
    directory = Path(directory)
    path = directory / HF_CONFIG_NAME
    cfg = read_hf_config(directory)
    _check_architecture(cfg, path)
    num_layers = int(_config_field(cfg, "num_hidden_layers", path))
    vocab_size = int(_config_field(cfg, "vocab_size", path))
    special = _default_special_ids(cfg, path)
    from_tokenizer = _tokenizer_special_ids(directory, vocab_size) if use_tokenizer else None
    if from_tokenizer is not None:
        if from_tokenizer["pad_token_id"] != special["pad_token_id"]:
            raise ValueError(
                f"{path}: field 'pad_token_id' is {special['pad_token_id']} but the directory's tokenizer pads with "
                f"{from_tokenizer['pad_token_id']}"
            )
        special = from_tokenizer
    return TextConfig(
        vocab_size=vocab_size,
        hidden_size=int(_config_field(cfg, "hidden_size", path)),
        num_heads=int(_config_field(cfg, "num_attention_heads", path)),
        intermediate_size=int(_config_field(cfg, "intermediate_size", path)),
        max_position_embeddings=int(_config_field(cfg, "max_position_embeddings", path)),
        type_vocab_size=int(cfg.get("type_vocab_size", 2)),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        num_layers=num_layers,
        fusion_start=num_layers,
        hidden_dropout=float(cfg.get("hidden_dropout_prob", 0.1)),
        attention_dropout=float(cfg.get("attention_probs_dropout_prob", 0.1)),
        position_style="roberta" if cfg["model_type"] in ROBERTA_TYPES else "absolute",
        **special,
    )


def hf_weights_file(directory: str | Path) -> Path:
    """The weights file of a Hugging Face directory (``model.safetensors`` preferred)."""
    directory = Path(directory)
    for name in HF_WEIGHT_NAMES:
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"{directory}: no weights file (looked for {', '.join(HF_WEIGHT_NAMES)})")


def rename_hf_text_key(key: str) -> str | None:
    """Our ``text_encoder.*`` name of one Hugging Face weight, or None for weights we drop."""
    for prefix in ("roberta.", "bert."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    if key.startswith(_DROPPED_PREFIXES) or key.endswith(_DROPPED_SUFFIXES):
        return None
    if key.endswith("LayerNorm.gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith("LayerNorm.beta"):
        key = key[: -len("beta")] + "bias"
    return "text_encoder." + key


def hf_text_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The text-encoder weights of a Hugging Face directory under our ``text_encoder.*`` names."""
    from x2vlm.checkpoint import read_state_dict

    path = hf_weights_file(directory)
    out: dict[str, torch.Tensor] = {}
    for key, value in read_state_dict(path).items():
        new = rename_hf_text_key(key)
        if new is None:
            continue
        if new in out:
            raise ValueError(f"{path}: two weights map to {new!r} (one of them is {key!r})")
        out[new] = value
    return out


def check_text_weights(weights: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], source: str) -> None:
    """``weights`` (``text_encoder.*``) must cover ``own``'s text-encoder keys exactly, shape for shape;
    otherwise one error lists every missing, unexpected and mis-shaped key."""
    from x2vlm.checkpoint import CheckpointMismatchError

    wanted = {k for k in own if k.startswith("text_encoder.")}
    missing = sorted(wanted - set(weights))
    unexpected = sorted(set(weights) - wanted)
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    )
    if missing or unexpected or mis_shaped:
        raise CheckpointMismatchError(source, missing, unexpected, mis_shaped)


def load_hf_text_weights(model: torch.nn.Module, directory: str | Path) -> None:
    """Load the Hugging Face directory's weights into ``model.text_encoder`` (strictly: every
    text-encoder weight, nothing else, same shapes). ``model`` is an X2VLM with a separate cross
    encoder, or anything with a ``text_encoder`` attribute."""
    weights = hf_text_weights(directory)
    own = {"text_encoder." + k: v for k, v in model.text_encoder.state_dict().items()}
    check_text_weights(weights, own, str(hf_weights_file(directory)))
    model.text_encoder.load_state_dict({k[len("text_encoder."):]: v for k, v in weights.items()}, strict=True)


class _TextEncoderHolder(torch.nn.Module):
    """Gives a bare ``TextTransformer`` the ``text_encoder`` attribute the loaders expect."""

    def __init__(self, encoder: TextTransformer):
        super().__init__()
        self.text_encoder = encoder


def text_encoder_from_hf(directory: str | Path) -> TextTransformer:
    """A stand-alone text encoder (embeddings + all layers, no cross-attention) with the weights of
    the Hugging Face directory, in eval mode. Its ``forward(ids, mask)`` returns (states, per-layer)."""
    cfg = read_hf_text_config(directory)
    encoder = TextTransformer(cfg, cfg.num_layers, cross_start=cfg.num_layers, cross_width=cfg.hidden_size)
    load_hf_text_weights(_TextEncoderHolder(encoder), directory)
    return encoder.eval()
