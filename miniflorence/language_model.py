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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from miniflorence.kv_cache import KeyValueCache, KVCache, StaticKVCache, causal_mask
from miniflorence.linear import Linear, StackedLinears
from miniflorence.token_choice import ScreenedArgmax

__all__ = ["Florence2LanguageModel", "KVCache", "KeyValueCache", "LayerConfig", "StaticKVCache", "causal_mask"]

POSITION_OFFSET = 2  # BART reserves the first two rows of its position table


def padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """(B, N) of 1 = token, 0 = padding -> boolean (B, 1, 1, N), True where attention is allowed."""
    if attention_mask is None:
        return None
    return attention_mask.bool()[:, None, None, :]  # (B, 1, 1, N)


class LearnedPositionalEmbedding(nn.Embedding):
    """Positions 0 .. max_positions - 1, stored at rows 2 .. max_positions + 1 (BART's offset)."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__(max_positions + POSITION_OFFSET, dim)

    def forward(self, start: int | Tensor, length: int) -> Tensor:  # type: ignore[override]
        """Rows of positions start .. start + length - 1; `start` may be a 0-dim tensor (a static cache's
        position, so that a compiled decoding step serves every step without a host sync)."""
        positions = torch.arange(length, device=self.weight.device) + start  # (length,)
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
        self.k_proj = Linear(dim, dim)
        self.v_proj = Linear(dim, dim)
        self.q_proj = Linear(dim, dim)
        self.out_proj = Linear(dim, dim)
        self.stacked = StackedLinears()  # q, k, v in one product when decoding one bf16 row (not a module)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (nn.Module's signature)
        self.stacked = StackedLinears()  # a cast or a move: the stacked copy is stale
        return super()._apply(fn, recurse)

    def split_heads(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))  # 2 x (B, h, N, d)

    def queries_keys_values(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of the same tokens (self-attention): 3 x (B, h, N, d). A decoding step at batch 1 in
        bf16 takes them from one product with the three weights stacked (`linear.StackedLinears`)."""
        layers = (self.q_proj, self.k_proj, self.v_proj)
        if not StackedLinears.applies(x, layers):
            return self.split_heads(self.q_proj(x)), *self.keys_values(x)
        q, k, v = self.stacked(x, layers)
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, q: Tensor | None = None) -> Tensor:
        """x (B, t, D) queries; k, v (B, h, N, d); mask boolean, broadcastable to (B, h, t, N); q (B, h, t, d)
        the projected queries when the caller has them already (else they are projected from x)."""
        B, t, D = x.shape
        if q is None:
            q = self.split_heads(self.q_proj(x))  # (B, h, t, d)
        dropout = self.dropout if self.training else 0.0
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
        else:
            scores = (q @ k.transpose(-2, -1)).float() * self.scale  # (B, h, t, N), softmax in float32 for bf16
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            weights = F.dropout(scores.softmax(dim=-1), p=dropout, training=self.training)
            out = weights.to(v.dtype) @ v  # (B, h, t, d)
        out = out.transpose(1, 2).reshape(B, t, D)  # (B, t, h * d)
        return self.out_proj(out)


@dataclass(frozen=True)
class LayerConfig:
    """The sizes and rates of one encoder or decoder layer.

    Args:
        dim: model width D.
        num_heads: attention heads h (D = h * d).
        ffn_dim: hidden width M of the feed-forward network.
        eps: LayerNorm epsilon.
        dropout: on each sublayer's output (training only).
        attention_dropout: on the attention weights.
        activation_dropout: after the feed-forward GELU.
        use_sdpa: attention through F.scaled_dot_product_attention instead of the plain math.
    """

    dim: int
    num_heads: int
    ffn_dim: int
    eps: float = 1e-5
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    use_sdpa: bool = True


