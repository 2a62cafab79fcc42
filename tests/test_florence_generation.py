"""Greedy and beam search against transformers' `generate` (installed version, 5.x): token ids identical.

Two levels:
- the language model alone, against transformers' BART `generate(inputs_embeds=...)` with the same
  seeded weights: many prompts, cheap, every option combination we support;
- the whole model, against transformers' native `Florence2ForConditionalGeneration.generate`
  (tiny config, and the base config at a reduced image size), converted with our converter.

Random weights rarely emit EOS, so an EOS bias is added on both sides (BART: `final_logits_bias`;
native Florence-2, which has no such bias: a constant feature of the last decoder LayerNorm, see
`steer_native`) so that early stopping and finished-beam handling are exercised.
"""

from __future__ import annotations

import pytest
import torch
from helpers.florence import hf_kwargs, image_prompts, native_pair, set_eos_bias
from helpers.paths import needs_reference
from test_florence_language_model import tiny_pair

from miniflorence.generation import GenerationOptions, ban_repeated_ngrams, beam_search, generate, greedy_search

EOS, PAD, START = 2, 1, 2


@pytest.fixture(scope="module")
def biased_pair():
    """Tiny BART + ours with the same seeded weights and an EOS bias in final_logits_bias."""
    reference, ours = tiny_pair(seed=7)
    with torch.no_grad():
        reference.final_logits_bias[0, EOS] = 0.15  # some rows end early, some run to the limit
        ours.final_logits_bias[0, EOS] = 0.15
    return reference, ours


