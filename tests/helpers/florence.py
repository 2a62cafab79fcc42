"""Shared helpers for the Florence-2 tests and bench/parity.py: inputs, the native model steered and converted
(the native model itself is built by tests/reference/official.py), stage-by-stage comparison, the real weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from official import IMAGE_TOKEN_ID

from helpers.paths import asset_path, needs_reference
from miniflorence import CONFIGS, Florence2, tiny_config
from miniflorence.davit import DaViT
from miniflorence.generation import GenerationOptions
from minivision.checkpoint import load_strict, save_converted

EOS, PAD = 2, 1
VOCAB = 51289  # ours; the native table has padding rows up to 51328 (`<image>` = 51289 among them)


def native_input_ids(prompt_ids: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """Native models read `<image>` x num_image_tokens before the prompt: (B, T) -> (B, I + T)."""
    image = torch.full((prompt_ids.shape[0], num_image_tokens), IMAGE_TOKEN_ID, dtype=prompt_ids.dtype)
    return torch.cat([image, prompt_ids], dim=1)


def save_tiny_checkpoint(path: Path, seed: int = 0, **changes: Any) -> Florence2:
    """A seeded tiny Florence-2 (`tiny_config(**changes)`) written as `weights_convert` writes files; returns it."""
    config = tiny_config(**changes)
    torch.manual_seed(seed)
    model = Florence2(config).eval()
    tensors = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    save_converted(path, tensors, "florence2", config.to_dict())
    return model


def hf_kwargs(options: GenerationOptions) -> dict:
    """The same settings, spelled for transformers' `generate`."""
    return dict(max_new_tokens=options.max_new_tokens, num_beams=options.num_beams, do_sample=False,
                no_repeat_ngram_size=options.no_repeat_ngram_size, early_stopping=options.early_stopping,
                length_penalty=options.length_penalty, forced_bos_token_id=options.forced_bos_token_id,
                forced_eos_token_id=options.forced_eos_token_id, decoder_start_token_id=options.decoder_start_token_id,
                eos_token_id=options.eos_token_id, pad_token_id=options.pad_token_id)


def steer_native(native) -> float:
    """Make the last decoder LayerNorm output a constant 1 in feature 0 (weight 0, bias 1), so that
    column 0 of the tied token table acts as a logit bias: -1e4 for the native padding rows (our
    51289-row table has none, so they must neither win nor weigh in the softmax). Returns the EOS
    row's original value in that column; `set_eos_bias` adds to it. Done before conversion, so our
    model gets the same weights."""
    lm = native.model.language_model
    with torch.no_grad():
        norm = lm.decoder.layers[-1].final_layer_norm
        norm.weight[0], norm.bias[0] = 0.0, 1.0
        lm.shared.weight[VOCAB:] = 0.0
        lm.shared.weight[VOCAB:, 0] = -1.0e4
    assert native.lm_head.weight is lm.shared.weight  # the output projection is the same table
    return lm.shared.weight[EOS, 0].item()


def set_eos_bias(native, ours, base: float, bias: float) -> None:
    with torch.no_grad():
        native.model.language_model.shared.weight[EOS, 0] = base + bias
        ours.language_model.model.shared.weight[EOS, 0] = base + bias


def native_pair(config, seed: int):
    """transformers' native model with seeded (steered) weights, and ours converted from it."""
    needs_reference("transformers")
    from official import native_florence2

    from miniflorence.model import florence2_from_tensors
    from weights_convert.florence2 import convert_tensors

    native = native_florence2(config, seed=seed)
    base = steer_native(native)
    _, tensors = convert_tensors(native.state_dict(), config=config)
    ours = florence2_from_tensors(config, {k: v.clone() for k, v in tensors.items()})  # not sharing native's tensors
    return native, ours, base


def image_prompts(image_size: int, count: int, seed: int = 11) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of 2 images + prompts `<s> ... </s>`; the second prompt shorter and right-padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        prompt = torch.randint(3, 50265, (2, 9), generator=g)
        prompt[:, 0], prompt[0, 8] = 0, EOS
        prompt[1, 4 + i % 4], prompt[1, 5 + i % 4:] = EOS, PAD
        out.append((torch.randn(2, 3, image_size, image_size, generator=g), prompt))
    return out


