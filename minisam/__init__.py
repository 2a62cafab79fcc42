"""minisam: Segment Anything in plain PyTorch, loading the official weights after conversion.

    model = minisam.load_sam("sam_vit_b.safetensors")      # python -m weights_convert sam ...
    model = minisam.Sam(minisam.CONFIGS["vit_b"])          # random weights

`CONFIGS` holds the released variants "vit_b", "vit_l", "vit_h" (the official "default" is
vit_h) and "vit_t", a tiny test-only preset with no released checkpoint.
"""

from minisam.config import CONFIGS, OFFICIAL_VARIANTS, SamConfig
from minisam.sam import Sam, load_sam
from minisam.transforms import ResizeLongestSide

__all__ = ["CONFIGS", "OFFICIAL_VARIANTS", "SamConfig", "Sam", "load_sam", "ResizeLongestSide"]

# Predictor and automatic mask generator (minisam/predictor.py, minisam/automatic.py):
from minisam.automatic import AutomaticMaskGenerator  # noqa: E402
from minisam.predictor import SamPredictor  # noqa: E402

__all__ += ["SamPredictor", "AutomaticMaskGenerator"]