def prompts(count: int, dim: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random encoder inputs: batches of 2 whose second row is padded (different prompt lengths)."""
    g = torch.Generator().manual_seed(123)
    out = []
    for i in range(count):
        length = 6 + i % 4
        embeds = torch.randn(2, length, dim, generator=g)
        mask = torch.ones(2, length, dtype=torch.long)
        mask[1, length - 1 - i % 3:] = 0
        out.append((embeds, mask))
    return out


# name: (options, number of prompt batches, whether both endings must occur)
OPTION_SETS = {
    "greedy": (GenerationOptions(max_new_tokens=30, num_beams=1), 6, True),
    "beam3": (GenerationOptions(max_new_tokens=30, num_beams=3), 6, True),
    "beam4_lp2_no_early_stop": (GenerationOptions(max_new_tokens=16, num_beams=4, length_penalty=2.0,
                                                  early_stopping=False), 2, False),
    "beam2_ngram2": (GenerationOptions(max_new_tokens=16, num_beams=2, no_repeat_ngram_size=2), 2, False),
}


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_language_model_generation_matches_transformers(biased_pair, name: str) -> None:
    reference, ours = biased_pair
    options, count, both_endings = OPTION_SETS[name]
    search = greedy_search if options.num_beams == 1 else beam_search
    lengths = []
    with torch.no_grad():
        for embeds, mask in prompts(count):
            expected = reference.generate(inputs_embeds=embeds, attention_mask=mask, **hf_kwargs(options))
            got = search(ours, ours.encode(embeds, mask), mask, options)
            assert torch.equal(got, expected), f"{got.tolist()} != {expected.tolist()}"
            # generated length of each row: up to and including its EOS
            for row in got.tolist():
                lengths.append(row[1:].index(EOS) + 1 if EOS in row[1:] else len(row) - 1)
    if both_endings:  # EOS before the limit (a batch row padded after it), and the forced EOS at the limit
        assert min(lengths) < options.max_new_tokens and max(lengths) == options.max_new_tokens, lengths


@pytest.mark.parametrize("num_beams", [1, 3])
def test_one_new_token_is_the_forced_eos(biased_pair, num_beams: int) -> None:
    """max_new_tokens=1: forced BOS and forced EOS both apply to the same step; EOS wins (applied last)."""
    reference, ours = biased_pair
    embeds, mask = prompts(1)[0]
    options = GenerationOptions(max_new_tokens=1, num_beams=num_beams)
    search = greedy_search if num_beams == 1 else beam_search
    with torch.no_grad():
        got = search(ours, ours.encode(embeds, mask), mask, options)
        expected = reference.generate(inputs_embeds=embeds, attention_mask=mask, **hf_kwargs(options))
    assert torch.equal(got, expected) and got.tolist() == [[START, EOS]] * 2


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ngram_ban_matches_transformers(n: int) -> None:
    logits_process = needs_reference("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(n)
    processor = logits_process.NoRepeatNGramLogitsProcessor(n)
    for length in (1, 2, 3, 5, 12):
        sequences = torch.randint(0, 5, (6, length), generator=g)  # a 5-token vocabulary repeats a lot
        scores = torch.randn(6, 7, generator=g)
        torch.testing.assert_close(ban_repeated_ngrams(scores, sequences, n), processor(sequences, scores.clone()),
                                   rtol=0, atol=0)


def test_sampling_is_refused() -> None:
    with pytest.raises(ValueError, match="do_sample"):
        GenerationOptions(do_sample=True)


class LanguageModelOnly(torch.nn.Module):
    """A stand-in for the full model: `encode` reads precomputed embeddings instead of an image."""

    def __init__(self, language_model: torch.nn.Module) -> None:
        super().__init__()
        self.language_model = language_model

    def encode(self, pixel_values, input_ids, attention_mask=None):
        embeds = torch.cat([pixel_values, self.language_model.embed_tokens(input_ids)], dim=1)  # (B, I + T, D)
        mask = None
        if attention_mask is not None:
            mask = torch.cat([attention_mask.new_ones(pixel_values.shape[:2]), attention_mask], dim=1)
        return self.language_model.encode(embeds, mask), mask


def test_generate_entry_point(biased_pair) -> None:
    """`generate(model, pixel_values, input_ids, attention_mask, options)` = encode, then search."""
    reference, ours = biased_pair
    g = torch.Generator().manual_seed(5)
    image = torch.randn(2, 4, 32, generator=g)  # stands for 4 image tokens
    input_ids = torch.tensor([[0, 17, 42, 99, 2], [0, 23, 2, PAD, PAD]])
    mask = (input_ids != PAD).long()
    options = GenerationOptions(max_new_tokens=16)
    got = generate(LanguageModelOnly(ours), image, input_ids, mask, options)
    with torch.no_grad():
        embeds = torch.cat([image, reference.get_input_embeddings()(input_ids)], dim=1)
        full_mask = torch.cat([torch.ones(2, 4, dtype=torch.long), mask], dim=1)
        expected = reference.generate(inputs_embeds=embeds, attention_mask=full_mask, **hf_kwargs(options))
    assert torch.equal(got, expected)


# --- the whole model against transformers' native Florence-2 -------------------------------------

NATIVE_EOS_BIAS = {"no bias": 0.0, "EOS bias": 3.0}  # tiny: rows run to the limit / end at various steps


def compare_with_native(native, ours, pixel_values, prompt, options, with_mask: bool = True) -> torch.Tensor:
    """Our `generate` and the native one on the same inputs; asserts identical ids, returns ours."""
    from helpers.florence import native_input_ids

    mask = (prompt != PAD).long() if with_mask else None
    got = generate(ours, pixel_values, prompt, mask, options)
    image_tokens = ours.encode_image(pixel_values[:1]).shape[1]
    kwargs = {}
    if with_mask:
        kwargs["attention_mask"] = torch.cat([torch.ones(prompt.shape[0], image_tokens, dtype=torch.long), mask], 1)
    with torch.no_grad():
        expected = native.generate(input_ids=native_input_ids(prompt, image_tokens), pixel_values=pixel_values,
                                   **kwargs, **hf_kwargs(options))
    assert torch.equal(got, expected), f"{got.tolist()} != {expected.tolist()}"
    return got


@pytest.fixture(scope="module")
def tiny_native_pair():
    from miniflorence import tiny_config

    return native_pair(tiny_config(image_size=96), seed=3)


@pytest.mark.parametrize("bias_name", list(NATIVE_EOS_BIAS))
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_matches_native_florence2_tiny(tiny_native_pair, num_beams: int, bias_name: str) -> None:
    native, ours, base = tiny_native_pair
    set_eos_bias(native, ours, base, NATIVE_EOS_BIAS[bias_name])
    options = GenerationOptions(max_new_tokens=24, num_beams=num_beams)
    lengths = []
    for pixel_values, prompt in image_prompts(96, 3):
        got = compare_with_native(native, ours, pixel_values, prompt, options)
        lengths += [row[1:].index(EOS) + 1 for row in got.tolist()]
    # one prompt alone, unpadded, without a mask (the original's all-ones encoder mask)
    compare_with_native(native, ours, pixel_values[:1], prompt[:1], options, with_mask=False)
    if NATIVE_EOS_BIAS[bias_name] > 0:
        assert max(lengths) < options.max_new_tokens, lengths  # every row stopped at its own EOS
    else:
        assert min(lengths) == options.max_new_tokens, lengths  # every row got the forced EOS


@pytest.fixture(scope="module")
def base_native_pair():
    from miniflorence import CONFIGS

    return native_pair(CONFIGS["base"].replace(image_size=64), seed=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_matches_native_florence2_base(base_native_pair, num_beams: int) -> None:
    """The full-width base model (image 64x64: 5 image tokens) with few new tokens."""
    native, ours, _ = base_native_pair
    options = GenerationOptions(max_new_tokens=8, num_beams=num_beams)
    pixel_values, prompt = image_prompts(64, 1)[0]
    compare_with_native(native, ours, pixel_values, prompt, options)

