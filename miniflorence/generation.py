"""Text generation for Florence-2: greedy search and beam search with the official defaults.

The original model hands generation to Hugging Face's `GenerationMixin.generate` (the remote code's
`Florence2ForConditionalGeneration.generate` encodes the image, then calls the language model's
`generate`); the official samples use `num_beams=3, max_new_tokens=1024, do_sample=False`, and the
checkpoint's config adds `no_repeat_ngram_size=3, early_stopping=True, forced_bos_token_id=0,
forced_eos_token_id=2, decoder_start_token_id=2`.
This file reproduces, token for token, what Hugging Face's `generate` does with those settings:
greedy or beam search, with the n-gram ban, forced BOS and forced EOS logits processors applied in
that order. Only deterministic decoding is implemented: `do_sample=True` is refused.

Beam search, as the vectorised implementation of current transformers runs it (for the official
settings its hypotheses, scores and stopping rule are those of the older BeamSearchScorer the
original remote code ran with):
- per sample, the 2 * num_beams best continuations over all beams are kept as candidates
  (2 = one more than the number of EOS ids, so that num_beams candidates survive even if the best
  num_beams all end);
- the best num_beams candidates that did not end continue; a candidate that ended (EOS, or the
  maximum length) joins the finished hypotheses only if it is among the best num_beams, with score
  sum(log p) / generated_length ** length_penalty;
- with early_stopping=True a sample is done once num_beams hypotheses are finished; the whole
  batch stops when every sample is done or the maximum length is reached;
- the result is the best finished hypothesis of each sample, padded with pad_token_id to the
  longest one.

Legend: B samples, K beams, N = B or B*K rows, S tokens so far (decoder start token included),
L = max_length = 1 + max_new_tokens, V vocabulary, C = 2K candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from miniflorence.language_model import Florence2LanguageModel

NEG = -1.0e9  # transformers' "very large negative" score for slots that must not be chosen


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings; the defaults are the official Florence-2 ones.

    Args:
        max_new_tokens: tokens generated after the decoder start token (the forced EOS included).
        num_beams: 1 = greedy search, more = beam search.
        do_sample: must stay False (sampling is not implemented).
        no_repeat_ngram_size: no n-gram of this size occurs twice in a sequence (0 = off).
        early_stopping: True = a sample is done once num_beams hypotheses have finished; False =
            transformers' heuristic (its third value, "never", is not implemented).
        length_penalty: finished scores are divided by generated_length ** length_penalty.
        forced_bos_token_id: token forced as the first generated token (None = off).
        forced_eos_token_id: token forced at the last position (None = off).
        decoder_start_token_id, eos_token_id, pad_token_id: special token ids.
    """

    max_new_tokens: int = 1024
    num_beams: int = 3
    do_sample: bool = False
    no_repeat_ngram_size: int = 3
    early_stopping: bool = True
    length_penalty: float = 1.0
    forced_bos_token_id: int | None = 0
    forced_eos_token_id: int | None = 2
    decoder_start_token_id: int = 2
    eos_token_id: int = 2
    pad_token_id: int = 1

    def __post_init__(self) -> None:
        if self.do_sample:
            raise ValueError("do_sample=True is not implemented: only greedy and beam search are")
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"need num_beams >= 1 and max_new_tokens >= 1, got {self.num_beams}, {self.max_new_tokens}"
            )


class EncoderDecoderModel(Protocol):
    """What `generate` needs from a model: `encode` and a `language_model` with `decode`."""

    language_model: Florence2LanguageModel

    def encode(self, pixel_values: Tensor, input_ids: Tensor,
               attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]: ...


def ban_repeated_ngrams(scores: Tensor, sequences: Tensor, n: int) -> Tensor:
    """Set to -inf every token that would complete an n-gram already present in its sequence.

    scores (N, V), sequences (N, S). The last n - 1 tokens are the prefix of the next n-gram; each
    earlier window whose first n - 1 tokens equal that prefix bans its last token. No host sync:
    windows that do not match scatter into a spare column V, which is dropped.
    """
    N, S = sequences.shape
    if n <= 0 or S < n:
        return scores
    V = scores.shape[1]
    windows = sequences.unfold(1, n, 1)  # (N, S - n + 1, n)
    prefix = sequences[:, S - n + 1:]  # (N, n - 1)
    matches = (windows[:, :, :-1] == prefix[:, None, :]).all(dim=-1)  # (N, S - n + 1)
    banned_tokens = torch.where(matches, windows[:, :, -1], V)  # (N, S - n + 1)
    banned = torch.zeros(N, V + 1, dtype=torch.bool, device=scores.device)  # (N, V + 1)
    banned.scatter_(1, banned_tokens, True)
    return scores.masked_fill(banned[:, :V], float("-inf"))


def force_token(scores: Tensor, token: int) -> Tensor:
    """Every token -inf except `token`, which gets 0."""
    forced = torch.full_like(scores, float("-inf"))
    forced[:, token] = 0.0
    return forced