def batch(image_size: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Two images; prompts `<s> ... </s>` of 9 and 7 tokens, the second right-padded with <pad>."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 50265, (2, 9), generator=g)
    prompt[:, 0] = 0
    prompt[0, 8] = 2
    prompt[1, 6], prompt[1, 7:] = 2, 1
    decoder = torch.randint(3, VOCAB, (2, 6), generator=g)
    decoder[:, 0] = 2
    return {
        "pixel_values": torch.randn(2, 3, image_size, image_size, generator=g),
        "input_ids": prompt,
        "attention_mask": (prompt != 1).long(),
        "decoder_input_ids": decoder,
    }


def compare(native, ours: Florence2, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs differences of every stage, with and without the prompt attention mask."""
    x, prompt, dec = inputs["pixel_values"], inputs["input_ids"], inputs["decoder_input_ids"]
    errors = {}
    with torch.no_grad():
        theirs_grid = native.model.vision_tower(x).last_hidden_state.permute(0, 2, 3, 1)  # (B, H, W, C)
        errors["vision features"] = (ours.vision_tower(x) - theirs_grid).abs().max().item()
        theirs_tokens = native.model.get_image_features(x).pooler_output
        tokens = ours.encode_image(x)
        errors["image tokens"] = (tokens - theirs_tokens).abs().max().item()
        n_image = tokens.shape[1]
        for name, mask in (("no mask", None), ("mask", inputs["attention_mask"])):
            native_mask = None if mask is None else torch.cat([torch.ones(2, n_image, dtype=mask.dtype), mask], dim=1)
            out = native(input_ids=native_input_ids(prompt, n_image), pixel_values=x, attention_mask=native_mask,
                         decoder_input_ids=dec)
            states, _ = ours.encode(x, prompt, mask)
            errors[f"encoder states, {name}"] = (states - out.encoder_last_hidden_state).abs().max().item()
            logits = ours(x, prompt, dec, mask)
            assert logits.shape == (2, dec.shape[1], VOCAB)
            errors[f"logits, {name}"] = (logits - out.logits[..., :VOCAB]).abs().max().item()
    return errors


FOLDER = ("weights", "florence2-base-partial")


def real_tensors() -> dict[str, torch.Tensor]:
    with np.load(asset_path(*FOLDER, "florence2_base_partial_weights.npz")) as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


def part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def stage0(tower, pixels: torch.Tensor) -> torch.Tensor:
    """convs.0 -> blocks.0.0 -> convs.1.norm, as a (1, 128, 56, 56) map (the fixture's layout)."""
    with torch.no_grad():
        x, size = tower.convs[0](pixels, (pixels.shape[2], pixels.shape[3]))  # (1, 56*56, 128)
        x = tower.blocks[0][0](x, size)
        x = tower.convs[1].norm(x)  # the LayerNorm that opens stage 1
    return x.transpose(1, 2).reshape(1, -1, *size)  # (1, 128, 56, 56)


def real_stage0() -> tuple[DaViT, torch.Tensor, torch.Tensor]:
    """Our stage 0 with the real weights (strict loads of exactly the exported parts), and the fixture."""
    real = real_tensors()
    with np.load(asset_path(*FOLDER, "ref_car224_stage0.npz")) as f:
        pixels, expected = torch.from_numpy(f["pixel_values"]), torch.from_numpy(f["stage0_ln_out"])
    c = CONFIGS["base"]
    tower = DaViT(dims=c.dims[:2], depths=(1, 1), heads=c.heads[:2], channel_groups=c.channel_groups[:2],
                  window_size=c.window_size, patch_sizes=c.patch_sizes[:2], patch_strides=c.patch_strides[:2],
                  patch_paddings=c.patch_paddings[:2], patch_prenorm=c.patch_prenorm[:2], mlp_ratio=c.mlp_ratio,
                  drop_path_rate=0.0).eval()
    load_strict(tower.convs[0], part(real, "vision_tower.convs.0."), "convs.0")
    load_strict(tower.blocks[0][0], part(real, "vision_tower.blocks.0.0."), "blocks.0.0")
    load_strict(tower.convs[1].norm, part(real, "vision_tower.convs.1.norm."), "convs.1.norm")
    return tower, pixels, expected
