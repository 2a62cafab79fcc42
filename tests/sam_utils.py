"""Helpers for the SAM tests: the official model with seeded random weights, and its conversion.

`official_sam(variant, image_size, seed)` builds the official `segment_anything` model from its
classes with the official numbers for the variant (the official `build_sam_vit_*` hard-code a
1024 input, so the size is ours to choose) and fills every state_dict tensor, in sorted key order,
from one seeded generator. `to_minisam(official, tmp_path)` saves its state_dict as a `.pth`, runs
`python -m weights_convert sam` on it (the CLI code path) and loads the result with `load_sam`.

Random weights (the official init leaves pos_embed and rel_pos at zero, which would hide them):
- Linear/conv weights: N(0, 1/fan_in), so activations stay O(1) through all 32 vit_h blocks and
  the mask logits are spread around the 0.0 threshold (randn * 0.02 makes them vanish);
- biases: 0.02 * N(0, 1); norm weights: 1 + 0.1 * N(0, 1);
- embedding tables (point / not-a-point / no-mask embeddings, IoU and mask tokens) and the random
  Fourier matrix: N(0, 1), their official init;
- pos_embed: 0.5 * N(0, 1); rel_pos_h/w: 0.1 * N(0, 1) (each visibly changes the outputs).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch

from conftest import import_official_sam

# The official numbers (segment_anything/build_sam.py). vit_t is NOT official: a tiny test preset.
OFFICIAL_ENCODERS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=[7, 15, 23, 31]),
    "vit_t": dict(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=[1]),
}
TEST_IMAGE_SIZE = {"vit_t": 160}


def segment_anything():
    """The official package (skip when absent); see `conftest.import_official_sam`."""
    return import_official_sam()


def random_value(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """The random value of one official state_dict tensor (see the module docstring for the scales)."""
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
def fill_random(model: torch.nn.Module, seed: int = 0) -> None:
    """Overwrite every state_dict tensor of an (official-layout) model, in sorted key order, from one generator."""
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    for key in sorted(state):
        state[key].copy_(random_value(key, state[key].shape, generator))


def official_sam(variant: str, image_size: int = 1024, seed: int = 0):
    """The official `Sam` for `variant` at `image_size`, seeded random weights, eval mode."""
    sa = segment_anything()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    enc = OFFICIAL_ENCODERS[variant]
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
                embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size), mask_in_chans=16
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                transformer_dim=256,
                iou_head_depth=3,
                iou_head_hidden_dim=256,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
    del sa
    model.to_empty(device="cpu")
    model.pixel_mean.copy_(torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1))  # not in the state_dict
    model.pixel_std.copy_(torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1))
    fill_random(model, seed)
    return model.eval()


def to_minisam(official_model: torch.nn.Module, tmp_path: Path, image_size: int | None = None, use_sdpa: bool | None = None):
    """Save the official state_dict, convert it with the CLI code path, load it with `minisam.load_sam`."""
    import minisam
    from weights_convert.__main__ import main

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    src, dst = tmp_path / "official.pth", tmp_path / "minisam.safetensors"
    torch.save(official_model.state_dict(), src)
    assert main(["sam", str(src), str(dst)]) == 0
    src.unlink()
    return minisam.load_sam(dst, image_size=image_size, use_sdpa=use_sdpa)
