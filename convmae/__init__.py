"""ConvMAE, FastConvMAE and the ConvViT fine-tuning model in plain PyTorch."""

from convmae.config import CONFIGS, ConvMAEConfig
from convmae.fast import FastConvMAE
from convmae.model import ConvMAE

__all__ = ["CONFIGS", "ConvMAEConfig", "ConvMAE", "FastConvMAE"]
