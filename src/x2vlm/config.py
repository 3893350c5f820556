"""Model configuration as data: dataclasses, named presets, JSON I/O, official YAML conversion.

Every checkpoint directory we write holds ``config.json`` = ``X2VLMConfig.to_dict()``; reading one
back rejects unknown keys by name, so a typo never silently becomes a default.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

# Which heads each official model class carries. The task decides the modules and the official
# state-dict layout (``text_encoder.bert.*`` + ``text_encoder.cls.*`` exactly when there is an MLM head).
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "pretrain": ("itc", "itm", "bbox", "mlm"),  # XVLM (model_pretrain.py)
    "retrieval": ("itc", "itm"),  # XVLMForRetrieval
    "grounding": ("bbox",),  # XVLMForGrounding
    "nlvr": ("nlvr",),  # XVLMForNLVR: cls_head on two fused CLS vectors
    "classification": ("classify",),  # XVLMForClassification / XVLMForVQAClassification (video QA)
    "vqa": ("answer_decoder",),  # XVLMForVQA: 6-layer generative answer decoder
    "captioning": ("mlm",),  # XVLMForMLMCaptioning
}


POS_EMBED_INITS = ("trunc_normal", "sincos")


@dataclass
class VisionConfig:
    """BEiT-2 ViT."""

    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: int = 4
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 0.1
    drop_path_rate: float = 0.1
    # Learned absolute position embedding added to [CLS; patches] (BEiT's ``use_abs_pos_emb``). The
    # released X²-VLM models have none (relative position bias only); the small preset uses one,
    # because at a few hundred steps box regression cannot recover positions from the bias alone.
    abs_pos_embed: bool = False
    # Its initialisation: "trunc_normal" (std 0.02, BEiT's) or "sincos" (a 2-D sine-cosine table,
    # as in MAE, of unit amplitude; still trained). A from-scratch tower trained on captions keeps
    # almost no position in its output tokens from a 0.02 table (a linear read-out of a patch's
    # coordinates fails), so box regression has nothing to read; "sincos" starts it with position.
    pos_embed_init: str = "trunc_normal"


@dataclass
class TextConfig:
    """BERT (or RoBERTa/XLM-R with ``position_style='roberta'``) text encoder dimensions."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    num_layers: int = 18  # text layers + fusion layers in one stack (XVLMBase layout)
    fusion_start: int = 12  # first layer with cross-attention; == num_layers with a separate cross encoder
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    text_drop_path_rate: float = 0.0
    cross_drop_path_rate: float = 0.0
    position_style: str = "absolute"  # "absolute" (BERT) or "roberta"
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    mask_token_id: int = 103
    unk_token_id: int = 100


