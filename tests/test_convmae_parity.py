"""ConvMAE family against the official implementations' outputs (tests/fixtures/convmae, see PROVENANCE.md).

Each fixture's official state_dict goes through `python -m weights_convert convmae` as an official
`{'model': ...}` checkpoint, is loaded with `convmae.load_convmae` (`load_convvit` for ConvViT), and
is run on the stored images with the stored masking noise. Tolerances (REFERENCE / DESIGN): max
abs 1e-5, loss 1e-6. The fixtures are committed: a missing one is a failure, not a skip.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers.convmae import FIXTURE_DIR, convert_fixture, read_fixture

import convmae

pytestmark = pytest.mark.all_threads  # full-width models: their matmuls use every core

TOL, LOSS_TOL = 1e-5, 1e-6


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def check_config(meta: dict, config: convmae.ConvMAEConfig) -> None:
    assert list(config.embed_dim) == json.loads(meta["embed_dim"])
    assert list(config.depth) == json.loads(meta["depth"])
    assert list(config.mlp_ratio) == json.loads(meta["mlp_ratio"])
    assert config.num_heads == int(meta["num_heads"])


@pytest.mark.parametrize("use_sdpa", [False, True], ids=["math", "sdpa"])
@pytest.mark.parametrize("name", ["convmae_small_normpix0", "convmae_small_normpix1"])
def test_convmae_matches_official(name: str, use_sdpa: bool, tmp_path: Path) -> None:
    meta, t, path = convert_fixture(name, tmp_path)
    model = convmae.load_convmae(path, use_sdpa=use_sdpa)
    assert type(model) is convmae.ConvMAE and model.config.use_sdpa == use_sdpa
    check_config(meta, model.config)
    assert model.config.norm_pix_loss == (meta["norm_pix_loss"] == "true")
    assert model.config.decoder_depth == int(meta["decoder_depth"])
    imgs, noise, ratio = t["input.imgs"], t["input.noise"], float(meta["mask_ratio"])
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(imgs, ratio, noise)
        pred = model.forward_decoder(latent, ids_restore)
        loss = model.forward_loss(imgs, pred, mask)
        loss_all, pred_all, mask_all = model(imgs, ratio, noise)
    assert torch.equal(ids_restore, t["output.ids_restore"])
    assert torch.equal(mask, t["output.mask"])
    assert max_diff(latent, t["output.latent"]) <= TOL
    assert max_diff(pred, t["output.pred"]) <= TOL
    assert max_diff(loss.reshape(1), t["output.loss"]) <= LOSS_TOL
    # forward is the three stages in a row
    assert torch.equal(loss_all, loss) and torch.equal(pred_all, pred) and torch.equal(mask_all, mask)


@pytest.mark.parametrize("use_sdpa", [False, True], ids=["math", "sdpa"])
def test_fastconvmae_matches_official(use_sdpa: bool, tmp_path: Path) -> None:
    meta, t, path = convert_fixture("fastconvmae_small", tmp_path, "--kind", "fastconvmae")
    model = convmae.load_convmae(path, use_sdpa=use_sdpa)
    assert type(model) is convmae.FastConvMAE
    check_config(meta, model.config)
    assert model.config.decoder_depth == int(meta["decoder_depth"]) == 8  # what the official code built
    with torch.no_grad():
        loss, pred, mask = model(t["input.imgs"], float(meta["mask_ratio"]), t["input.noise"])
    assert torch.equal(mask, t["output.mask"])
    assert max_diff(pred, t["output.pred"]) <= TOL
    assert max_diff(loss.reshape(1), t["output.loss"]) <= LOSS_TOL


@pytest.mark.parametrize("use_sdpa", [False, True], ids=["math", "sdpa"])
def test_convvit_matches_official(use_sdpa: bool, tmp_path: Path) -> None:
    meta, t, path = convert_fixture("convvit_small", tmp_path)
    model = convmae.load_convvit(path, use_sdpa=use_sdpa)
    assert type(model) is convmae.ConvViT
    check_config(meta, model.config)
    assert model.config.num_classes == int(meta["classes"])
    assert model.config.global_pool == (meta["global_pool"] == "true")
    with torch.no_grad():
        logits = model(t["input.imgs"])
    assert max_diff(logits, t["output.logits"]) <= TOL


def test_fresh_positions_equal_the_official_sincos() -> None:
    """Our sin-cos table (float64, column index first) equals the one the official init stored."""
    meta, t = read_fixture("convmae_small_normpix0")
    config = convmae.ConvMAEConfig(
        embed_dim=json.loads(meta["embed_dim"]),
        depth=json.loads(meta["depth"]),
        num_heads=4,
        decoder_embed_dim=int(meta["decoder_embed_dim"]),
        decoder_depth=1,
        decoder_num_heads=4,
    )
    model = convmae.ConvMAE(config)
    assert torch.equal(model.pos_embed.data, t["model.pos_embed"])
    assert torch.equal(model.decoder_pos_embed.data, t["model.decoder_pos_embed"])


# SHA-256 of the files as made by the official code (../shared/fixtures/convmae; PROVENANCE.md).
FIXTURE_SHA256 = {
    "convmae_small_normpix0": "01a7650dfe516f3e8d5143225165c99cbf1ad0263a6379c1e534e68b7bf44f0f",
    "convmae_small_normpix1": "f20a50418d6314e1d0b4522838a9aeb7185d1abf7740c1b671d2dfd2e864115c",
    "fastconvmae_small": "6668dd8001899bcfa967cccfcfe4ef9e30d9c042d8b99d33239e4658ae4a45cc",
    "convvit_small": "0ebbf70d92be64601baa81af8b4cf5a669a258cc38d026af7f7036313a1006d8",
}


@pytest.mark.parametrize("name", sorted(FIXTURE_SHA256))
def test_fixture_copies_are_the_official_ones(name: str) -> None:
    """The committed fixtures are byte-for-byte the ones the official code made (PROVENANCE.md)."""
    data = (FIXTURE_DIR / f"{name}.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == FIXTURE_SHA256[name]
