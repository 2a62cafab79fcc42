"""ConvViT: features, multi-scale maps, windowed stage-3 attention, layer ids for lr decay."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from einops import rearrange

import convmae
from tests.test_convmae_model import TINY


def build(config: convmae.ConvMAEConfig = TINY) -> convmae.ConvViT:
    torch.manual_seed(0)
    return convmae.ConvViT(config).eval()


def test_features_head_and_pooling() -> None:
    model = build()
    imgs = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_tokens(imgs)
        features = model.forward_features(imgs)
        logits = model(imgs)
    assert tokens.shape == (2, 16, 32) and features.shape == (2, 32) and logits.shape == (2, 5)
    torch.testing.assert_close(features, model.fc_norm(tokens.mean(1)), atol=0, rtol=0)
    torch.testing.assert_close(logits, model.forward_head(features), atol=0, rtol=0)
    plain = build(replace(TINY, global_pool=False, num_classes=0))
    assert not hasattr(plain, "fc_norm") and isinstance(plain.head, torch.nn.Identity)
    with torch.no_grad():
        assert plain(imgs).shape == (2, 32)  # official non-pooled path: norm, then token 0


def test_multiscale_features() -> None:
    model = build(replace(TINY, image_size=128))
    imgs = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        maps = model.forward_multiscale(imgs)
        tokens = model.forward_tokens(imgs)
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "s0": (1, 16, 32, 32),  # stride 4
        "s1": (1, 24, 16, 16),  # stride 8
        "s2": (1, 32, 8, 8),  # stride 16
        "s3": (1, 32, 4, 4),  # stride 32: 2x2 max pool of s2
    }
    torch.testing.assert_close(rearrange(maps["s2"], "b c h w -> b (h w) c"), tokens, atol=0, rtol=0)
    torch.testing.assert_close(maps["s3"], torch.nn.functional.max_pool2d(maps["s2"], 2), atol=0, rtol=0)


def test_windowed_stage3_attention() -> None:
    """Windowed blocks attend within w x w windows; a window the size of the grid is global attention."""
    model = build(replace(TINY, image_size=128, depth=(1, 1, 1)))
    imgs = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        whole = model.forward_multiscale(imgs, window_size=8, global_blocks=())["s2"]
        assert torch.equal(whole, model.forward_multiscale(imgs)["s2"])
        windowed = model.forward_multiscale(imgs, window_size=4, global_blocks=())["s2"]
        # by hand: run the single block on each 4x4 window of the 8x8 grid
        _, s2 = model.forward_convolutions(imgs)
        grid = rearrange(model.stage3_tokens(s2), "b (h w) c -> b h w c", h=8)
        expected = torch.empty_like(grid)
        for i in range(0, 8, 4):
            for j in range(0, 8, 4):
                window = grid[:, i : i + 4, j : j + 4].reshape(2, 16, -1)
                expected[:, i : i + 4, j : j + 4] = model.blocks3[0](window).reshape(2, 4, 4, -1)
    torch.testing.assert_close(windowed, rearrange(expected, "b h w c -> b c h w"), atol=1e-6, rtol=0)
    assert not torch.allclose(windowed, whole, atol=1e-3)
    with pytest.raises(ValueError, match="window_size 3 does not divide the stage-3 grid 8"):
        model.forward_multiscale(imgs, window_size=3)


def test_layer_ids_for_layerwise_lr_decay() -> None:
    """Official `get_layer_id_for_vit`: embeddings and stages 1-2 are 0, block i is i + 1, the head last."""
    model = convmae.ConvViT(replace(TINY, depth=(1, 1, 3)))
    assert model.num_layers == 4
    ids = {name: model.layer_id(name) for name, _ in model.named_parameters()}
    assert ids["pos_embed"] == ids["patch_embed1.proj.weight"] == ids["patch_embed4.weight"] == 0
    assert ids["blocks1.0.attn.weight"] == ids["blocks2.0.mlp.fc2.bias"] == 0
    assert ids["blocks3.0.attn.qkv.weight"] == 1 and ids["blocks3.2.mlp.fc1.bias"] == 3
    assert ids["fc_norm.weight"] == ids["head.weight"] == ids["head.bias"] == 4
    assert model.no_weight_decay() == {"pos_embed"}


def test_drop_path_only_while_training() -> None:
    model = build(replace(TINY, drop_path_rate=0.5))
    imgs = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(imgs), model(imgs))
        model.train()
        torch.manual_seed(1)
        first = model(imgs)
        torch.manual_seed(2)
        assert not torch.equal(first, model(imgs))


def test_wrong_image_size() -> None:
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 64, 64\), got \(1, 3, 96, 96\)"):
        build()(torch.randn(1, 3, 96, 96))
