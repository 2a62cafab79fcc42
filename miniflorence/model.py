"""Florence-2: DaViT image tokens + prompt tokens -> BART-style encoder-decoder -> text.

Paper: Xiao et al., "Florence-2: Advancing a Unified Representation for a Variety of Vision
Tasks" (2023), §4.1 (Fig. 2): the image encoder's visual token embeddings, projected to the
language width, are concatenated with the prompt's text embeddings and read by a standard
transformer encoder-decoder that writes the answer (captions, `<loc_*>` boxes, polygons, ...).
Mirrors `Florence2ForConditionalGeneration` of the original remote code `modeling_florence2.py`
(microsoft/Florence-2-base): `_encode_image`, `_merge_input_ids_with_image_features`, `forward`
and `generate`. Attribute paths equal the original checkpoint keys.

Legend: B batch, I image tokens (577 at 768x768), T prompt tokens, t decoder tokens,
C DaViT width, D language width, V vocabulary.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from miniflorence.config import Florence2Config
from miniflorence.davit import DaViT
from miniflorence.generation import GenerationOptions, generate
from miniflorence.language_model import Florence2LanguageModel
from miniflorence.projector import (
    CosineTemporalEmbedding,
    LearnedPositionEmbedding2D,
    project_image_features,
)
from minivision.checkpoint import CheckpointError, expand_tied, load_strict, read_converted
from minivision.passes import in_passes

# The token table is one Parameter used under four names; converted files store it once, under SHARED_KEY
# (checkpoint_format.merge_tied / expand_tied).
SHARED_KEY = "language_model.model.shared.weight"
TIED_KEYS = (
    "language_model.model.encoder.embed_tokens.weight",
    "language_model.model.decoder.embed_tokens.weight",
    "language_model.lm_head.weight",
)


class Florence2(nn.Module):
    """The whole model. Stages a reader can call on their own: `encode_image`, `encode`, then
    `language_model.decode` (what `forward` and `generate` do).

    Args:
        config: every size; see `Florence2Config`. Only this class reads it.
    """

    def __init__(self, config: Florence2Config) -> None:
        super().__init__()
        c = config
        self.config = config
        self.vision_tower = DaViT(
            dims=c.dims, depths=c.depths, heads=c.heads, channel_groups=c.channel_groups,
            window_size=c.window_size, patch_sizes=c.patch_sizes, patch_strides=c.patch_strides,
            patch_paddings=c.patch_paddings, patch_prenorm=c.patch_prenorm, mlp_ratio=c.mlp_ratio,
            drop_path_rate=c.drop_path_rate, eps=c.layer_norm_eps, use_sdpa=c.use_sdpa,
        )
        self.image_projection = nn.Parameter(torch.empty(c.image_dim, c.projection_dim))  # (C, D), used as x @ W
        nn.init.trunc_normal_(self.image_projection, std=0.02)
        self.image_proj_norm = nn.LayerNorm(c.projection_dim, eps=c.layer_norm_eps)
        self.image_pos_embed = LearnedPositionEmbedding2D(c.image_dim, c.image_pos_embed_size)
        self.visual_temporal_embed = CosineTemporalEmbedding(c.image_dim, c.max_temporal_embeddings)
        self.language_model = Florence2LanguageModel(
            vocab_size=c.vocab_size, d_model=c.d_model, encoder_layers=c.encoder_layers,
            decoder_layers=c.decoder_layers, encoder_heads=c.encoder_heads, decoder_heads=c.decoder_heads,
            encoder_ffn_dim=c.encoder_ffn_dim, decoder_ffn_dim=c.decoder_ffn_dim,
            max_position_embeddings=c.max_position_embeddings, pad_token_id=c.pad_token_id,
            layer_norm_eps=c.layer_norm_eps, dropout=c.dropout, attention_dropout=c.attention_dropout,
            activation_dropout=c.activation_dropout, use_sdpa=c.use_sdpa,
        )

    def to_dtype(self, dtype: torch.dtype) -> Florence2:
        """Cast every floating-point weight to `dtype` (e.g. torch.bfloat16), in place, except the
        two that make the logits: the token table (tied to the output projection) and
        `final_logits_bias` stay float32. Greedy and beam search compare logits, and bf16 keeps only
        about 3 significant digits of them: in bf16, near-equal logits tie and the search takes
        another path. Elsewhere the kernels keep what must stay float32 in float32 (LayerNorm
        statistics, the attention softmax; the plain-math attention casts to float32 itself).
        Returns the model.
        """
        self.to(dtype)
        lm = self.language_model
        lm.model.shared.float()  # one Parameter: the encoder's, the decoder's and lm_head's table
        lm.final_logits_bias.data = lm.final_logits_bias.float()
        return self

    def compile_hot_paths(self, **options: bool | str) -> Florence2:
        """`torch.compile` the vision tower, in place: inference only; `options` go to inductor (see
        `torch._inductor.config`). Returns the model. It is compiled for static shapes (one graph per
        image size; the processor gives every image the same size): inductor's dynamic shapes fail on
        DaViT's window padding arithmetic (torch 2.13: "Invalid ranges [0:-1]").

        The decoding step is not compiled: it is bound by the bytes of its weights, which a compiled
        graph reads just as the eager kernels do, and compiled it was measured slower than eager in
        both precisions (issue 20: 26.3 vs 28.3 tokens/s fp32, 37.5 vs 39.3 bf16, base, 2 threads).
        """
        self.vision_tower.compile(dynamic=False, options=options or None)
        return self

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels (H, W multiples of 32) -> image tokens (B, 1 + HW/1024, D).

        The pixels are cast to the model's dtype, so float32 processor output feeds a bf16 model.
        The vision tower takes the images one at a time: its matmuls have thousands of rows per image
        already (`minivision.passes`: the same numbers, arrays the allocator reuses).
        """
        pixel_values = pixel_values.to(self.image_projection.dtype)
        grid = in_passes(self.vision_tower, pixel_values, 1)  # (B, H/32, W/32, C)
        return project_image_features(grid, self.image_pos_embed, self.visual_temporal_embed,
                                      self.image_projection, self.image_proj_norm)  # (B, I, D)

    def encode(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the language encoder over [image tokens, prompt tokens].

        Args:
            pixel_values: (B, 3, H, W) normalised images.
            input_ids: (B, T) prompt ids `<s> ... </s>` (no image placeholders: the I image
                tokens are prepended here), right-padded with pad_token_id in a batch.
            attention_mask: (B, T) 1 = prompt token, 0 = padding. None reproduces the original
                exactly: it attends to every position, padding included (the original builds an
                all-ones mask and so ignores padding - a known bug that changes batched results).
                When given, padded prompt tokens are masked out of the encoder's self-attention
                and of the decoder's cross-attention; image tokens are always attended.

        Returns:
            encoder_hidden_states (B, I + T, D) and encoder_attention_mask (B, I + T), or None
            (= attend to all) when `attention_mask` is None.
        """
        image_tokens = self.encode_image(pixel_values)  # (B, I, D)
        prompt = self.language_model.embed_tokens(input_ids)  # (B, T, D)
        inputs_embeds = torch.cat([image_tokens, prompt.to(image_tokens.dtype)], dim=1)  # (B, I + T, D)
        mask = None
        if attention_mask is not None:
            image_mask = attention_mask.new_ones(image_tokens.shape[:2])  # (B, I)
            mask = torch.cat([image_mask, attention_mask], dim=1)  # (B, I + T)
        return self.language_model.encode(inputs_embeds, mask), mask

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced pass -> logits (B, t, V) for every decoder position.

        Args:
            pixel_values, input_ids, attention_mask: as in `encode`.
            decoder_input_ids: (B, t) decoder inputs, starting with decoder_start_token_id (2).
        """
        encoder_hidden_states, encoder_mask = self.encode(pixel_values, input_ids, attention_mask)
        logits, _ = self.language_model.decode(decoder_input_ids, encoder_hidden_states, encoder_mask)
        return logits  # (B, t, V)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 1024,
        num_beams: int = 3,
        no_repeat_ngram_size: int = 3,
        early_stopping: bool = True,
        length_penalty: float = 1.0,
    ) -> torch.Tensor:
        """Greedy (num_beams=1) or beam search with the official defaults -> (B, S) token ids that
        start with the decoder start token, like the official `generate`.

        Args:
            pixel_values, input_ids, attention_mask: as in `encode`; moved to the model's device
                (and the pixels to its dtype), so processor output can be passed as it is.
            max_new_tokens, num_beams, no_repeat_ngram_size, early_stopping, length_penalty:
                decoding settings (see `miniflorence.generation.GenerationOptions`); forced
                BOS/EOS and the special ids come from the config.
        """
        device = self.image_projection.device
        pixel_values, input_ids = pixel_values.to(device), input_ids.to(device)
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        check_generate_inputs(self, pixel_values, input_ids, attention_mask, max_new_tokens, num_beams,
                              no_repeat_ngram_size)
        c = self.config
        options = GenerationOptions(
            max_new_tokens=max_new_tokens, num_beams=num_beams, no_repeat_ngram_size=no_repeat_ngram_size,
            early_stopping=early_stopping, length_penalty=length_penalty,
            forced_bos_token_id=c.bos_token_id, forced_eos_token_id=c.eos_token_id,
            decoder_start_token_id=c.decoder_start_token_id, eos_token_id=c.eos_token_id,
            pad_token_id=c.pad_token_id,
        )
        return generate(self, pixel_values, input_ids, attention_mask, options)


