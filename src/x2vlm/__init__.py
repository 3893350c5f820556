"""x2vlm: the maintained implementation of X²-VLM (Zeng et al., 2022).

    from x2vlm import X2VLM, preset, from_pretrained
    model = from_pretrained("path/to/converted")      # or X2VLM(preset("x2vlm-base"))

    import x2vlm
    model = x2vlm.load("runs/vqa_small_world")        # a task model for inference (x2vlm.inference)
    model.answer("scene.png", "what color is the circle?")
"""

from x2vlm.checkpoint import from_pretrained, load_official, save_pretrained
from x2vlm.config import PRESETS, X2VLMConfig, preset
from x2vlm.models.x2vlm import X2VLM
from x2vlm.tokenizer import WordPieceTokenizer

__version__ = "0.1.0"


def load(path, device="cpu", dtype=None):
    """A trained model ready for inference (``x2vlm.inference.load``; imported on first use)."""
    from x2vlm.inference import load as _load

    return _load(path, device=device, dtype=dtype)


__all__ = [
    "PRESETS",
    "X2VLM",
    "X2VLMConfig",
    "WordPieceTokenizer",
    "from_pretrained",
    "load",
    "load_official",
    "preset",
    "save_pretrained",
]
