"""Florence-2's BART-style language model against transformers' BART (the network both the original
remote code and transformers' native Florence-2 use), with the same seeded weights.

transformers' `BartForConditionalGeneration` has exactly the key layout of the original checkpoint's
`language_model.*` (shared table, encoder, decoder, lm_head, final_logits_bias), so its state dict
loads into ours strictly, without renaming.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
import torch
from helpers.paths import asset_path, needs_reference
from official import seeded_florence2_fill

from miniflorence.language_model import Attention, Florence2LanguageModel

# (vocab, d_model, layers, heads, ffn, max positions): tiny, and Florence-2-base's language model
WIDTHS = {
    "tiny": (300, 32, 2, 4, 64, 64),
    "base": (51289, 768, 6, 12, 3072, 1024),
}


@functools.cache
def tiny_pair(seed: int = 0) -> tuple[torch.nn.Module, Florence2LanguageModel]:
    """`build_pair("tiny", seed)`, built once per seed and shared by the tests of both Florence-2
    language-model modules (tests that switch our attention path use `attention_path`)."""
    return build_pair("tiny", seed)


def build_pair(width: str, seed: int = 0) -> tuple[torch.nn.Module, Florence2LanguageModel]:
    """transformers' BART (eager attention) with seeded weights, and ours loaded from its state dict."""
    transformers = needs_reference("transformers")
    vocab, dim, layers, heads, ffn, positions = WIDTHS[width]
    config = transformers.BartConfig(
        vocab_size=vocab, d_model=dim, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn,
        decoder_ffn_dim=ffn, max_position_embeddings=positions, scale_embedding=False,
        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, forced_bos_token_id=0,
    )
    config._attn_implementation = "eager"
    with torch.device("meta"):  # skip transformers' random init: every tensor is filled below
        reference = transformers.BartForConditionalGeneration(config)
    reference.load_state_dict(seeded_florence2_fill(reference.state_dict(), seed), assign=True)
    reference.tie_weights()
    reference.eval()
    ours = Florence2LanguageModel(vocab, dim, layers, layers, heads, heads, ffn, ffn, positions, pad_token_id=1,
                                  layer_norm_eps=1e-5, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
                                  use_sdpa=True).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@contextlib.contextmanager
def attention_path(model: Florence2LanguageModel, use_sdpa: bool):
    """Run `model` with F.scaled_dot_product_attention (True) or the plain math (False)."""
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    before = [m.use_sdpa for m in attentions]
    for m in attentions:
        m.use_sdpa = use_sdpa
    try:
        yield model
    finally:
        for m, flag in zip(attentions, before, strict=True):
            m.use_sdpa = flag