def process_scores(scores: Tensor, sequences: Tensor, max_length: int, options: GenerationOptions) -> Tensor:
    """The logits processors, in transformers' order: n-gram ban, forced BOS, forced EOS.

    scores (N, V) for the token after `sequences` (N, S); S counts the decoder start token.
    """
    S = sequences.shape[1]
    scores = ban_repeated_ngrams(scores, sequences, options.no_repeat_ngram_size)
    if options.forced_bos_token_id is not None and S == 1:
        scores = force_token(scores, options.forced_bos_token_id)
    if options.forced_eos_token_id is not None and S == max_length - 1:
        scores = force_token(scores, options.forced_eos_token_id)
    return scores


@torch.inference_mode()  # no autograd bookkeeping on any tensor of the loop: ~6% of a bf16 step at batch 1
def greedy_search(language_model: Florence2LanguageModel, encoder_hidden_states: Tensor,
                  encoder_attention_mask: Tensor | None, options: GenerationOptions) -> Tensor:
    """Pick the highest-scoring token at every step -> (B, S) ids, finished rows padded.

    Every buffer is allocated before the loop (token ids (B, L), the static key/value cache); a
    step reads no value back from the device except the one "has every row ended?" test (and, when
    the float32 token table is screened, whether the screen decided: `token_choice.ScreenedArgmax`,
    the same choices as the argmax of the float32 logits with half of their bytes read).
    """
    B = encoder_hidden_states.shape[0]
    L = 1 + options.max_new_tokens  # max_length, the decoder start token included
    device = encoder_hidden_states.device
    sequences = torch.full((B, L), options.pad_token_id, dtype=torch.long, device=device)  # (B, L)
    sequences[:, 0] = options.decoder_start_token_id
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    cache = language_model.new_static_cache(encoder_hidden_states, L)
    screen = language_model.token_screen()
    for cur_len in range(1, L):  # cur_len tokens so far; this step writes token cur_len
        hidden = language_model.step(sequences[:, cur_len - 1:cur_len], encoder_attention_mask, cache)[:, -1]  # (B, D)

        def process(scores: Tensor, n: int = cur_len) -> Tensor:
            return process_scores(scores, sequences[:, :n], L, options)  # (B, V)

        if screen is None:
            best = process(language_model.logits(hidden).float()).argmax(dim=-1)  # (B,)
            decided = torch.ones((), dtype=torch.bool, device=device)
        else:
            best, decided = screen.screen(hidden, process)  # (B,), (): the choice is valid if decided
        next_tokens = torch.where(unfinished, best, options.pad_token_id)  # (B,)
        still_running = unfinished & (next_tokens != options.eos_token_id)
        state = int(still_running.any() * 2 + decided)  # the one host sync of a step: 2 = a row runs, 1 = decided
        if not state & 1:  # the screen left a doubt: this step takes the full float32 logits
            screen.fallback_steps += 1
            next_tokens = torch.where(unfinished, screen.exact(hidden, process), options.pad_token_id)
            still_running = unfinished & (next_tokens != options.eos_token_id)
            state = int(still_running.any() * 2 + 1)
        elif screen is not None:
            screen.screened_steps += 1
        sequences[:, cur_len] = next_tokens
        unfinished = still_running
        if not state & 2:
            break
    return sequences[:, : cur_len + 1]


def gather_beams(x: Tensor, index: Tensor) -> Tensor:
    """x (B, K, ...) and index (B, J) -> (B, J, ...): x[b, index[b, j]]."""
    index = index.view(*index.shape, *([1] * (x.dim() - 2)))  # (B, J, 1, ...)
    return torch.take_along_dim(x, index, dim=1)


