"""ConvMAE fast path: the visible-blocks layout against the dense official formula, bf16, torch.compile.

- The convolution stages hold only the blocks of the kept tokens (`convmae.masking.TokenBlocks`);
  a dense re-statement of the official CBlock (`x + conv2(dwconv(mask * conv1(LN(x))))` on whole
  NCHW maps, with the very same modules) gives the same features at every kept position.
- bf16 (autocast, and a bf16 model from `load_convmae(dtype=torch.bfloat16)`): the loss within 1% of
  fp32 on the official fixtures (ConvMAE and FastConvMAE), and of the official loss stored there.
- `compile=True` gives the eager outputs within float32 rounding (slow: compiling takes a while).
- The training-only kernels: the depthwise convolution's backward from the blocks (`DepthwiseAtBlocks`,
  `TokenBlocks.windows`) against autograd of the plain convolution, and the written-out attention of
  bf16 training on a CPU against the fused kernel.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import convmae
from convmae.blocks import Attention, CBlock, DepthwiseAtBlocks, PatchEmbed
from convmae.masking import TokenBlocks, random_masking, upsample_mask
from minivision.checkpoint import save_converted
from tests.test_convmae_parity import convert_fixture, max_diff

TINY = convmae.tiny_config()


def dense_patch_embed(embed: PatchEmbed, x: torch.Tensor) -> torch.Tensor:
    """The official PatchEmbed on an NCHW map: strided conv, LayerNorm over channels, GELU."""
    x = embed.proj(x)
    return embed.act(embed.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def dense_cblock(blk: CBlock, x: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """The official CBlock on an NCHW map (Alpha-VL/ConvMAE `vision_transformer.CBlock.forward`)."""
    y = blk.conv1(blk.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    y = y if visible is None else visible * y
    x = x + blk.conv2(blk.attn(y))
    h = blk.norm2(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return x + blk.mlp.fc2(blk.mlp.act(blk.mlp.fc1(h)))


def dense_stages(model: convmae.ConvMAE | convmae.ConvViT, imgs: torch.Tensor, mask: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stages 1 and 2 on whole maps, the official way: (B, C1, 4g, 4g), (B, C2, 2g, 2g)."""
    g = model.config.grid_size
    visible1 = None if mask is None else 1 - upsample_mask(mask, g, 4)
    visible2 = None if mask is None else 1 - upsample_mask(mask, g, 2)
    x = dense_patch_embed(model.patch_embed1, imgs)
    for blk in model.blocks1:
        x = dense_cblock(blk, x, visible1)
    s1 = x
    x = dense_patch_embed(model.patch_embed2, x)
    for blk in model.blocks2:
        x = dense_cblock(blk, x, visible2)
    return s1, x


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere (biases and norms too), so every term of a block shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise / fan_in**0.5 if p.ndim > 1 else 1 + 0.1 * noise)
    return model.eval()


def test_token_blocks_round_trip_and_placement() -> None:
    ids = torch.tensor([[5, 0], [3, 2]])  # two sequences on a 3 x 3 grid, two tokens each
    blocks = TokenBlocks(ids, grid_size=3, scale=2)
    x = torch.randn(2, 2, 4, 6)  # (V, Lk, 2 * 2, C)
    m = blocks.to_map(x)
    assert m.shape == (2, 6, 6, 6) and m.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(blocks.from_map(m), x)
    # token 5 of sequence 0 is row 1, column 2: map rows 2-3, columns 4-5, raster order within the block
    assert torch.equal(m[0, :, 2:4, 4:6].permute(1, 2, 0).reshape(4, 6), x[0, 0])
    assert torch.count_nonzero(m) == torch.count_nonzero(x) == 2 * 2 * 4 * 6  # zero outside the blocks


