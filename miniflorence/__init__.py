"""miniflorence: Florence-2 (DaViT vision tower + BART-style encoder-decoder) in plain PyTorch."""

from miniflorence.config import CONFIGS, Florence2Config, tiny_config
from miniflorence.images import ImageError, read_image
from miniflorence.model import Florence2, load_florence2
from miniflorence.processor import TASK_PROMPTS, Processor
from miniflorence.tokenizer import Tokenizer

__all__ = [
    "CONFIGS", "TASK_PROMPTS", "Florence2", "Florence2Config", "ImageError", "Processor", "Tokenizer", "load_florence2",
    "read_image", "tiny_config",
]