@dataclass
class X2VLMConfig:
    name: str = "x2vlm-base"
    task: str = "pretrain"
    image_res: int = 224
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    cross_num_layers: int = 0  # > 0: separate cross encoder (XLM-R variant), text stack has no cross layers
    # The separate cross encoder's own settings (LayerNorm eps, dropout, drop path), e.g. BERT's
    # while the text encoder is an XLM-R; None: the same as ``text``. When given, its
    # hidden_size equals text.hidden_size, num_layers equals cross_num_layers, fusion_start is 0.
    cross: TextConfig | None = None
    embed_dim: int = 256
    temp: float = 0.07
    frame_len: int = 0  # > 0: video model with frames averaged over time
    add_frame_pos: bool = False
    num_labels: int = 0  # classification head size
    num_dec_layers: int = 6  # VQA answer decoder depth
    label_smoothing: float = 0.1  # captioning loss
    prompt: str = "a picture of "  # captioning prompt
    tokenizer: str = "bert-base-uncased"  # name of the WordPiece vocabulary, or a path to a vocab file
    # The MLM head has its own decoder matrix (``mlm_head.decoder``) instead of the word embeddings:
    # the official XVLMPlus/CCLM ``mlm_head = BertOnlyMLMHead`` is not tied (spec §1.7).
    untied_mlm_decoder: bool = False

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = dataclass_from_mapping(VisionConfig, self.vision, "vision")
        if isinstance(self.text, dict):
            self.text = dataclass_from_mapping(TextConfig, self.text, "text")
        if isinstance(self.cross, dict):
            self.cross = dataclass_from_mapping(TextConfig, self.cross, "cross")
        self.validate()

    # -- derived -------------------------------------------------------------------------------
    @property
    def heads(self) -> tuple[str, ...]:
        return TASK_HEADS[self.task]

    @property
    def cross_text(self) -> TextConfig:
        """The settings of the separate cross encoder's layers (``cross``, else ``text``)."""
        return self.cross if self.cross is not None else self.text

    @property
    def grid(self) -> int:
        return self.image_res // self.vision.patch_size

    @property
    def num_vision_tokens(self) -> int:
        return self.grid * self.grid + 1

    def validate(self) -> None:
        if self.task not in TASK_HEADS:
            raise ValueError(f"config field 'task': unknown task {self.task!r}; expected one of {sorted(TASK_HEADS)}")
        if self.image_res % self.vision.patch_size:
            raise ValueError(f"config field 'image_res': {self.image_res} is not a multiple of patch_size {self.vision.patch_size}")
        t = self.text
        if t.hidden_size % t.num_heads:
            raise ValueError(f"config field 'text.hidden_size': {t.hidden_size} not divisible by num_heads {t.num_heads}")
        if self.vision.pos_embed_init not in POS_EMBED_INITS:
            raise ValueError(f"config field 'vision.pos_embed_init': {self.vision.pos_embed_init!r} is not one of {POS_EMBED_INITS}")
        if self.vision.pos_embed_init == "sincos" and self.vision.width % 4:
            raise ValueError(f"config field 'vision.width': {self.vision.width} must be a multiple of 4 for a sincos position table")
        if self.vision.width % self.vision.num_heads:
            raise ValueError(f"config field 'vision.width': {self.vision.width} not divisible by num_heads {self.vision.num_heads}")
        if not 0 <= t.fusion_start <= t.num_layers:
            raise ValueError(f"config field 'text.fusion_start': {t.fusion_start} outside [0, {t.num_layers}]")
        if self.cross_num_layers and t.fusion_start != t.num_layers:
            raise ValueError("config: a separate cross encoder (cross_num_layers > 0) needs text.fusion_start == text.num_layers")
        if not self.cross_num_layers and t.fusion_start == t.num_layers:
            raise ValueError("config: the model has no fusion layers (text.fusion_start == text.num_layers, cross_num_layers == 0)")
        if self.cross is not None:
            c = self.cross
            if not self.cross_num_layers:
                raise ValueError("config field 'cross': cross-encoder settings given but cross_num_layers is 0")
            if c.hidden_size != t.hidden_size:
                raise ValueError(f"config field 'cross.hidden_size': {c.hidden_size} differs from text.hidden_size {t.hidden_size}")
            if c.hidden_size % c.num_heads:
                raise ValueError(f"config field 'cross.hidden_size': {c.hidden_size} not divisible by num_heads {c.num_heads}")
            if (c.num_layers, c.fusion_start) != (self.cross_num_layers, 0):
                raise ValueError(f"config field 'cross': num_layers {c.num_layers} and fusion_start {c.fusion_start} must be "
                                 f"cross_num_layers ({self.cross_num_layers}) and 0")
        if self.task == "classification" and self.num_labels <= 0:
            raise ValueError("config field 'num_labels' must be > 0 for task 'classification'")
        if t.position_style not in ("absolute", "roberta"):
            raise ValueError(f"config field 'text.position_style': unknown value {t.position_style!r}")

    # -- I/O -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field; ``cross`` and ``untied_mlm_decoder`` only when set (config files without them
        keep their old form)."""
        data = dataclasses.asdict(self)
        if data["cross"] is None:
            del data["cross"]
        if not data["untied_mlm_decoder"]:
            del data["untied_mlm_decoder"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "X2VLMConfig":
        return dataclass_from_mapping(cls, copy.deepcopy(data), "config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "X2VLMConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err

    def replace(self, **changes: Any) -> "X2VLMConfig":
        """A copy with top-level fields changed; nested ones with ``vision=`` / ``text=`` / ``cross=``
        dicts of changes (``cross=`` a whole TextConfig, dict or None when there is none yet)."""
        data = self.to_dict()
        for key, value in changes.items():
            if key in ("vision", "text", "cross") and isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key].update(value)
            elif isinstance(value, TextConfig | VisionConfig):
                data[key] = dataclasses.asdict(value)
            else:
                data[key] = value
        return X2VLMConfig.from_dict(data)


# -- mappings (YAML / JSON) -> dataclasses ----------------------------------------------------------
def check_keys(section: Any, known: set[str], where: str) -> None:
    """``section`` must be a mapping whose keys are all ``known``; the error names ``where``, the
    unknown keys and the known ones (a typo never silently becomes a default)."""
    if not isinstance(section, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(section).__name__}")
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def dataclass_from_mapping(cls, data: Any, where: str, sections: dict[str, type | Callable[[Any, str], Any]] | None = None):
    """``cls(**data)`` for the dataclass ``cls``, after ``check_keys`` against its fields.

    ``sections`` builds the named fields that are present from their value: a dataclass type (a
    nested mapping, checked the same way) or a function ``(value, where) -> field value``; the nested
    ``where`` is ``"<where>: <field>"``."""
    check_keys(data, field_names(cls), where)
    kwargs = dict(data)
    for name, build in (sections or {}).items():
        if name in kwargs:
            inner = f"{where}: {name}"
            if dataclasses.is_dataclass(build):
                kwargs[name] = dataclass_from_mapping(build, kwargs[name], inner)
            else:
                kwargs[name] = build(kwargs[name], inner)
    return cls(**kwargs)


# -- presets ---------------------------------------------------------------------------------------
_BASE_VISION = VisionConfig(width=768, depth=12, num_heads=12)
_LARGE_VISION = VisionConfig(width=1024, depth=24, num_heads=16)
_BASE_TEXT = TextConfig()
_LARGE_TEXT = TextConfig(hidden_size=1024, num_heads=16, intermediate_size=4096)


def _preset(name: str, **kwargs: Any) -> X2VLMConfig:
    return X2VLMConfig(name=name, **kwargs)


def _presets() -> dict[str, X2VLMConfig]:
    presets = {
        # Released X2VLM-base/large (4M and 1B stage 1): 224 px pre-training checkpoints.
        "x2vlm-base": _preset("x2vlm-base", vision=copy.deepcopy(_BASE_VISION), text=copy.deepcopy(_BASE_TEXT)),
        "x2vlm-large": _preset("x2vlm-large", vision=copy.deepcopy(_LARGE_VISION), text=copy.deepcopy(_LARGE_TEXT)),
        # 1B stage 2 (video): the same plus a 3-frame position embedding.
        "x2vlm-base-video": _preset(
            "x2vlm-base-video", vision=copy.deepcopy(_BASE_VISION), text=copy.deepcopy(_BASE_TEXT), frame_len=3, add_frame_pos=True
        ),
        "x2vlm-large-video": _preset(
            "x2vlm-large-video", vision=copy.deepcopy(_LARGE_VISION), text=copy.deepcopy(_LARGE_TEXT), frame_len=3, add_frame_pos=True
        ),
        # The random-weight model of the parity fixtures (64 px, 2 vision blocks, 6 text layers).
        "x2vlm-tiny": _preset(
            "x2vlm-tiny",
            image_res=64,
            vision=VisionConfig(width=64, depth=2, num_heads=4),
            text=TextConfig(
                vocab_size=512, hidden_size=64, num_heads=4, intermediate_size=128, max_position_embeddings=64, num_layers=6, fusion_start=4
            ),
            embed_dim=32,
            frame_len=3,
            add_frame_pos=True,
            num_dec_layers=2,
            tokenizer="tiny",
        ),
        # The embedded default: a CPU-sized model whose text layers come from MiniLM-L6 (384 wide),
        # two fusion layers initialised from its upper layers, as the official recipe does for BERT
        # (a stack of three did not learn image-text matching in probes on frozen features, two do:
        # bench/probe_fusion.py), and a two-layer answer decoder from those.
        "x2vlm-small": _preset(
            "x2vlm-small",
            image_res=96,
            vision=VisionConfig(width=384, depth=6, num_heads=6, drop_path_rate=0.0, abs_pos_embed=True, pos_embed_init="sincos"),  # short runs: no stochastic depth
            text=TextConfig(hidden_size=384, num_heads=12, intermediate_size=1536, num_layers=8, fusion_start=6),
            embed_dim=128,
            frame_len=4,
            add_frame_pos=True,
            num_dec_layers=2,
        ),
    }
    return presets


PRESETS = _presets()


def preset(name: str, **changes: Any) -> X2VLMConfig:
    """A named preset (a fresh copy), optionally with fields changed (see ``X2VLMConfig.replace``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[name])
    return cfg.replace(**changes) if changes else cfg


