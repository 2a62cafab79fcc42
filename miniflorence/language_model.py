"""Florence-2's language model: a BART encoder-decoder (post-LayerNorm) with a key/value cache.

Florence-2 (Xiao et al., 2023, "Florence-2: Advancing a Unified Representation for a Variety of
Vision Tasks", section 3.2) feeds [image tokens; prompt tokens] to a standard transformer
encoder-decoder, initialised from BART (Lewis et al., 2019). This file mirrors the original remote
code `modeling_florence2.py` (Florence2LanguageForConditionalGeneration with its Florence2Encoder,
Florence2Decoder and Florence2Attention classes), which transformers' `models/bart/modeling_bart.py`
reproduces. Facts that decide parity:
- post-LN layers: x = LN(x + sublayer(x)); GELU (exact, erf) in the feed-forward network;
- no embedding scaling; learned positions looked up at position + 2 (the table has
  max_position_embeddings + 2 rows, a fairseq heritage); a LayerNorm (`layernorm_embedding`) on
  token + position embeddings in both the encoder and the decoder;
- one token table shared by the encoder, the decoder and the output projection (`lm_head`), and a
  persistent buffer `final_logits_bias` (1, V) added to the logits (registered with
  `register_buffer` in the original, so it is in the checkpoint's state dict).
Attribute paths equal the original checkpoint's `language_model.*` keys.

Legend: B batch, T encoder tokens, t new decoder tokens, S decoder tokens seen so far (cache + new),
N key/value tokens, D model width, h heads, d head width (D = h * d), M feed-forward width,
V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POSITION_OFFSET = 2  # BART reserves the first two rows of its position table


def padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """(B, N) of 1 = token, 0 = padding -> boolean (B, 1, 1, N), True where attention is allowed."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, N)


def causal_mask(t: int, past: int, device: torch.device) -> Tensor | None:
    """New query i (at position past + i) may see keys 0 .. past + i: boolean (1, 1, t, past + t)."""
    if t == 1:
        return None  # a single new token may see everything before it
    query_pos = torch.arange(t, device=device)[:, None] + past  # (t, 1)
    key_pos = torch.arange(past + t, device=device)[None, :]  # (1, past + t)
    return (key_pos <= query_pos)[None, None]  # (1, 1, t, past + t)


class LearnedPositionalEmbedding(nn.Embedding):
    """Positions 0 .. max_positions - 1, stored at rows 2 .. max_positions + 1 (BART's offset)."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__(max_positions + POSITION_OFFSET, dim)

    def forward(self, start: int, length: int) -> Tensor:  # type: ignore[override]
        positions = torch.arange(start, start + length, device=self.weight.device)  # (length,)
        return super().forward(positions + POSITION_OFFSET)  # (length, D)


class Attention(nn.Module):
    """Multi-head attention, softmax(q k^T / sqrt(d)) v (Vaswani et al., 2017, eq. 1).

    The keys and values are computed by `keys_values` so that the decoder can cache them: its
    self-attention appends one step at a time, its cross-attention computes them once.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float, use_sdpa: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.use_sdpa = use_sdpa
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def split_heads(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))  # 2 x (B, h, N, d)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """x (B, t, D) queries; k, v (B, h, N, d); mask boolean, broadcastable to (B, h, t, N)."""
        B, t, D = x.shape
        q = self.split_heads(self.q_proj(x))  # (B, h, t, d)
        dropout = self.dropout if self.training else 0.0
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
        else:
            scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, t, N)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            weights = F.dropout(scores.softmax(dim=-1), p=dropout, training=self.training)
            out = weights @ v  # (B, h, t, d)
        out = out.transpose(1, 2).reshape(B, t, D)  # (B, t, h * d)
        return self.out_proj(out)