def inputs(vocab: int, dim: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encoder embeddings (2, 9, D) with the second row padded after 6 tokens, decoder ids (2, 5)."""
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(2, 9, dim, generator=g)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    decoder_ids = torch.cat([torch.full((2, 1), 2), torch.randint(3, vocab, (2, 4), generator=g)], dim=1)
    return embeds, mask, decoder_ids


@pytest.mark.parametrize("width", ["tiny", "base"])
def test_matches_transformers_bart(width: str) -> None:
    reference, ours = build_pair(width) if width == "base" else tiny_pair()
    embeds, mask, decoder_ids = inputs(WIDTHS[width][0], WIDTHS[width][1])
    with torch.no_grad():
        expected = reference(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids)
        for use_sdpa in (False, True):
            with attention_path(ours, use_sdpa):
                encoded = ours.encode(embeds, mask)
                logits = ours(embeds, decoder_ids, mask)
            assert (encoded - expected.encoder_last_hidden_state).abs().max() <= 1e-4
            assert (logits - expected.logits).abs().max() <= 1e-4
    assert expected.logits.std() > 0.1  # the comparison is not between two near-constant tensors


def test_sdpa_equals_math() -> None:
    _, ours = tiny_pair()
    embeds, mask, decoder_ids = inputs(300, 32)
    outputs = {}
    with torch.no_grad():
        for use_sdpa in (False, True):
            with attention_path(ours, use_sdpa):
                outputs[use_sdpa] = ours.encode(embeds, mask), ours(embeds, decoder_ids, mask)
    for math_out, sdpa_out in zip(outputs[False], outputs[True], strict=True):
        torch.testing.assert_close(sdpa_out, math_out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_cached_decoding_equals_full_forward(use_sdpa: bool) -> None:
    _, ours = tiny_pair()
    embeds, mask, decoder_ids = inputs(300, 32)
    with torch.no_grad(), attention_path(ours, use_sdpa):
        encoded = ours.encode(embeds, mask)
        full, _ = ours.decode(decoder_ids, encoded, mask)
        # one token at a time
        cache, steps = None, []
        for i in range(decoder_ids.shape[1]):
            logits, cache = ours.decode(decoder_ids[:, i:i + 1], encoded, mask, cache)
            steps.append(logits)
        assert cache.length == decoder_ids.shape[1]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
        # a prefix of 2, then 3 tokens in one call (the causal mask must be offset by the cache)
        _, cache = ours.decode(decoder_ids[:, :2], encoded, mask)
        rest, cache = ours.decode(decoder_ids[:, 2:], encoded, mask, cache)
        torch.testing.assert_close(rest, full[:, 2:], rtol=0, atol=1e-5)


def test_cross_attention_keys_values_computed_once() -> None:
    _, ours = tiny_pair()
    embeds, mask, decoder_ids = inputs(300, 32)
    with torch.no_grad():
        encoded = ours.encode(embeds, mask)
        _, cache = ours.decode(decoder_ids[:, :1], encoded, mask)
        cross = cache.cross_kv
        # later steps never read the encoder states again: garbage in their place changes nothing
        step, cache = ours.decode(decoder_ids[:, 1:2], torch.full_like(encoded, float("nan")), mask, cache)
        assert cache.cross_kv is cross and torch.isfinite(step).all()


def test_cache_reorder_follows_beams() -> None:
    _, ours = tiny_pair()
    embeds, mask, decoder_ids = inputs(300, 32)
    with torch.no_grad():
        # two "beams" of the same sample: row 0 and row 1 of sample 0
        encoded = ours.encode(embeds[:1], mask[:1]).expand(2, -1, -1)
        beam_mask = mask[:1].expand(2, -1)
        ids = torch.stack([decoder_ids[0], decoder_ids[1]])  # (2, 5) two different beams
        _, cache = ours.decode(ids[:, :3], encoded, beam_mask)
        cache.reorder(torch.tensor([1, 1]))  # both beams continue from beam 1
        stepped, _ = ours.decode(ids[:, 3:4], encoded, beam_mask, cache)
        expected, _ = ours.decode(torch.cat([ids[[1, 1], :3], ids[:, 3:4]], dim=1), encoded, beam_mask)
    torch.testing.assert_close(stepped, expected[:, 3:], rtol=0, atol=1e-5)


def test_padding_is_ignored() -> None:
    """Right padding: the real tokens' encoder states and the logits equal those without the padding."""
    _, ours = tiny_pair()
    embeds, mask, decoder_ids = inputs(300, 32)
    with torch.no_grad():
        padded = ours.encode(embeds[1:], mask[1:])
        trimmed = ours.encode(embeds[1:, :6], None)
        torch.testing.assert_close(padded[:, :6], trimmed, rtol=0, atol=1e-5)
        garbage = embeds[1:].clone()
        garbage[:, 6:] = 100.0
        torch.testing.assert_close(ours(garbage, decoder_ids[1:], mask[1:]), ours(embeds[1:, :6], decoder_ids[1:]),
                                   rtol=0, atol=1e-5)


def test_state_dict_layout() -> None:
    vocab, dim, layers, heads, ffn, positions = WIDTHS["tiny"]
    ours = Florence2LanguageModel(vocab, dim, layers, layers, heads, heads, ffn, ffn, positions)
    state = ours.state_dict()
    tied = ["model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
            "lm_head.weight"]
    assert all(key in state for key in tied + ["final_logits_bias"])
    assert len({state[key].data_ptr() for key in tied}) == 1  # one table
    assert len([p for p in ours.parameters() if p.shape == state["lm_head.weight"].shape]) == 1
    assert state["model.encoder.embed_positions.weight"].shape == (64 + 2, 32)  # offset 2
    assert "final_logits_bias" not in dict(ours.named_parameters())  # a buffer, as in the original


def test_real_base_tensors_load_by_name() -> None:
    """The released Florence-2-base language-model tensors we have fit our attribute paths and shapes."""
    path = asset_path("weights", "florence2-base-partial", "florence2_base_partial_weights.npz")
    real = {k.removeprefix("language_model."): torch.from_numpy(v)
            for k, v in np.load(path).items() if k.startswith("language_model.")}
    assert real, "no language-model tensors in the partial checkpoint"
    ours = Florence2LanguageModel(51289, 768, 6, 6, 12, 12, 3072, 3072, 1024)
    state = ours.state_dict()
    for key, tensor in real.items():
        assert key in state, key
        assert state[key].shape == tensor.shape, key
    # the position table really is used with offset 2: position 0 reads row 2
    ours.load_state_dict({**state, **real})
    rows = ours.model.encoder.embed_positions(0, 3)
    torch.testing.assert_close(rows, real["model.encoder.embed_positions.weight"][2:5], rtol=0, atol=0)


def test_training_step_reaches_every_parameter() -> None:
    """Train mode (dropout on): one loss, gradients in every parameter; the tied table gets both the
    input-embedding and the output-projection gradient, in one Parameter."""
    vocab, dim, layers, heads, ffn, positions = WIDTHS["tiny"]
    torch.manual_seed(0)
    ours = Florence2LanguageModel(vocab, dim, layers, layers, heads, heads, ffn, ffn, positions,
                                  dropout=0.1, attention_dropout=0.1, activation_dropout=0.1).train()
    embeds, mask, decoder_ids = inputs(vocab, dim)
    logits = ours(embeds, decoder_ids[:, :-1], mask)  # (2, 4, V)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), decoder_ids[:, 1:].flatten())
    loss.backward()
    missing = [name for name, p in ours.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert ours(embeds, decoder_ids, mask).sub(ours(embeds, decoder_ids, mask)).abs().max() > 0  # dropout is on
