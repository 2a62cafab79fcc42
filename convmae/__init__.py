"""ConvMAE, FastConvMAE and the ConvViT fine-tuning model in plain PyTorch.

    model = convmae.ConvMAE(convmae.CONFIGS["convmae_base"])
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    model = convmae.load_convmae("convmae_base.safetensors")  # after `python -m weights_convert convmae`

`tiny_config()` is a tiny test-only configuration with no released checkpoint.
"""

from convmae.config import CONFIGS, ConvMAEConfig, tiny_config
from convmae.convvit import ConvViT
from convmae.fast import FastConvMAE
from convmae.load import load_convmae, load_convvit
from convmae.model import ConvMAE

__all__ = [
    "CONFIGS", "ConvMAEConfig", "tiny_config", "ConvMAE", "FastConvMAE", "ConvViT", "load_convmae", "load_convvit",
]