def test_visible_blocks_equal_the_dense_official_stages() -> None:
    """ConvMAE's kept positions and ConvViT's whole maps equal the official whole-map computation."""
    model = randomize(convmae.ConvMAE(replace(TINY, image_size=96)))
    imgs, noise = torch.randn(2, 3, 96, 96), torch.rand(2, 36)
    ids_keep, mask, _ = random_masking(noise, 0.75)
    with torch.no_grad():
        s1, s2 = model.forward_convolutions(imgs, ids_keep)
        d1, d2 = dense_stages(model, imgs, mask)
    torch.testing.assert_close(s1, TokenBlocks(ids_keep, 6, 4).from_map(d1), atol=1e-5, rtol=0)
    torch.testing.assert_close(s2, TokenBlocks(ids_keep, 6, 2).from_map(d2), atol=1e-5, rtol=0)

    vit = randomize(convmae.ConvViT(replace(TINY, image_size=96)))
    vit.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        maps = vit.forward_multiscale(imgs)
        d1, d2 = dense_stages(vit, imgs, None)
    torch.testing.assert_close(maps["s0"], d1, atol=1e-5, rtol=0)
    torch.testing.assert_close(maps["s1"], d2, atol=1e-5, rtol=0)


def fixture_losses(name: str, tmp_path: Path, *extra: str) -> tuple[float, float, float, float]:
    """(official fp32, ours fp32, ours under bf16 autocast, ours as a bf16 model) losses on a fixture."""
    meta, t, path = convert_fixture(name, tmp_path, *extra)
    imgs, noise, ratio = t["input.imgs"], t["input.noise"], float(meta["mask_ratio"])
    model = convmae.load_convmae(path)
    half = convmae.load_convmae(path, dtype=torch.bfloat16)
    with torch.no_grad():
        fp32 = model(imgs, ratio, noise)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(imgs, ratio, noise)[0]
        bf16 = half(imgs, ratio, noise)
    assert bf16[1].dtype == torch.bfloat16 and bf16[0].dtype == autocast.dtype == torch.float32
    return t["output.loss"].item(), fp32.item(), autocast.item(), bf16[0].item()


@pytest.mark.parametrize(
    "name,extra", [("convmae_small_normpix1", ()), ("fastconvmae_small", ("--kind", "fastconvmae"))]
)
def test_bf16_loss_within_one_percent(name: str, extra: tuple[str, ...], tmp_path: Path) -> None:
    official, fp32, autocast, bf16 = fixture_losses(name, tmp_path, *extra)
    assert abs(fp32 - official) <= 1e-6
    for loss in (autocast, bf16):
        assert abs(loss - fp32) <= 0.01 * fp32, (name, loss, fp32)


def test_bf16_convvit_logits_close(tmp_path: Path) -> None:
    _, t, path = convert_fixture("convvit_small", tmp_path)
    fp32, half = convmae.load_convvit(path), convmae.load_convvit(path, dtype=torch.bfloat16)
    with torch.no_grad():
        reference, logits = fp32(t["input.imgs"]), half(t["input.imgs"])
    assert logits.dtype == torch.bfloat16
    assert max_diff(logits.float(), reference) <= 0.05 * reference.abs().max().item()
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))


def test_depthwise_convolution_stays_float32_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    blk = CBlock(8, 2.0).eval()
    seen, original = [], F.conv2d

    def spy(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append(x.dtype)
        return original(x, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", spy)
    x = torch.randn(1, 4, 4, 8)  # (V, Lk, 2 * 2, C): every token of a 2 x 2 grid
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = blk(x, TokenBlocks(torch.arange(4).expand(1, 4), 2, 2))
    assert seen == [torch.float32] and out.dtype == torch.float32  # the residual stream stays float32


@pytest.mark.slow
@pytest.mark.parametrize("cls", [convmae.ConvMAE, convmae.FastConvMAE, convmae.ConvViT])
def test_compile_equals_eager(cls: type, tmp_path: Path) -> None:
    """`compile=True` (through the loader) gives the eager outputs and gradients within float32 rounding."""
    torch.manual_seed(0)
    config = replace(TINY, image_size=32, embed_dim=(8, 16, 16), depth=(1, 1, 1), decoder_embed_dim=8, num_classes=3)
    kind = {convmae.ConvMAE: "convmae", convmae.FastConvMAE: "fastconvmae", convmae.ConvViT: "convvit"}[cls]
    model = randomize(cls(config))
    path = tmp_path / "tiny.safetensors"
    save_converted(path, model.state_dict(), "convmae", {**config.to_dict(), "model": kind})
    load = convmae.load_convvit if cls is convmae.ConvViT else convmae.load_convmae
    eager, compiled = load(path).train(), load(path, compile=True).train()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 4)
    outputs = []
    for m in (eager, compiled):
        out = m(imgs) if cls is convmae.ConvViT else m(imgs, 0.75, noise)[0]
        loss = out.square().mean() if cls is convmae.ConvViT else out
        loss.backward()
        outputs.append((loss.detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None}))
    (a, grads_a), (b, grads_b) = outputs
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], atol=1e-4, rtol=1e-4, msg=k)


