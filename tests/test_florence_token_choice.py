"""The screened greedy choice (miniflorence/token_choice.py) against the argmax of the full float32
logits, and a batch-8 bf16 captioning job against fp32.

The screen reads a bf16 copy of the token table and recomputes in float32 only the tokens its error
bound cannot rule out; its choices must be those of the full float32 logits, always: on seeded
models, on hidden states built to put two tokens within a hair of each other, with the logits
processors (n-gram ban, forced BOS/EOS), and through whole greedy generations in fp32 and bf16.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.paths import asset_path
from official import seeded_florence2_fill

from miniflorence import Florence2, Processor, Tokenizer, read_image, tiny_config
from miniflorence.generation import GenerationOptions, process_scores
from miniflorence.token_choice import ScreenedArgmax
from miniflorence.tokenizer import DEFAULT_TOKENIZER_DIR

PAD = 1
PHOTOS = [("sam", "dog.jpg"), ("sam", "dogs.jpg"), ("sam", "groceries.jpg"), ("sam", "truck.jpg"),
          ("skimage", "camera.png"), ("skimage", "chelsea.png"), ("skimage", "coffee.png"), ("skimage", "horse.png")]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded_model(seed: int, **changes) -> Florence2:
    model = Florence2(tiny_config(**changes))
    model.load_state_dict(seeded_florence2_fill(model.state_dict(), seed))
    return model.eval()


@pytest.fixture(scope="module")
def tiny() -> Florence2:
    return seeded_model(3, image_size=96)


def full_argmax(screen: ScreenedArgmax, hidden: torch.Tensor, process=lambda s: s) -> torch.Tensor:
    return process(hidden.float() @ screen.table.T + screen.bias).argmax(dim=1)


@pytest.mark.parametrize("rows", [64, 8, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_screen_picks_the_float32_argmax(tiny: Florence2, dtype: torch.dtype, rows: int) -> None:
    """Seeded tiny table (the real vocabulary), 512 hidden states of a LayerNorm'd scale, fp32 or bf16,
    screened 64, 8 or 1 rows at a time (8 rows take the table as the left operand, 1 the
    matrix-vector kernel)."""
    lm = tiny.language_model
    screen = ScreenedArgmax(lm.lm_head.weight.detach(), lm.final_logits_bias)
    hidden = torch.randn(512, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        got = torch.cat([screen(h, lambda s: s) for h in hidden.split(rows)])
    assert torch.equal(got, full_argmax(screen, hidden))
    assert screen.screened_steps > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_radius_bounds_every_tokens_error(tiny: Florence2, dtype: torch.dtype) -> None:
    """The radius the screen decides with, c + 2^-7 |l~| (file header), bounds |float32 logit - screened
    logit| of every token, for hidden states of a LayerNorm'd scale and 30x larger; and the screen
    decides on such states (its test is not so loose that every step falls back)."""
    from miniflorence.token_choice import BF16_RESULT_ROUNDING, TINY

    lm = tiny.language_model
    screen = ScreenedArgmax(lm.lm_head.weight.detach(), lm.final_logits_bias)
    g = torch.Generator().manual_seed(7)
    for scale in (1.0, 30.0):
        hidden = (scale * torch.randn(64, 32, generator=g)).to(dtype)
        with torch.no_grad():
            screened = screen.screen_logits(hidden)  # (64, V)
            exact = hidden.double() @ screen.table.double().T + screen.bias.double()  # (64, V)
            twice_x_bf16_norm, twice_x_error = screen.bound_terms(hidden)
            c = twice_x_bf16_norm * screen.max_row_weight_of_x + twice_x_error * screen.max_row_norm + TINY
            radius = c + 2 * BF16_RESULT_ROUNDING * screened.abs()
            assert ((exact - screened.double()).abs() <= radius.double()).all()
            _, decided = screen.screen(hidden, lambda s: s)
        assert bool(decided)


def test_near_ties_are_resolved_in_float32() -> None:
    """Pairs of rows that differ below bf16's resolution: the bf16 logits tie, the float32 ones do not.
    The screen must pick the float32 winner; with K = 1 candidate it cannot decide and falls back."""
    g = torch.Generator().manual_seed(1)
    V, D = 400, 64
    table = torch.randn(V, D, generator=g) / D**0.5
    table[1::2] = table[0::2] + 1e-4 * torch.randn(V // 2, D, generator=g) / D**0.5  # twins
    bias = torch.zeros(V)
    hidden = torch.randn(256, D, generator=g)
    hidden[:128] = 4.0 * table[0::2][:128] / table[0::2][:128].norm(dim=1, keepdim=True)  # aim at a twin pair
    expected = full_argmax(ScreenedArgmax(table, bias), hidden)
    for candidates in (32, 1):
        screen = ScreenedArgmax(table, bias, candidates=candidates)
        got = torch.stack([screen(h[None], lambda s: s)[0] for h in hidden])
        assert torch.equal(got, expected)
        assert (screen.fallback_steps > 0) == (candidates == 1), (screen.screened_steps, screen.fallback_steps)
    # the bf16 logits alone would have chosen otherwise for some: the float32 re-check did the work
    bf16_choice = (hidden.bfloat16() @ table.bfloat16().T).float().argmax(dim=1)
    assert not torch.equal(bf16_choice, expected)


def test_exact_ties_go_to_the_lowest_id() -> None:
    table = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    table[30] = table[7]  # identical rows: identical logits
    hidden = table[7:8] * 3
    screen = ScreenedArgmax(table, torch.zeros(50))
    assert int(screen(hidden, lambda s: s)[0]) == int(full_argmax(screen, hidden)[0]) == 7


def test_screen_applies_the_logits_processors(tiny: Florence2) -> None:
    """n-gram ban, forced BOS (first step) and forced EOS (last step): the choice of the processed
    float32 logits, also when the ban removes the token the raw logits would pick."""
    lm = tiny.language_model
    screen = ScreenedArgmax(lm.lm_head.weight.detach(), lm.final_logits_bias)
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(8, 32, generator=g)
    favourite = full_argmax(screen, hidden)  # (8,): ban each row's favourite by repeating a 3-gram ending in it
    sequences = torch.randint(3, 1000, (8, 6), generator=g)
    sequences[:, 2] = favourite  # a b fav x a b: the 3-gram (a, b, fav) exists, so fav is banned next
    sequences[:, 4], sequences[:, 5] = sequences[:, 0], sequences[:, 1]
    options = GenerationOptions(max_new_tokens=20, num_beams=1)
    for length, L in ((6, 21), (1, 21), (6, 7)):  # plain + ban, forced BOS, forced EOS
        def process(scores, n=length, L=L):
            return process_scores(scores, sequences[:, :n], L, options)
        expected = full_argmax(screen, hidden, process)
        assert torch.equal(screen(hidden, process), expected)
        if length == 6 and L == 21:
            assert not (expected == favourite).any()  # the ban did change every choice
    assert (expected == options.forced_eos_token_id).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_generation_with_and_without_the_screen(tiny: Florence2, dtype: torch.dtype) -> None:
    """Whole greedy generations (batch of 4, 24 tokens): ids identical with the screen on and off."""
    model = copy.deepcopy(tiny).to_dtype(dtype)
    g = torch.Generator().manual_seed(6)
    pixel_values = torch.randn(4, 3, 96, 96, generator=g)
    prompt = torch.randint(3, 50265, (4, 7), generator=g)
    prompt[:, 0], prompt[:, -1] = 0, 2
    with torch.no_grad():
        screened = model.generate(pixel_values, prompt, max_new_tokens=24, num_beams=1)
        assert model.language_model.token_screen().screened_steps > 0
        model.language_model.screen_tokens = False
        plain = model.generate(pixel_values, prompt, max_new_tokens=24, num_beams=1)
    assert torch.equal(screened, plain), (screened.tolist(), plain.tolist())


def test_bf16_batch8_job_agrees_with_fp32() -> None:
    """The captioning job at batch 8: 8 different photos, `<CAPTION>`, greedy, read -> preprocess ->
    generate -> decode -> post-process; bf16 ids equal fp32 ids at >= 90% of positions (DESIGN.md's
    fast-path target), and every caption post-processes."""
    model = seeded_model(5, image_size=96)
    fast = copy.deepcopy(model).to_dtype(torch.bfloat16)
    processor = Processor(Tokenizer.from_dir(DEFAULT_TOKENIZER_DIR), image_size=96)
    images = [read_image(asset_path("images", *photo)) for photo in PHOTOS]
    inputs = processor("<CAPTION>", images)
    assert inputs["pixel_values"].shape[0] == 8
    with torch.no_grad():
        exact = model.generate(**inputs, max_new_tokens=32, num_beams=1)
        got = fast.generate(**inputs, max_new_tokens=32, num_beams=1)
    n = min(exact.shape[1], got.shape[1])
    assert (exact[:, :n] == got[:, :n]).float().mean() >= 0.9
    for row, image in zip(got, images, strict=True):
        result = processor.post_process("<CAPTION>", row, image.size)
        assert isinstance(result["<CAPTION>"], str)
