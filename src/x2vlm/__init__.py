"""x2vlm: the maintained implementation of X²-VLM (Zeng et al., 2022)."""

__version__ = "0.1.0"
