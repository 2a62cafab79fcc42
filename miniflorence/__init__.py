"""miniflorence: Florence-2 (DaViT vision tower + BART-style encoder-decoder) in plain PyTorch."""

from miniflorence.config import CONFIGS, Florence2Config, tiny_config

__all__ = ["CONFIGS", "Florence2Config", "tiny_config"]
