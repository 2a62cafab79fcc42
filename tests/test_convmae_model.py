"""ConvMAE / FastConvMAE behaviour: sizes, masking, no leakage, generalised complementary masks, errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import convmae
from convmae.blocks import Block
from convmae.masking import complementary_masking, random_masking, upsample_mask

TINY = convmae.tiny_config()


def build(cls: type, config: convmae.ConvMAEConfig = TINY, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(config).eval()


def test_convmae_base_sizes() -> None:
    """convmae_base: 313 tensors, 115,041,408 parameters, 88.93M of them in the encoder with the fusion convs."""
    with torch.device("meta"):
        model = convmae.ConvMAE(convmae.CONFIGS["convmae_base"])
        fast = convmae.FastConvMAE(convmae.CONFIGS["convmae_base"])
        vit = convmae.ConvViT(convmae.CONFIGS["convmae_base"])
    assert len(model.state_dict()) == 313
    assert sum(p.numel() for p in model.parameters()) == 115_041_408
    encoder = sum(p.numel() for k, p in model.named_parameters() if not k.startswith(("decoder_", "mask_token")))
    assert round(encoder / 1e6, 2) == 88.93
    assert model.state_dict().keys() == fast.state_dict().keys()
    assert len(vit.state_dict()) == 207
    assert round(sum(p.numel() for p in vit.parameters()) / 1e6, 2) == 85.37


@pytest.mark.slow
def test_convmae_base_forward_backward_cpu() -> None:
    """Full widths and depths of convmae_base at a reduced image size (64 px: a 4x4 stage-3 grid), batch 2."""
    model = build(convmae.ConvMAE, replace(convmae.CONFIGS["convmae_base"], image_size=64)).train()
    imgs = torch.randn(2, 3, 64, 64)
    loss, pred, mask = model(imgs)
    assert pred.shape == (2, 16, 16 * 16 * 3) and mask.shape == (2, 16)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.requires_grad == (name not in ("pos_embed", "decoder_pos_embed"))
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_random_masking() -> None:
    noise = torch.rand(3, 16)
    ids_keep, mask, ids_restore = random_masking(noise, 0.75)
    assert ids_keep.shape == (3, 4) and mask.sum(1).tolist() == [12.0] * 3
    assert torch.equal(torch.gather(torch.argsort(noise, 1), 1, ids_restore), torch.arange(16).expand(3, 16))
    assert (torch.gather(mask, 1, ids_keep) == 0).all()  # the kept tokens are the unmasked ones
    assert (noise.gather(1, ids_keep).max(1).values < noise.masked_fill(mask == 0, 2).min(1).values).all()


@pytest.mark.parametrize("ratio,views", [(0.75, 4), (0.5, 2)])
def test_complementary_masking_tiles_the_grid(ratio: float, views: int) -> None:
    ids_keep, masks, ids_restore = complementary_masking(torch.rand(2, 64), ratio)
    assert ids_keep.shape == (views, 2, 64 // views) and masks.shape == (views, 2, 64)
    assert torch.equal((1 - masks).sum(0), torch.ones(2, 64))  # each token visible in exactly one view
    for k in range(views):
        assert (torch.gather(masks[k], 1, ids_keep[k]) == 0).all()


def test_upsample_mask_is_the_official_block_expansion() -> None:
    """Equal to the official `reshape(-1,14,14,1).repeat(1,1,1,16).reshape(-1,14,14,4,4).permute(0,1,3,2,4)`."""
    mask = (torch.rand(2, 196) > 0.5).float()
    for scale in (2, 4):
        official = (
            mask.reshape(-1, 14, 14).unsqueeze(-1).repeat(1, 1, 1, scale * scale)
            .reshape(-1, 14, 14, scale, scale).permute(0, 1, 3, 2, 4).reshape(2, 14 * scale, 14 * scale).unsqueeze(1)
        )
        assert torch.equal(upsample_mask(mask, 14, scale), official)


def test_patchify_matches_the_official_layout_and_unpatchify_inverts_it() -> None:
    model = build(convmae.ConvMAE)
    imgs = torch.randn(2, 3, 64, 64)
    h = w = 4
    official = torch.einsum("nchpwq->nhwpqc", imgs.reshape(2, 3, h, 16, w, 16)).reshape(2, h * w, 16 * 16 * 3)
    assert torch.equal(model.patchify(imgs), official)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)


@pytest.mark.parametrize("cls", [convmae.ConvMAE, convmae.FastConvMAE])
def test_masked_pixels_do_not_leak_into_the_encoder(cls: type) -> None:
    """Changing masked pixels changes the latent by exactly 0.0; changing a visible pixel changes it."""
    model = build(cls)
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(imgs, 0.75, noise)
        views = mask.shape[0] // 2
        for k in range(views):  # FastConvMAE: view k must not see the pixels of the other views
            rows = slice(k * 2, (k + 1) * 2)
            hidden = upsample_mask(mask[rows], 4, 16).bool()  # (2, 1, 64, 64) pixels of removed tokens
            noisy = torch.where(hidden, imgs + 10 * torch.randn_like(imgs), imgs)
            changed, _, _ = model.forward_encoder(noisy, 0.75, noise)
            assert (changed[rows] - latent[rows]).abs().max().item() == 0.0
            visible = torch.where(hidden, imgs, imgs + torch.randn_like(imgs))
            moved, _, _ = model.forward_encoder(visible, 0.75, noise)
            assert (moved[rows] - latent[rows]).abs().max().item() > 1e-3


def reorder_noise(ids_shuffle: torch.Tensor, first: int) -> torch.Tensor:
    """Noise whose argsort is `ids_shuffle` rolled left by `first` (so view k's tokens come first)."""
    B, L = ids_shuffle.shape
    rank = (torch.arange(L) - first) % L  # new rank of the token at shuffled position j
    return torch.zeros(B, L).scatter_(1, ids_shuffle, rank.float().expand(B, L))


@pytest.mark.parametrize("image_size,ratio", [(64, 0.75), (128, 0.5), (128, 0.75)])
def test_fastconvmae_view_equals_convmae_with_that_mask(image_size: int, ratio: float) -> None:
    """View k of FastConvMAE is ConvMAE masked to keep view k: complementary masking is exact, any size."""
    config = replace(TINY, image_size=image_size)
    fast, single = build(convmae.FastConvMAE, config), convmae.ConvMAE(config).eval()
    single.load_state_dict(fast.state_dict())
    imgs, noise = torch.randn(2, 3, image_size, image_size), torch.rand(2, config.num_patches)
    with torch.no_grad():
        latent, mask, ids_restore = fast.forward_encoder(imgs, ratio, noise)
        pred = fast.forward_decoder(latent, ids_restore)
        views, Lk = mask.shape[0] // 2, latent.shape[1]
        assert views == round(1 / (1 - ratio))
        for k in range(views):
            rows = slice(k * 2, (k + 1) * 2)
            noise_k = reorder_noise(torch.argsort(noise, 1), k * Lk)
            latent_k, mask_k, ids_k = single.forward_encoder(imgs, ratio, noise_k)
            assert torch.equal(mask_k, mask[rows])
            torch.testing.assert_close(latent_k, latent[rows], atol=1e-5, rtol=0)
            torch.testing.assert_close(single.forward_decoder(latent_k, ids_k), pred[rows], atol=1e-5, rtol=0)


def test_attention_paths_agree() -> None:
    block = Block(32, 4, 4.0).eval()
    x = torch.randn(3, 50, 32)
    with torch.no_grad():
        fused = block(x)
        block.attn.use_sdpa = False
        plain = block(x)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)
    model = build(convmae.ConvMAE)
    plain = build(convmae.ConvMAE, replace(TINY, use_sdpa=False))  # the same seed: the same weights
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    with torch.no_grad():
        a = model(imgs, 0.75, noise)
        b = plain(imgs, 0.75, noise)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)


