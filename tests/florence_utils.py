"""Shared helpers for the Florence-2 tests: transformers' native model from one of our configs,
filled with seeded weights, and our model built from it through the converter.

Only tests import this module; transformers is imported lazily (callers guard it with
`pytest.importorskip("transformers")`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from miniflorence.config import Florence2Config

NATIVE_VOCAB = 51328  # the native checkpoints pad the vocabulary (51289 + <image> + padding rows)
IMAGE_TOKEN_ID = 51289


def seeded_fill(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """New tensors for `state`, key by key in sorted key order, from one seeded generator.

    Matrices and embedding tables: N(0, 0.25/fan_in) (features of realistic size); LayerNorm weights: 1 + N(0, 0.1^2); every
    other vector (biases, final_logits_bias): N(0, 0.1^2); the cosine temporal table: its value
    + N(0, 0.1^2), so a loader that recomputes instead of loading it is caught.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(state):
        t = state[key]
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        if "pos_idx_to_embed" in key:
            value = t.float() + 0.1 * noise
        elif t.dim() >= 2:
            value = 0.5 * noise * t[0].numel() ** -0.5
        elif "norm" in key and key.endswith("weight"):
            value = 1.0 + 0.1 * noise
        else:
            value = 0.1 * noise
        out[key] = value.to(t.dtype)
    return out


def native_config(config: Florence2Config, attn_implementation: str = "eager"):
    """transformers' Florence2Config describing the same network as ours."""
    from transformers import BartConfig
    from transformers import Florence2Config as HFConfig
    from transformers.models.florence2.configuration_florence2 import (
        Florence2VisionConfig,
    )

    vision = Florence2VisionConfig(
        embed_dim=list(config.dims), depths=list(config.depths), num_heads=list(config.heads),
        num_groups=list(config.channel_groups), window_size=config.window_size,
        patch_size=list(config.patch_sizes), patch_stride=list(config.patch_strides),
        patch_padding=list(config.patch_paddings), patch_prenorm=list(config.patch_prenorm),
        mlp_ratio=config.mlp_ratio, drop_path_rate=config.drop_path_rate,
        projection_dim=config.projection_dim, max_position_embeddings=config.image_pos_embed_size,
        max_temporal_embeddings=config.max_temporal_embeddings,
    )
    text = BartConfig(
        vocab_size=NATIVE_VOCAB, d_model=config.d_model, encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers, encoder_attention_heads=config.encoder_heads,
        decoder_attention_heads=config.decoder_heads, encoder_ffn_dim=config.encoder_ffn_dim,
        decoder_ffn_dim=config.decoder_ffn_dim, max_position_embeddings=config.max_position_embeddings,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        decoder_start_token_id=config.decoder_start_token_id, forced_bos_token_id=0, forced_eos_token_id=2,
        dropout=config.dropout, attention_dropout=config.attention_dropout,
        activation_dropout=config.activation_dropout, activation_function=config.activation,
        scale_embedding=False,
    )
    hf = HFConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_TOKEN_ID)
    hf._attn_implementation = attn_implementation
    hf.text_config._attn_implementation = attn_implementation
    hf.vision_config._attn_implementation = attn_implementation
    return hf


def native_model(config: Florence2Config, seed: int = 0, attn_implementation: str = "eager"):
    """transformers' Florence2ForConditionalGeneration with seeded weights, in eval mode."""
    from transformers import Florence2ForConditionalGeneration

    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(native_config(config, attn_implementation)).eval()
    model.load_state_dict(seeded_fill(model.state_dict(), seed))
    return model


def native_input_ids(prompt_ids: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """Native models read `<image>` x num_image_tokens before the prompt: (B, T) -> (B, I + T)."""
    image = torch.full((prompt_ids.shape[0], num_image_tokens), IMAGE_TOKEN_ID, dtype=prompt_ids.dtype)
    return torch.cat([image, prompt_ids], dim=1)


@contextmanager
def single_thread() -> Iterator[None]:
    """Run on one intra-op thread: on a small shared CPU, two OpenMP threads that wait on each
    other make these small models ~50x slower. The previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