class EncoderLayer(nn.Module):
    """Post-LN transformer layer: x = LN(x + SelfAttn(x)); x = LN(x + FFN(x))."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float, dropout: float,
                 attention_dropout: float, activation_dropout: float, use_sdpa: bool) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads, attention_dropout, use_sdpa)
        self.self_attn_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = dropout
        self.activation_dropout = activation_dropout

    def feed_forward(self, x: Tensor) -> Tensor:
        """fc2(dropout(GELU(fc1(x)))), then dropout."""
        x = F.dropout(F.gelu(self.fc1(x)), p=self.activation_dropout, training=self.training)  # (B, T, M)
        return F.dropout(self.fc2(x), p=self.dropout, training=self.training)  # (B, T, D)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        k, v = self.self_attn.keys_values(x)
        attended = F.dropout(self.self_attn(x, k, v, mask), p=self.dropout, training=self.training)
        x = self.self_attn_layer_norm(x + attended)
        return self.final_layer_norm(x + self.feed_forward(x))


class DecoderLayer(EncoderLayer):
    """Post-LN decoder layer: causal self-attention, cross-attention to the encoder, feed-forward."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float, dropout: float,
                 attention_dropout: float, activation_dropout: float, use_sdpa: bool) -> None:
        super().__init__(dim, num_heads, ffn_dim, eps, dropout, attention_dropout, activation_dropout, use_sdpa)
        self.encoder_attn = Attention(dim, num_heads, attention_dropout, use_sdpa)
        self.encoder_attn_layer_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor, self_kv: tuple[Tensor, Tensor], self_mask: Tensor | None,  # type: ignore[override]
                cross_kv: tuple[Tensor, Tensor], cross_mask: Tensor | None) -> Tensor:
        """x (B, t, D); self_kv: keys/values of all S decoder tokens so far (this step's included)."""
        attended = F.dropout(self.self_attn(x, *self_kv, self_mask), p=self.dropout, training=self.training)
        x = self.self_attn_layer_norm(x + attended)
        attended = F.dropout(self.encoder_attn(x, *cross_kv, cross_mask), p=self.dropout, training=self.training)
        x = self.encoder_attn_layer_norm(x + attended)
        return self.final_layer_norm(x + self.feed_forward(x))


@dataclass
class KVCache:
    """Per decoder layer: self-attention keys/values (growing) and cross-attention keys/values (fixed).

    Each entry is (B, h, S, d) for self-attention and (B, h, T, d) for cross-attention.
    """

    self_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    cross_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @property
    def length(self) -> int:
        """How many decoder tokens are cached (the position of the next token)."""
        return self.self_kv[0][0].shape[2] if self.self_kv else 0

    def reorder(self, beam_index: Tensor) -> None:
        """Keep row beam_index[i] of the self-attention cache as row i (beam search).

        The cross-attention keys/values are left alone: beam search only moves rows between the beams
        of one sample, which share their encoder states (the original `_reorder_cache` does the same).
        """
        self.self_kv = [(k.index_select(0, beam_index), v.index_select(0, beam_index)) for k, v in self.self_kv]


class Encoder(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding, max_positions: int, layers: list[EncoderLayer],
                 eps: float, dropout: float) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens  # the shared table (used by the caller for the prompt)
        self.embed_positions = LearnedPositionalEmbedding(max_positions, embed_tokens.embedding_dim)
        self.layers = nn.ModuleList(layers)
        self.layernorm_embedding = nn.LayerNorm(embed_tokens.embedding_dim, eps=eps)
        self.dropout = dropout

    def forward(self, inputs_embeds: Tensor, attention_mask: Tensor | None) -> Tensor:
        B, T, D = inputs_embeds.shape
        x = inputs_embeds + self.embed_positions(0, T)  # (B, T, D) + (T, D)
        x = F.dropout(self.layernorm_embedding(x), p=self.dropout, training=self.training)
        mask = padding_mask(attention_mask)  # (B, 1, 1, T)
        for layer in self.layers:
            x = layer(x, mask)
        return x  # (B, T, D)


class Decoder(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding, max_positions: int, layers: list[DecoderLayer],
                 eps: float, dropout: float) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        self.embed_positions = LearnedPositionalEmbedding(max_positions, embed_tokens.embedding_dim)
        self.layers = nn.ModuleList(layers)
        self.layernorm_embedding = nn.LayerNorm(embed_tokens.embedding_dim, eps=eps)
        self.dropout = dropout

    def forward(self, input_ids: Tensor, encoder_hidden_states: Tensor | None, encoder_attention_mask: Tensor | None,
                cache: KVCache | None) -> tuple[Tensor, KVCache]:
        """input_ids (B, t) are the new tokens; their positions continue from the cache's length."""
        B, t = input_ids.shape
        if cache is None:  # first step: the cross-attention keys/values are computed once, here
            cache = KVCache(cross_kv=[layer.encoder_attn.keys_values(encoder_hidden_states) for layer in self.layers])
        past = cache.length
        x = self.embed_tokens(input_ids) + self.embed_positions(past, t)  # (B, t, D) + (t, D)
        x = F.dropout(self.layernorm_embedding(x), p=self.dropout, training=self.training)
        self_mask = causal_mask(t, past, x.device)  # (1, 1, t, past + t)
        cross_mask = padding_mask(encoder_attention_mask)  # (B, 1, 1, T)
        new_self_kv = []
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.keys_values(x)  # 2 x (B, h, t, d)
            if cache.self_kv:  # append to the cached ones (a zero-length cache works too, as in ONNX graphs)
                k = torch.cat([cache.self_kv[i][0], k], dim=2)  # (B, h, S, d)
                v = torch.cat([cache.self_kv[i][1], v], dim=2)  # (B, h, S, d)
            new_self_kv.append((k, v))
            x = layer(x, (k, v), self_mask, cache.cross_kv[i], cross_mask)
        cache.self_kv = new_self_kv
        return x, cache  # (B, t, D)