def test_noise_makes_masking_deterministic() -> None:
    model = build(convmae.ConvMAE)
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 16)
    with torch.no_grad():
        first, second = model(imgs, 0.75, noise), model(imgs, 0.75, noise.clone())
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("cls", [convmae.ConvMAE, convmae.FastConvMAE])
def test_bad_inputs_are_clear_errors(cls: type) -> None:
    model = build(cls)
    imgs = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 64, 64\), got \(2, 3, 224, 224\)"):
        model(torch.randn(2, 3, 224, 224))
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(3, 64, 64))
    for ratio in (0.0, 1.0, -0.25, 1.5):
        with pytest.raises(ValueError, match="mask_ratio must lie strictly between 0 and 1"):
            model(imgs, mask_ratio=ratio)
    with pytest.raises(ValueError, match=r"noise must have shape \(batch, num_patches\) = \(2, 16\)"):
        model(imgs, noise=torch.rand(2, 196))


def test_fastconvmae_needs_keep_sets_that_tile_the_grid() -> None:
    with pytest.raises(ValueError, match="complementary masking needs keep-sets that tile"):
        build(convmae.FastConvMAE)(torch.randn(1, 3, 64, 64), mask_ratio=0.7)
    with pytest.raises(ValueError, match="whole number of views that divides 16"):
        build(convmae.FastConvMAE)(torch.randn(1, 3, 64, 64), mask_ratio=0.8)  # 5 views of 16 tokens


def test_bad_configs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="not a multiple of the total stride 16"):
        replace(TINY, image_size=100)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        replace(TINY, num_heads=5)
    with pytest.raises(ValueError, match="one value per stage"):
        replace(TINY, depth=(1, 1))
    with pytest.raises(ValueError, match="unknown ConvMAEConfig fields: depths"):
        convmae.ConvMAEConfig.from_dict({"depths": [1, 1, 1]})