class EncoderLayer(nn.Module):
    """Post-LN transformer layer: x = LN(x + SelfAttn(x)); x = LN(x + FFN(x))."""

    def __init__(self, config: LayerConfig) -> None:
        super().__init__()
        c = config
        self.self_attn = Attention(c.dim, c.num_heads, c.attention_dropout, c.use_sdpa)
        self.self_attn_layer_norm = nn.LayerNorm(c.dim, eps=c.eps)
        self.fc1 = Linear(c.dim, c.ffn_dim)
        self.fc2 = Linear(c.ffn_dim, c.dim)
        self.final_layer_norm = nn.LayerNorm(c.dim, eps=c.eps)
        self.dropout = c.dropout
        self.activation_dropout = c.activation_dropout

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

    def __init__(self, config: LayerConfig) -> None:
        super().__init__(config)
        self.encoder_attn = Attention(config.dim, config.num_heads, config.attention_dropout, config.use_sdpa)
        self.encoder_attn_layer_norm = nn.LayerNorm(config.dim, eps=config.eps)

    def forward(self, x: Tensor, self_kv: tuple[Tensor, Tensor], self_mask: Tensor | None,  # type: ignore[override]
                cross_kv: tuple[Tensor, Tensor], cross_mask: Tensor | None, queries: Tensor | None = None) -> Tensor:
        """x (B, t, D); self_kv: keys/values of all S decoder tokens so far (this step's included);
        queries: this step's self-attention queries (B, h, t, d) when the caller projected them."""
        attended = F.dropout(self.self_attn(x, *self_kv, self_mask, queries), p=self.dropout, training=self.training)
        x = self.self_attn_layer_norm(x + attended)
        attended = F.dropout(self.encoder_attn(x, *cross_kv, cross_mask), p=self.dropout, training=self.training)
        x = self.encoder_attn_layer_norm(x + attended)
        return self.final_layer_norm(x + self.feed_forward(x))


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
                cache: KeyValueCache | None) -> tuple[Tensor, KeyValueCache]:
        """input_ids (B, t) are the new tokens; their positions continue from the cache's length."""
        B, t = input_ids.shape
        if cache is None:  # first step: the cross-attention keys/values are computed once, here
            cache = KVCache(cross_kv=self.cross_keys_values(encoder_hidden_states))
        start = cache.start()  # position of the first new token
        positions = self.embed_positions(start, t)  # (t, D)
        x = self.embed_tokens(input_ids).to(positions.dtype) + positions  # (B, t, D), the table may be float32
        x = F.dropout(self.layernorm_embedding(x), p=self.dropout, training=self.training)
        self_mask = cache.self_attention_mask(start, t, x.device)  # (1, 1, t, S) or None
        cross_mask = padding_mask(encoder_attention_mask)  # (B, 1, 1, T)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.self_attn.queries_keys_values(x)  # 3 x (B, h, t, d)
            k, v = cache.append(i, k, v)  # 2 x (B, h, S, d), this step's included
            x = layer(x, (k, v), self_mask, cache.cross_kv[i], cross_mask, q)
        cache.advance(t)
        return x, cache  # (B, t, D)

    def cross_keys_values(self, encoder_hidden_states: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every layer's cross-attention keys/values of the encoder states: 2 x (B, h, T, d) per layer,
        each head's (T, d) block contiguous (computed once, read at every decoding step: as views of
        the (B, T, D) projections they are read 1.5-2 ms slower per step at batch 8)."""
        return [tuple(t.contiguous() for t in layer.encoder_attn.keys_values(encoder_hidden_states))
                for layer in self.layers]


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
        common = dict(dim=d_model, eps=layer_norm_eps, dropout=dropout, attention_dropout=attention_dropout,
                      activation_dropout=activation_dropout, use_sdpa=use_sdpa)
        encoder_layer = LayerConfig(num_heads=encoder_heads, ffn_dim=encoder_ffn_dim, **common)
        decoder_layer = LayerConfig(num_heads=decoder_heads, ffn_dim=decoder_ffn_dim, **common)
        encoder = Encoder(shared, max_position_embeddings, [EncoderLayer(encoder_layer) for _ in range(encoder_layers)],
                          layer_norm_eps, dropout)
        decoder = Decoder(shared, max_position_embeddings, [DecoderLayer(decoder_layer) for _ in range(decoder_layers)],
                          layer_norm_eps, dropout)
        self.model = EncoderDecoder(shared, encoder, decoder)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = shared.weight  # tied: one Parameter for input and output embeddings
        self.register_buffer("final_logits_bias", torch.zeros(1, vocab_size))  # persistent, as in the original
        # greedy search chooses tokens through `token_screen` (same choices as the float32 logits, half the bytes)
        self.screen_tokens = True

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L, D) embeddings (no scaling)."""
        return self.model.shared(input_ids)

    def encode(self, inputs_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T, D) embeddings, (B, T) mask of 1 = token / 0 = padding (None: attend to all) -> (B, T, D)."""
        return self.model.encoder(inputs_embeds, attention_mask)

    def decode(self, decoder_input_ids: Tensor, encoder_hidden_states: Tensor | None,
               encoder_attention_mask: Tensor | None = None,
               cache: KeyValueCache | None = None) -> tuple[Tensor, KeyValueCache]:
        """New decoder tokens (B, t) -> logits (B, t, V) and the cache extended by them.

        Without a cache the tokens start at position 0 and a new `KVCache` is made (cross-attention
        keys/values included); with one, `encoder_hidden_states` is not read again (it may be None).
        """
        x, cache = self.model.decoder(decoder_input_ids, encoder_hidden_states, encoder_attention_mask, cache)
        return self.logits(x), cache  # (B, t, V)

    def logits(self, hidden: Tensor) -> Tensor:
        """Final decoder states (..., D) -> logits (..., V), in the token table's dtype: float32 also
        in a bf16 model (`Florence2.to_dtype`)."""
        return self.lm_head(hidden.to(self.lm_head.weight.dtype)) + self.final_logits_bias

    def new_static_cache(self, encoder_hidden_states: Tensor, capacity: int) -> StaticKVCache:
        """A preallocated cache for generating up to `capacity` decoder tokens from these encoder states."""
        return StaticKVCache(self.model.decoder.cross_keys_values(encoder_hidden_states), capacity)

    def step(self, decoder_input_ids: Tensor, encoder_attention_mask: Tensor | None, cache: StaticKVCache) -> Tensor:
        """One generation step on a static cache: new tokens (B, t) -> final decoder states (B, t, D)
        (`logits` turns them into logits, `token_screen` into greedy choices); the cache advances by t."""
        return self.model.decoder(decoder_input_ids, None, encoder_attention_mask, cache)[0]

    def token_screen(self) -> ScreenedArgmax | None:
        """The greedy chooser that reads a bf16 copy of the float32 token table (`token_choice`), made on
        first use and remade when the table changes; None when the table is not float32 (a model cast
        whole to bf16 has only bf16 logits to choose from) or `screen_tokens` is False."""
        table = self.lm_head.weight
        if not self.screen_tokens or table.dtype != torch.float32:
            return None
        key = (table.data_ptr(), table._version, table.device, self.final_logits_bias.data_ptr(),
               self.final_logits_bias._version)
        if getattr(self, "_screen_key", None) != key:
            with torch.no_grad():
                self._screen = ScreenedArgmax(table.detach(), self.final_logits_bias.detach())
            self._screen_key = key
        return self._screen

    def forward(self, inputs_embeds: Tensor, decoder_input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Teacher-forced pass: encoder embeddings (B, T, D), decoder ids (B, t) -> logits (B, t, V)."""
        encoder_hidden_states = self.encode(inputs_embeds, attention_mask)
        return self.decode(decoder_input_ids, encoder_hidden_states, attention_mask)[0]
