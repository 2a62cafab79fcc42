"""The official models with seeded random weights, for the parity tests and for bench/.

Nothing in the packages imports this file. The official implementations are optional: each
builder imports its package when called (`segment_anything` for SAM, transformers for
Florence-2), so importing this module needs only torch. Tests put `tests/reference` on sys.path
(tests/conftest.py) and skip when a package is absent; `bench/` puts it there too, guarded.

SAM (`official_sam`): the official `Sam` built from its classes with the official numbers of a
variant (the official `build_sam_vit_*` hard-code a 1024 input, so the size is ours to choose),
every state_dict tensor filled, in sorted key order, from one seeded generator (`fill_sam_random`):
- Linear/conv weights: N(0, 1/fan_in), so activations stay O(1) through all 32 vit_h blocks and
  the mask logits are spread around the 0.0 threshold (randn * 0.02 makes them vanish);
- biases: 0.02 * N(0, 1); norm weights: 1 + 0.1 * N(0, 1);
- embedding tables (point / not-a-point / no-mask embeddings, IoU and mask tokens) and the random
  Fourier matrix: N(0, 1), their official init;
- pos_embed: 0.5 * N(0, 1); rel_pos_h/w: 0.1 * N(0, 1) (the official init leaves both at zero,
  which would hide them).
The same recipe fills minisam's own model when a test needs an official-layout state dict
without the official package (minisam's attribute paths are the official keys).

Florence-2 (`native_florence2`): transformers' `Florence2ForConditionalGeneration` (it matches the
original remote code) built from one of our configs, filled by `seeded_florence2_fill`.
"""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

STUBS = Path(__file__).resolve().parent / "stubs"  # a torchvision stand-in for segment_anything

# ---- Segment Anything ---------------------------------------------------------------------------

# The official numbers (segment_anything/build_sam.py), and "tiny": NOT official, the encoder of
# minisam.tiny_config() for fast tests.
SAM_ENCODERS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=[7, 15, 23, 31]),
    "tiny": dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=[1]),
}
PIXEL_MEAN, PIXEL_STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def import_segment_anything() -> ModuleType | None:
    """`segment_anything` with our torchvision stand-in, or None when it is not installed.

    segment_anything binds the few torchvision functions it uses at import time; afterwards the
    stand-in is taken off `sys.path` and out of `sys.modules`, so that libraries probing for a real
    torchvision (transformers does) do not find it.
    """
    try:
        import torchvision  # noqa: F401  (a real one, if it loads beside this torch)
    except Exception:
        sys.modules.pop("torchvision", None)
        if str(STUBS) not in sys.path:
            sys.path.insert(0, str(STUBS))
    try:
        import segment_anything
    except ImportError:
        return None
    finally:
        if str(STUBS) in sys.path:
            sys.path.remove(str(STUBS))
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            if str(STUBS) in (getattr(sys.modules[name], "__file__", None) or ""):
                del sys.modules[name]
    return segment_anything


def sam_random_value(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """The random value of one official SAM state_dict tensor (see the module docstring for the scales)."""
    noise = torch.randn(shape, generator=generator)
    name = key.rsplit(".", 1)[-1]
    if name == "positional_encoding_gaussian_matrix":
        return noise
    if name == "pos_embed":
        return 0.5 * noise
    if name in ("rel_pos_h", "rel_pos_w"):
        return 0.1 * noise
    if len(shape) == 1:
        return 1 + 0.1 * noise if name == "weight" else 0.02 * noise
    if any(t in key for t in ("point_embeddings", "not_a_point_embed", "no_mask_embed", "iou_token", "mask_tokens")):
        return noise
    if "output_upscaling" in key:  # ConvTranspose2d weight (in, out, k, k), stride = kernel: fan-in is `in`
        return noise / math.sqrt(shape[0])
    return noise / math.sqrt(math.prod(shape[1:]))


@torch.no_grad()
def fill_sam_random(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every state_dict tensor of an official-layout SAM, in sorted key order, from one generator."""
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for key in sorted(state):
        state[key].copy_(sam_random_value(key, state[key].shape, generator))


def official_sam(variant: str, image_size: int = 1024, seed: int = 0) -> torch.nn.Module:
    """The official `Sam` with the numbers of `variant` (a key of SAM_ENCODERS) at `image_size`,
    seeded random weights, eval mode. Needs segment_anything (`import_segment_anything`)."""
    if import_segment_anything() is None:
        raise ImportError("the official segment-anything is not installed")
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    enc = SAM_ENCODERS[variant]
    grid = image_size // 16
    with torch.device("meta"):  # skip the official random init: every tensor is filled below
        model = Sam(
            image_encoder=ImageEncoderViT(
                depth=enc["depth"],
                embed_dim=enc["embed_dim"],
                img_size=image_size,
                mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=enc["num_heads"],
                patch_size=16,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=enc["global_attn_indexes"],
                window_size=14,
                out_chans=256,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=256,
                image_embedding_size=(grid, grid),
                input_image_size=(image_size, image_size),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                transformer_dim=256,
                iou_head_depth=3,
                iou_head_hidden_dim=256,
            ),
            pixel_mean=PIXEL_MEAN,
            pixel_std=PIXEL_STD,
        )
    model.to_empty(device="cpu")
    model.pixel_mean.copy_(torch.tensor(PIXEL_MEAN).view(-1, 1, 1))  # not in the state_dict
    model.pixel_std.copy_(torch.tensor(PIXEL_STD).view(-1, 1, 1))
    fill_sam_random(model, seed)
    return model.eval()


# ---- Florence-2 ----------------------------------------------------------------------------------

NATIVE_VOCAB = 51328  # the native checkpoints pad the vocabulary (51289 + <image> + padding rows)
IMAGE_TOKEN_ID = 51289


def seeded_florence2_fill(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """New tensors for `state`, key by key in sorted key order, from one seeded generator.

    Matrices and embedding tables: N(0, 0.25/fan_in) (features of realistic size); LayerNorm weights:
    1 + N(0, 0.1^2); every other vector (biases, final_logits_bias): N(0, 0.1^2); the cosine temporal
    table: its value + N(0, 0.1^2), so a loader that recomputes instead of loading it is caught.
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


def native_florence2_config(config: Any, attn_implementation: str = "eager") -> Any:
    """transformers' Florence2Config describing the same network as our `miniflorence.Florence2Config`."""
    from transformers import BartConfig
    from transformers import Florence2Config as HFConfig
    from transformers.models.florence2.configuration_florence2 import Florence2VisionConfig

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
        activation_dropout=config.activation_dropout, activation_function="gelu",
        scale_embedding=False,
    )
    hf = HFConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_TOKEN_ID)
    hf._attn_implementation = attn_implementation
    hf.text_config._attn_implementation = attn_implementation
    hf.vision_config._attn_implementation = attn_implementation
    return hf


def native_florence2(config: Any, seed: int = 0, attn_implementation: str = "eager") -> torch.nn.Module:
    """transformers' Florence2ForConditionalGeneration for our config, seeded weights, eval mode."""
    from transformers import Florence2ForConditionalGeneration

    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(native_florence2_config(config, attn_implementation)).eval()
    model.load_state_dict(seeded_florence2_fill(model.state_dict(), seed))
    return model