# -- official YAML ---------------------------------------------------------------------------------
# Keys of the official YAML files that decide the architecture; every other key (data paths,
# optimiser, batch sizes) belongs to a training run, not to the model.
OFFICIAL_MODEL_KEYS = (
    "use_beit_v2", "vision_config", "image_res", "patch_size", "text_encoder", "text_num_hidden_layers",
    "text_fusion_start_at", "embed_dim", "temp", "video_encoding", "frame_len", "add_frame_pos", "num_dec_layers",
    "num_labels", "label_smoothing", "prompt", "text_drop_path_rate", "cross_drop_path_rate", "vision_num_hidden_layers",
    "cross_encoder", "cross_num_hidden_layers", "model_type", "use_clip_vit", "use_swin",
)


def from_official_yaml(data: dict[str, Any], task: str | None = None) -> X2VLMConfig:
    """Convert an official X²-VLM YAML (already parsed) to our config.

    The BEiT size comes from the ``vision_config`` path ('base'/'large'), the BERT size from
    ``text_encoder`` ('large' in the path), as the official builders decide. ``task`` defaults to
    what the keys imply (``num_dec_layers`` -> vqa, ``prompt`` -> captioning, ``num_labels`` ->
    classification, otherwise pretrain).
    """
    if data.get("use_clip_vit") or data.get("use_swin"):
        raise ValueError("official config: only the BEiT-2 vision encoder (use_beit_v2) is supported, not CLIP-ViT/Swin")
    vision_path = str(data.get("vision_config", ""))
    if "large" in vision_path:
        vision = copy.deepcopy(_LARGE_VISION)
    elif "base" in vision_path:
        vision = copy.deepcopy(_BASE_VISION)
    else:
        raise ValueError(f"official config field 'vision_config': cannot tell base from large in {vision_path!r}")
    if data.get("vision_num_hidden_layers", -1) and data.get("vision_num_hidden_layers", -1) > 0:
        vision.depth = int(data["vision_num_hidden_layers"])
    vision.patch_size = int(data.get("patch_size", 16))
    text_path = str(data.get("text_encoder", "data/bert-base-uncased"))
    if "roberta" in text_path:
        raise ValueError("official config field 'text_encoder': XLM-R/RoBERTa models convert through the multilingual path")
    text = copy.deepcopy(_LARGE_TEXT if "large" in text_path else _BASE_TEXT)
    text.num_layers = int(data.get("text_num_hidden_layers", 18))
    text.fusion_start = int(data.get("text_fusion_start_at", 12))
    text.text_drop_path_rate = float(data.get("text_drop_path_rate", 0.0))
    text.cross_drop_path_rate = float(data.get("cross_drop_path_rate", 0.0))
    if task is None:
        if "num_dec_layers" in data:
            task = "vqa"
        elif "prompt" in data:
            task = "captioning"
        elif "num_labels" in data:
            task = "classification"
        else:
            task = "pretrain"
    video = bool(data.get("video_encoding"))
    return X2VLMConfig(
        name=f"official-{'large' if vision.width == 1024 else 'base'}",
        task=task,
        image_res=int(data.get("image_res", 224)),
        vision=vision,
        text=text,
        embed_dim=int(data.get("embed_dim", 256)),
        temp=float(data.get("temp", 0.07)),
        frame_len=int(data.get("frame_len", 0)) if video else 0,
        add_frame_pos=bool(data.get("add_frame_pos", False)) and video,
        num_labels=int(data.get("num_labels", 0)),
        num_dec_layers=int(data.get("num_dec_layers", 6)),
        label_smoothing=float(data.get("label_smoothing", 0.1)),
        prompt=str(data.get("prompt", "a picture of ")),
    )


# -- YAML ------------------------------------------------------------------------------------------
class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``3e-4`` as a float (YAML 1.1 only accepts ``3.0e-4``)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$|^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?$"
        r"|^[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def load_yaml(text: str):
    """Parse YAML safely, with ``3e-4``-style floats."""
    return yaml.load(text, Loader=_YamlLoader)