@pytest.mark.parametrize(("grid", "scale", "kept"), [(5, 4, 6), (4, 2, 3), (3, 4, 9), (4, 4, 1)])
def test_depthwise_at_blocks_matches_autograd_of_the_plain_convolution(grid: int, scale: int, kept: int) -> None:
    """The outputs at the blocks bit for bit, the three gradients within float64 rounding, gradcheck;
    (5, 4, 6) and (4, 4, 1) run on the blocks' windows, the others on the map."""
    torch.manual_seed(0)
    V, C = 2, 4
    blocks = TokenBlocks(torch.stack([torch.randperm(grid * grid)[:kept] for _ in range(V)]), grid, scale)
    assert blocks.windows_are_smaller(2) == (scale == 4 and kept * 64 <= grid * grid * 16)
    rows = torch.randn(V, kept, scale * scale, C, dtype=torch.float64)
    weight = torch.randn(C, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(C, dtype=torch.float64, requires_grad=True)
    plain_rows, rows = rows.clone().requires_grad_(), rows.clone().requires_grad_()
    plain = blocks.from_map(F.conv2d(blocks.to_map(plain_rows), weight, bias, padding=2, groups=C))
    ours = DepthwiseAtBlocks.apply(rows, weight, bias, blocks)
    assert torch.equal(ours, plain)
    grad = torch.randn_like(plain)
    expected = torch.autograd.grad(plain, (plain_rows, weight, bias), grad)
    for got, want in zip(torch.autograd.grad(ours, (rows, weight, bias), grad), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    x = rows.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w, b: DepthwiseAtBlocks.apply(a, w, b, blocks), (x, weight, bias))


def test_token_blocks_windows_are_the_zero_padded_map_around_each_block() -> None:
    """`windows` reads the blocks' features where the map has them and zeros elsewhere (masked positions,
    beyond the edge); `add_windows` is its transpose: <windows(x), w> = <x, add_windows(w)>."""
    torch.manual_seed(0)
    V, C, grid, scale = 2, 3, 4, 4
    ids = torch.stack([torch.randperm(grid * grid)[:5] for _ in range(V)])
    blocks = TokenBlocks(ids, grid, scale)
    x = torch.randn(V, 5, scale * scale, C, dtype=torch.float64)
    windows = blocks.windows(x, reach=2)  # (V * 5, C, 8, 8)
    assert windows.shape == (V * 5, C, 8, 8) and windows.is_contiguous(memory_format=torch.channels_last)
    padded = F.pad(blocks.to_map(x), (2, 2, 2, 2))
    for v in range(V):
        for k, token in enumerate(ids[v].tolist()):
            row, col = token // grid * scale, token % grid * scale
            assert torch.equal(windows[v * 5 + k], padded[v, :, row:row + 8, col:col + 8])
    w = torch.randn_like(windows).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close((windows * w).sum(), (x * blocks.add_windows(w, reach=2)).sum(), atol=1e-12, rtol=0)


def test_bf16_training_attention_on_cpu_matches_the_fused_kernel() -> None:
    """bf16 training on a CPU writes the attention out (scale on q, as the fused kernel does): within bf16
    rounding of the float32 fused kernel, forward and input gradient."""
    torch.manual_seed(0)
    attn = Attention(64, 4)
    x = torch.randn(2, 10, 64)
    reference_x = x.clone().requires_grad_()
    reference = attn(reference_x)
    reference.square().sum().backward()
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    assert max_diff(out.float(), reference) <= 0.02 * reference.abs().max().item()
    assert max_diff(x.grad, reference_x.grad) <= 0.03 * reference_x.grad.abs().max().item()
