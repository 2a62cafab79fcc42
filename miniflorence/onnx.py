"""Export Florence-2 to ONNX as three graphs, and generate text with them on onnxruntime.

The split follows the model's stages (Xiao et al., "Florence-2", 2023, §4.1, Fig. 2) and the usual
encoder-decoder export (image once, prompt once, then one decoder call per generated token, with
the keys/values of earlier tokens cached):

    python -m miniflorence.onnx florence2_base.safetensors florence_onnx/ [--image-size 768] [--opset 18] [--no-check]

writes into the output folder

    vision.onnx         pixel_values (B, 3, S, S) float32, processor output  (`Florence2.encode_image`)
                        -> image_features (B, I, D)       I = 1 + (S/32)^2 image tokens (577 at 768)
    encoder.onnx        image_features (B, I, D), input_ids (B, P) int64 prompt ids `<s> ... </s>`,
                        attention_mask (B, P) int64, 1 = prompt token, 0 = padding
                        -> encoder_hidden_states (B, T, D), encoder_attention_mask (B, T) int64 (T = I + P),
                           cross_key.{i}, cross_value.{i} (B, h, T, d) for every decoder layer i:
                           the cross-attention keys/values, computed once here
    decoder.onnx        one greedy/beam step: input_ids (B, 1) int64, encoder_attention_mask (B, T),
                        past_key.{i}, past_value.{i} (B, h, L, d) keys/values of the L tokens so far
                        (L = 0 at the first step: a zero-length cache), cross_key.{i}, cross_value.{i}
                        -> logits (B, 1, V), present_key.{i}, present_value.{i} (B, h, L + 1, d)
    export.json         the config, the export size and the graphs' interface.

Batch, prompt length, encoder length and cache length are dynamic. The image size is not:
DaViT's channel attention scales by N^-0.5 with N the tokens of a stage (REFERENCE.md), which
tracing turns into a constant, so `vision.onnx` is correct only at the size it was exported at
(`--image-size`, default the checkpoint's); its input shape is fixed to that size, so onnxruntime
refuses any other instead of computing a different function.

Padding: an all-ones `attention_mask` reproduces the original model (which attends to every
position); a real mask hides padded prompt tokens, as `Florence2.encode(..., attention_mask)` does.

`OnnxFlorence2(folder).generate(pixel_values, input_ids)` runs greedy search with numpy and
onnxruntime only, with the decoding rules of `Florence2.generate(..., num_beams=1)`: forced BOS
after the decoder start token, forced EOS at the last position, no repeated n-grams.
Needs the `[onnx]` extra (onnx, onnxscript, onnxruntime); importing `miniflorence` never imports them.

Legend: B batch, S image side, I image tokens, P prompt tokens, T = I + P encoder tokens, D model
width, h heads, d head width, L cached decoder tokens, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from miniflorence.language_model import KVCache
from miniflorence.model import Florence2, load_florence2
from minivision.onnx import (
    MIN_OPSET,
    SUMMARY_FILE,
    check_graph,
    check_opset,
    export_graph,
    export_main,
    write_export,
)

VISION_FILE, ENCODER_FILE, DECODER_FILE = "vision.onnx", "encoder.onnx", "decoder.onnx"


class VisionForOnnx(nn.Module):
    """DaViT + projector: (B, 3, S, S) pixels -> (B, I, D) image tokens (`Florence2.encode_image`)."""

    def __init__(self, model: Florence2) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model.encode_image(pixel_values)


class EncoderForOnnx(nn.Module):
    """Language encoder over [image tokens, prompt tokens], plus every decoder layer's cross-attention keys/values.

    The merge of image and prompt tokens is `Florence2.encode`'s, starting from image tokens.
    """

    def __init__(self, model: Florence2) -> None:
        super().__init__()
        self.language_model = model.language_model

    def forward(self, image_features: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        prompt = self.language_model.embed_tokens(input_ids)  # (B, P, D)
        inputs_embeds = torch.cat([image_features, prompt], dim=1)  # (B, T, D)
        image_mask = torch.ones_like(image_features[:, :, 0], dtype=attention_mask.dtype)  # (B, I): always attended
        mask = torch.cat([image_mask, attention_mask], dim=1)  # (B, T)
        hidden = self.language_model.encode(inputs_embeds, mask)  # (B, T, D)
        cross = [layer.encoder_attn.keys_values(hidden) for layer in self.language_model.model.decoder.layers]
        return (hidden, mask, *(t for kv in cross for t in kv))  # cross_key.0, cross_value.0, cross_key.1, ...


class DecoderStepForOnnx(nn.Module):
    """One decoder step with a key/value cache: `Florence2LanguageModel.decode` with a filled `KVCache`."""

    def __init__(self, model: Florence2) -> None:
        super().__init__()
        self.language_model = model.language_model

    def forward(
        self, input_ids: Tensor, encoder_attention_mask: Tensor, past: list[Tensor], cross: list[Tensor]
    ) -> tuple[Tensor, list[Tensor]]:
        """input_ids (B, 1); past / cross: [key.0, value.0, key.1, ...] -> logits (B, 1, V), present likewise."""
        cache = KVCache(
            self_kv=[(past[i], past[i + 1]) for i in range(0, len(past), 2)],
            cross_kv=[(cross[i], cross[i + 1]) for i in range(0, len(cross), 2)],
        )
        logits, cache = self.language_model.decode(input_ids, None, encoder_attention_mask, cache)
        return logits, [t for kv in cache.self_kv for t in kv]


def kv_names(prefix: str, layers: int) -> list[str]:
    """[prefix_key.0, prefix_value.0, prefix_key.1, ...]"""
    return [f"{prefix}_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]


def graph_interfaces(layers: int) -> dict[str, dict[str, list[str]]]:
    """Input and output names of the three graphs."""
    cross = kv_names("cross", layers)
    return {
        "vision": {"inputs": ["pixel_values"], "outputs": ["image_features"]},
        "encoder": {
            "inputs": ["image_features", "input_ids", "attention_mask"],
            "outputs": ["encoder_hidden_states", "encoder_attention_mask", *cross],
        },
        "decoder": {
            "inputs": ["input_ids", "encoder_attention_mask", *kv_names("past", layers), *cross],
            "outputs": ["logits", *kv_names("present", layers)],
        },
    }


def example_inputs(model: Florence2, image_size: int) -> dict[str, tuple[Any, ...]]:
    """Inputs to trace and check each graph with: batch 2 (torch.export specialises sizes 0 and 1), 3 cached tokens."""
    c = model.config
    g = torch.Generator().manual_seed(0)
    B, P, L = 2, 4, 3
    with torch.no_grad():
        image_features = model.encode_image(torch.randn(B, 3, image_size, image_size, generator=g))  # (B, I, D)
    T = image_features.shape[1] + P
    head_dim = c.d_model // c.decoder_heads
    cross = [torch.randn(B, c.decoder_heads, T, head_dim, generator=g) for _ in range(2 * c.decoder_layers)]
    past = [torch.randn(B, c.decoder_heads, L, head_dim, generator=g) for _ in range(2 * c.decoder_layers)]
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -1] = 0  # one padded prompt token in the second sample
    return {
        "vision": (torch.randn(B, 3, image_size, image_size, generator=g),),
        "encoder": (image_features, torch.randint(3, c.vocab_size, (B, P), generator=g), mask[:, -P:]),
        "decoder": (torch.randint(3, c.vocab_size, (B, 1), generator=g), mask, past, cross),
    }


def dynamic_shapes(layers: int) -> dict[str, tuple[Any, ...]]:
    """Which sizes stay symbolic in each graph (the image size does not: see the module docstring)."""
    Dim = torch.export.Dim
    batch, prompt, image, encoder = Dim("batch"), Dim("prompt_length"), Dim("image_tokens"), Dim("encoder_length")
    cached = Dim("past_length")
    return {
        "vision": ({0: batch},),
        "encoder": ({0: batch, 1: image}, {0: batch, 1: prompt}, {0: batch, 1: prompt}),
        "decoder": (
            {0: batch}, {0: batch, 1: encoder},
            [{0: batch, 2: cached}] * (2 * layers), [{0: batch, 2: encoder}] * (2 * layers),
        ),
    }


def export_florence2(
    model: Florence2, out_dir: str | os.PathLike, image_size: int | None = None, opset: int = MIN_OPSET,
    check: bool = True,
) -> dict[str, Path]:
    """Write `vision.onnx`, `encoder.onnx`, `decoder.onnx` and `export.json` into `out_dir`.

    Each file appears complete or not at all (written in a temporary folder, then moved).

    Args:
        model: a float32 `Florence2`.
        out_dir: the output folder (created if needed).
        image_size: the one input size `vision.onnx` accepts (a multiple of 32; default `config.image_size`).
        opset: ONNX opset version, at least 18.
        check: run each graph once with onnxruntime and print how far it is from PyTorch.

    Returns:
        the written paths by role: "vision", "encoder", "decoder", "summary".
    """
    c = model.config
    image_size = image_size or c.image_size
    check_opset(opset)
    grid_limit = c.image_pos_embed_size * 32
    if image_size % 32 or not 32 <= image_size <= grid_limit:
        raise ValueError(f"--image-size {image_size}: must be a multiple of 32 between 32 and {grid_limit}")
    model = model.float().eval()
    modules = {"vision": VisionForOnnx(model), "encoder": EncoderForOnnx(model), "decoder": DecoderStepForOnnx(model)}
    files = {"vision": VISION_FILE, "encoder": ENCODER_FILE, "decoder": DECODER_FILE}
    names = graph_interfaces(c.decoder_layers)
    examples = example_inputs(model, image_size)
    shapes = dynamic_shapes(c.decoder_layers)

    def build(tmp: Path) -> dict:
        for role, module in modules.items():
            export_graph(module.eval(), examples[role], tmp / files[role], names[role]["inputs"],
                         names[role]["outputs"], shapes[role], opset)
            if check:
                check_graph(tmp / files[role], module, examples[role], names[role]["inputs"])
        return {
            "family": "florence2",
            "config": c.to_dict(),
            "image_size": image_size,
            "num_image_tokens": int(examples["encoder"][0].shape[1]),
            "opset": opset,
            "graphs": {role: {"file": files[role], **names[role]} for role in files},
        }

    out_dir = write_export(out_dir, build)
    return {**{role: out_dir / name for role, name in files.items()}, "summary": out_dir / SUMMARY_FILE}


# ---- running the export: greedy generation on onnxruntime, numpy only --------------------------------


def ban_repeated_ngrams(scores: np.ndarray, sequences: np.ndarray, n: int) -> None:
    """In place: -inf for every token that would repeat an n-gram of its row (`generation.ban_repeated_ngrams`)."""
    N, S = sequences.shape
    if n <= 0 or S < n:
        return
    for row in range(N):
        prefix = tuple(sequences[row, S - n + 1:])  # the last n - 1 tokens
        for start in range(S - n + 1):
            if tuple(sequences[row, start:start + n - 1]) == prefix:
                scores[row, sequences[row, start + n - 1]] = -np.inf


class OnnxFlorence2:
    """The three exported graphs on onnxruntime, with greedy generation in numpy.

    Args:
        folder: an output folder of `python -m miniflorence.onnx`.
        providers: onnxruntime execution providers (default: CPU).
    """

    def __init__(self, folder: str | os.PathLike, providers: list[str] | None = None) -> None:
        import onnxruntime

        folder = Path(folder)
        summary_path = folder / SUMMARY_FILE
        if not summary_path.is_file():
            raise ValueError(f"{folder}: no {SUMMARY_FILE}; export with `python -m miniflorence.onnx CK {folder}`")
        self.summary = json.loads(summary_path.read_text())
        self.config = self.summary["config"]
        self.image_size = self.summary["image_size"]
        providers = providers or ["CPUExecutionProvider"]
        self.graphs = self.summary["graphs"]
        self.sessions = {
            role: onnxruntime.InferenceSession(str(folder / graph["file"]), providers=providers)
            for role, graph in self.graphs.items()
        }

    def encode(
        self, pixel_values: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Image and prompt -> the encoder graph's outputs by name (hidden states, mask, cross keys/values).

        Args:
            pixel_values: (B, 3, S, S) float32 processor output, S the export size.
            input_ids: (B, P) prompt ids; attention_mask (B, P), None = all ones (the original model).
        """
        if pixel_values.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(f"pixel_values must be Bx3x{self.image_size}x{self.image_size} (the export size), "
                             f"got {pixel_values.shape}")
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        (image_features,) = self.sessions["vision"].run(None, {"pixel_values": pixel_values.astype(np.float32)})
        inputs = {"image_features": image_features, "input_ids": input_ids, "attention_mask": attention_mask}
        outputs = self.sessions["encoder"].run(None, inputs)
        return dict(zip(self.graphs["encoder"]["outputs"], outputs))

    def generate(
        self, pixel_values: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
        max_new_tokens: int = 1024, no_repeat_ngram_size: int = 3,
    ) -> np.ndarray:
        """Greedy search -> (B, 1 + n) int64 ids starting with the decoder start token; finished rows padded.

        The decoding rules of `Florence2.generate(..., num_beams=1)`: after the n-gram ban, the first
        generated token is forced to BOS and the token at the last position (max_new_tokens) to EOS.
        """
        c = self.config
        encoded = self.encode(pixel_values, input_ids, attention_mask)
        B = encoded["encoder_hidden_states"].shape[0]
        layers, heads = c["decoder_layers"], c["decoder_heads"]
        empty = np.zeros((B, heads, 0, c["d_model"] // heads), dtype=np.float32)  # the zero-length first cache
        feeds = {"encoder_attention_mask": encoded["encoder_attention_mask"]}
        feeds.update({name: encoded[name] for name in kv_names("cross", layers)})
        feeds.update({name: empty for name in kv_names("past", layers)})
        max_length = 1 + max_new_tokens
        sequences = np.full((B, 1), c["decoder_start_token_id"], dtype=np.int64)
        unfinished = np.ones(B, dtype=bool)
        while True:
            logits, *present = self.sessions["decoder"].run(None, {"input_ids": sequences[:, -1:], **feeds})
            scores = logits[:, -1].astype(np.float32)  # (B, V)
            ban_repeated_ngrams(scores, sequences, no_repeat_ngram_size)
            for forced, position in ((c["bos_token_id"], 1), (c["eos_token_id"], max_length - 1)):
                if sequences.shape[1] == position:  # every token -inf but the forced one
                    scores[:] = -np.inf
                    scores[:, forced] = 0.0
            next_tokens = np.where(unfinished, scores.argmax(axis=-1), c["pad_token_id"])  # (B,)
            sequences = np.concatenate([sequences, next_tokens[:, None]], axis=1)  # (B, S + 1)
            unfinished &= next_tokens != c["eos_token_id"]
            if not unfinished.any() or sequences.shape[1] >= max_length:
                return sequences
            feeds.update(zip(kv_names("past", layers), present))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m miniflorence.onnx", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="converted checkpoint (python -m weights_convert florence2 ...)")
    parser.add_argument("out_dir", type=Path, help="output folder for the graphs and export.json")
    parser.add_argument("--image-size", type=int, help="the input size vision.onnx accepts (default: the checkpoint's)")
    parser.add_argument("--opset", type=int, default=MIN_OPSET, help=f"ONNX opset version (>= {MIN_OPSET})")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime run that compares with PyTorch")
    return parser


def main(argv: list[str] | None = None) -> int:
    def export(args: argparse.Namespace) -> dict[str, Path]:
        return export_florence2(load_florence2(args.checkpoint), args.out_dir, args.image_size, args.opset,
                                not args.no_check)

    return export_main(build_parser(), argv, export)


if __name__ == "__main__":
    sys.exit(main())
