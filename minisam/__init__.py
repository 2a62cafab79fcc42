"""minisam: Segment Anything in plain PyTorch, loading the official weights after conversion.

    model = minisam.load_sam("sam_vit_b.safetensors")      # python -m weights_convert sam ...
    model = minisam.Sam(minisam.CONFIGS["vit_b"])          # random weights

`CONFIGS` holds the released variants "vit_b", "vit_l", "vit_h" (the official "default" is
vit_h); `tiny_config()` is a tiny test-only configuration with no released checkpoint.
"""

from minisam.automatic import AutomaticMaskGenerator
from minisam.config import CONFIGS, SamConfig, tiny_config
from minisam.predictor import SamPredictor
from minisam.sam import Sam, load_sam
from minisam.transforms import ResizeLongestSide

__all__ = [
    "CONFIGS", "SamConfig", "tiny_config", "Sam", "load_sam", "ResizeLongestSide", "SamPredictor",
    "AutomaticMaskGenerator",
]