class EncoderDecoder(nn.Module):
    """The container the checkpoint calls `model`: the shared token table, the encoder, the decoder."""

    def __init__(self, shared: nn.Embedding, encoder: Encoder, decoder: Decoder) -> None:
        super().__init__()
        self.shared = shared
        self.encoder = encoder
        self.decoder = decoder


class Florence2LanguageModel(nn.Module):
    """BART-style encoder-decoder with a tied output projection.

    Args:
        vocab_size: rows of the token table (51289 for the released checkpoints).
        d_model: model width D.
        encoder_layers, decoder_layers: number of layers.
        encoder_heads, decoder_heads: attention heads.
        encoder_ffn_dim, decoder_ffn_dim: hidden width of the feed-forward networks.
        max_position_embeddings: longest sequence (the position table has 2 more rows).
        pad_token_id: padding id of the token table (its gradient is zero, as in the original).
        layer_norm_eps: epsilon of every LayerNorm (1e-5 in the original, torch's default).
        dropout, attention_dropout, activation_dropout: dropout rates (training only).
        use_sdpa: attention through F.scaled_dot_product_attention instead of the plain math.
    """

    def __init__(self, vocab_size: int, d_model: int, encoder_layers: int, decoder_layers: int,
                 encoder_heads: int, decoder_heads: int, encoder_ffn_dim: int, decoder_ffn_dim: int,
                 max_position_embeddings: int, pad_token_id: int = 1, layer_norm_eps: float = 1e-5,
                 dropout: float = 0.0, attention_dropout: float = 0.0, activation_dropout: float = 0.0,
                 use_sdpa: bool = True) -> None:
        super().__init__()
        shared = nn.Embedding(vocab_size, d_model, padding_idx=pad_token_id)
        rates = (dropout, attention_dropout, activation_dropout)
        encoder = Encoder(shared, max_position_embeddings, [
            EncoderLayer(d_model, encoder_heads, encoder_ffn_dim, layer_norm_eps, *rates, use_sdpa)
            for _ in range(encoder_layers)], layer_norm_eps, dropout)
        decoder = Decoder(shared, max_position_embeddings, [
            DecoderLayer(d_model, decoder_heads, decoder_ffn_dim, layer_norm_eps, *rates, use_sdpa)
            for _ in range(decoder_layers)], layer_norm_eps, dropout)
        self.model = EncoderDecoder(shared, encoder, decoder)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = shared.weight  # tied: one Parameter for input and output embeddings
        self.register_buffer("final_logits_bias", torch.zeros(1, vocab_size))  # persistent, as in the original

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L, D) embeddings (no scaling)."""
        return self.model.shared(input_ids)

    def encode(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T, D) embeddings, (B, T) mask of 1 = token / 0 = padding (None: attend to all) -> (B, T, D)."""
        return self.model.encoder(inputs_embeds, attention_mask)

    def decode(self, decoder_input_ids: Tensor, encoder_hidden_states: Tensor | None,
               encoder_attention_mask: Tensor | None = None, cache: KVCache | None = None) -> tuple[Tensor, KVCache]:
        """New decoder tokens (B, t) -> logits (B, t, V) and the cache extended by them.

        Without a cache the tokens start at position 0 and a new cache is made (cross-attention
        keys/values included); with one, `encoder_hidden_states` is not read again.
        """
        x, cache = self.model.decoder(decoder_input_ids, encoder_hidden_states, encoder_attention_mask, cache)
        return self.lm_head(x) + self.final_logits_bias, cache  # (B, t, V)

    def forward(self, inputs_embeds: Tensor, decoder_input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced pass: encoder embeddings (B, T, D), decoder ids (B, t) -> logits (B, t, V)."""
        encoder_hidden_states = self.encode(inputs_embeds, attention_mask)
        return self.decode(decoder_input_ids, encoder_hidden_states, attention_mask)[0]