@torch.inference_mode()
def beam_search(language_model: Florence2LanguageModel, encoder_hidden_states: Tensor,
                encoder_attention_mask: Tensor | None, options: GenerationOptions) -> Tensor:
    """Beam search exactly as Hugging Face's `generate` runs it -> (B, S) ids, the best hypothesis per sample."""
    B, K = encoder_hidden_states.shape[0], options.num_beams
    C = 2 * K  # candidates kept per step: (1 + number of EOS ids) * num_beams
    L = 1 + options.max_new_tokens  # max_length, the decoder start token included
    lp = options.length_penalty
    device = encoder_hidden_states.device
    # every beam of sample b reads the encoder states of sample b
    encoder_hidden_states = encoder_hidden_states.repeat_interleave(K, dim=0)  # (B*K, T, D)
    if encoder_attention_mask is not None:
        encoder_attention_mask = encoder_attention_mask.repeat_interleave(K, dim=0)  # (B*K, T)

    # running beams: static (B, K, L) token buffer filled with pad, scores = sum of log-probabilities;
    # only beam 0 starts alive, so that the first step does not pick the same token K times
    running = torch.full((B, K, L), options.pad_token_id, dtype=torch.long, device=device)
    running[:, :, 0] = options.decoder_start_token_id
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = NEG
    # finished hypotheses: K slots per sample, with their length-normalised scores and generated lengths
    finished = running.clone()
    finished_scores = torch.full((B, K), NEG, device=device)
    finished_lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)
    top_k_slots = torch.arange(C, device=device) < K  # (C,): only the K best candidates may finish
    batch_offset = torch.arange(B, device=device)[:, None] * K  # (B, 1): beam b of sample i is row i*K + b

    cache = language_model.new_static_cache(encoder_hidden_states, L)
    cur_len = 1
    while True:
        # a. scores of every next token for every running beam
        flat = running[:, :, :cur_len].reshape(B * K, cur_len)  # (B*K, S)
        hidden = language_model.step(flat[:, -1:], encoder_attention_mask, cache)[:, -1]  # (B*K, D)
        log_probs = F.log_softmax(language_model.logits(hidden).float(), dim=-1)  # (B*K, V)
        log_probs = process_scores(log_probs, flat, L, options)
        V = log_probs.shape[-1]
        total = log_probs.view(B, K, V) + running_scores[:, :, None]  # (B, K, V)

        # b. the C best continuations over all beams of a sample
        cand_scores, cand_index = total.view(B, K * V).topk(C, dim=1)  # (B, C)
        cand_beam, cand_token = cand_index // V, cand_index % V  # (B, C) each
        candidates = gather_beams(running, cand_beam)  # (B, C, L)
        candidates[:, :, cur_len] = cand_token
        ended = (cand_token == options.eos_token_id) | (cur_len + 1 >= L)  # (B, C)

        # c. the K best candidates that did not end continue
        alive_scores = cand_scores + ended.float() * NEG  # (B, C)
        keep = alive_scores.topk(K, dim=1).indices  # (B, K)
        running = gather_beams(candidates, keep)  # (B, K, L)
        running_scores = gather_beams(alive_scores, keep)  # (B, K)
        source_rows = gather_beams(cand_beam, keep) + batch_offset  # (B, K): cache row each beam came from

        # d. candidates that ended among the K best join the finished hypotheses if they beat them
        just_finished = ended & top_k_slots  # (B, C)
        new_scores = cand_scores / cur_len**lp  # cur_len tokens generated (the start token not counted)
        samples_full = is_finished.all(dim=-1, keepdim=True) & options.early_stopping  # (B, 1)
        new_scores = new_scores + samples_full.float() * NEG
        new_scores = new_scores + (~can_improve).float() * NEG
        new_scores = new_scores + (~just_finished).float() * NEG
        merged_scores = torch.cat([finished_scores, new_scores], dim=1)  # (B, K + C)
        best = merged_scores.topk(K, dim=1).indices  # (B, K)
        finished = gather_beams(torch.cat([finished, candidates], dim=1), best)  # (B, K, L)
        finished_scores = gather_beams(merged_scores, best)
        new_lengths = torch.full((B, C), cur_len, dtype=torch.long, device=device)
        finished_lengths = gather_beams(torch.cat([finished_lengths, new_lengths], dim=1), best)
        is_finished = gather_beams(torch.cat([is_finished, just_finished], dim=1), best)

        # e. next step: move the cached keys/values with their beams, then test whether to stop
        cache.reorder(source_rows.flatten(), cur_len)
        cur_len += 1
        # transformers' heuristic (decisive with early_stopping=False): once all K hypotheses of a
        # sample are finished, it stops if its best running beam, normalised at the current length,
        # cannot beat the worst of them
        best_running = running_scores[:, :1] / (cur_len - 1) ** lp  # (B, 1)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, NEG)  # (B, K)
        can_improve &= (best_running > worst_finished).any(dim=-1, keepdim=True)
        all_done = is_finished.all() & options.early_stopping
        if bool(~can_improve.any() | all_done | ended.all()):  # the one host sync of a step
            break

    # the best hypothesis of each sample, cut to the longest of them (1 = the decoder start token)
    return finished[:, 0, : 1 + int(finished_lengths[:, 0].max())]


@torch.no_grad()
def generate(model: EncoderDecoderModel, pixel_values: Tensor, input_ids: Tensor,
             attention_mask: Tensor | None = None, options: GenerationOptions = GenerationOptions()) -> Tensor:
    """Encode image + prompt once, then decode -> (B, S) token ids starting with the decoder start token.

    Args:
        model: a Florence-2 model (`encode` and `language_model.decode` are all that is used).
        pixel_values: (B, 3, H, W) preprocessed images.
        input_ids: (B, P) prompt ids `<s> ... </s>`, padded with pad_token_id in a batch.
        attention_mask: (B, P) 1 = token, 0 = padding; None = attend to everything.
        options: decoding settings (official defaults).
    """
    encoder_hidden_states, encoder_attention_mask = model.encode(pixel_values, input_ids, attention_mask)
    search = greedy_search if options.num_beams == 1 else beam_search
    return search(model.language_model, encoder_hidden_states, encoder_attention_mask, options)