def image_grid(config: Florence2Config, height: int, width: int) -> tuple[int, int]:
    """The (rows, columns) of the last DaViT stage for an input of height x width pixels."""
    for k, stride, pad in zip(config.patch_sizes, config.patch_strides, config.patch_paddings):
        height, width = (height + 2 * pad - k) // stride + 1, (width + 2 * pad - k) // stride + 1  # conv output size
    return height, width


def check_generate_inputs(
    model: Florence2,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    num_beams: int,
    no_repeat_ngram_size: int,
) -> None:
    """Refuse, with a ValueError naming the argument, inputs that `generate` would turn into an
    IndexError deep inside the model or, worse, into a silently wrong answer."""
    c = model.config
    device = model.image_projection.device
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values must be a (B, 3, H, W) tensor (Processor output), got {got}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (B, T) tensor of prompt ids, T >= 1, got {got}")
    B, _, H, W = pixel_values.shape
    if B < 1 or input_ids.shape[0] != B:
        raise ValueError(f"pixel_values holds {B} images but input_ids {input_ids.shape[0]} prompts")
    for name, x in (("pixel_values", pixel_values), ("input_ids", input_ids), ("attention_mask", attention_mask)):
        if x is not None and x.device != device:
            raise ValueError(
                f"{name} is on {x.device}, the model on {device}: move the inputs with .to({str(device)!r})"
            )
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be floats (Processor output), got {pixel_values.dtype}")
    if not bool(torch.isfinite(pixel_values).all()):
        raise ValueError("pixel_values holds NaN or inf")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= c.vocab_size:
        raise ValueError(f"input_ids must lie in 0..{c.vocab_size - 1} (the model's vocabulary), got {low}..{high}: "
                         "is the tokenizer the one this model was trained with?")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"input_ids {tuple(input_ids.shape)}: they must match")
        zeros_and_ones = bool(((attention_mask == 0) | (attention_mask == 1)).all())
        if not zeros_and_ones or not bool(attention_mask.bool().any(1).all()):
            raise ValueError("attention_mask must hold 0/1 with at least one 1 per row (1 = prompt token, 0 = padding)")
    rows, columns = image_grid(c, H, W)
    if rows < 1 or columns < 1 or max(rows, columns) > c.image_pos_embed_size:
        raise ValueError(f"pixel_values of {H}x{W} give a {rows}x{columns} feature grid; the model supports 1 to "
                         f"{c.image_pos_embed_size} per side (images are resized to {c.image_size} by the Processor)")
    image_tokens = 1 + rows * columns
    if image_tokens + input_ids.shape[1] > c.max_position_embeddings:
        raise ValueError(f"the prompt has {input_ids.shape[1]} tokens; with {image_tokens} image tokens the encoder "
                         f"reads at most {c.max_position_embeddings}, so at most "
                         f"{c.max_position_embeddings - image_tokens} prompt tokens fit")
    for name, value, least in (("max_new_tokens", max_new_tokens, 1), ("num_beams", num_beams, 1),
                               ("no_repeat_ngram_size", no_repeat_ngram_size, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if max_new_tokens > c.max_position_embeddings:
        raise ValueError(f"max_new_tokens must be at most {c.max_position_embeddings} (the decoder's position "
                         f"table), got {max_new_tokens}")


def load_florence2(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    use_sdpa: bool | None = None,
) -> Florence2:
    """The model a converted `.safetensors` file describes, strictly loaded, in eval mode.

    Args:
        path: a file written by `python -m weights_convert florence2 SRC DST`.
        device: where the model goes.
        dtype: the dtype of its floating-point weights (the file's values, cast). torch.bfloat16
            keeps the token table and the logits bias in float32 (see `Florence2.to_dtype`).
        compile: `torch.compile` the vision tower (`Florence2.compile_hot_paths`);
            the first image of each size and the first generation pay the compilation.
        use_sdpa: override the attention implementation stored in the file's config.
    """
    config_dict, tensors = read_converted(path, "florence2")
    try:
        config = Florence2Config.from_dict(config_dict)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its config does not describe a Florence-2 model: {e}") from e
    if use_sdpa is not None:
        config = config.replace(use_sdpa=use_sdpa)
    model = florence2_from_tensors(config, tensors, device=device, dtype=dtype, what=str(path))
    return model.compile_hot_paths() if compile else model


def florence2_from_tensors(
    config: Florence2Config,
    tensors: dict[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    what: str = "checkpoint",
) -> Florence2:
    """A `Florence2` whose weights are `tensors` themselves (token table once, under SHARED_KEY), in eval mode.

    Built on the meta device (no random initialisation, one copy of the weights); the token table
    is handed to all four of its names, which stay one Parameter. This is the one place that
    decides a loaded model's device and dtype.
    """
    with torch.device("meta"):
        model = Florence2(config)
    load_strict(model, expand_tied(tensors, SHARED_KEY, TIED_KEYS, what), what)
    return model.to(device).to_dtype(dtype).eval()
