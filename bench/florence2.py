"""Florence-2 speed: vision tower, image tokens, language encoder and per-token decoding, ours and
transformers' native Florence-2 (same seeded weights) side by side when transformers is installed.

    python bench/florence2.py --config base --image-size 768 [--device cuda] [--dtype bf16]
    python bench/florence2.py --config base --image-size 128 --decode-steps 4 --repeats 1   # a quick CPU run

Numbers are medians of --repeats runs after one warm-up; the ratio is transformers / ours
(> 1: ours is faster). Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from miniflorence import CONFIGS, Florence2, Florence2Config  # noqa: E402
from miniflorence.model import florence2_from_tensors  # noqa: E402
from weights_convert.florence2 import convert_tensors  # noqa: E402


def native_florence2(config: Florence2Config) -> torch.nn.Module | None:
    """transformers' native model with seeded weights (tests/reference/official.py), or None without transformers."""
    reference = ROOT / "tests" / "reference"
    if not reference.is_dir():
        print(f"{reference} is absent: timing ours only")
        return None
    sys.path.insert(0, str(reference))
    try:
        import official

        return official.native_florence2(config, seed=0, attn_implementation="sdpa")
    except ImportError:
        print("transformers is not installed: timing ours only")
        return None
    finally:
        sys.path.remove(str(reference))


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs, after one warm-up."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_ours(model: Florence2, encoder_states: torch.Tensor, steps: int) -> None:
    """Greedy decoding with the KV cache, `steps` tokens."""
    token = torch.full((encoder_states.shape[0], 1), 2, device=encoder_states.device)
    cache = None
    for _ in range(steps):
        logits, cache = model.language_model.decode(token, encoder_states, None, cache)
        token = logits[:, -1].argmax(-1, keepdim=True)


def decode_native(native, encoder_states: torch.Tensor, steps: int) -> None:
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    token = torch.full((encoder_states.shape[0], 1), 2, device=encoder_states.device)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    decoder = native.model.language_model.decoder
    for _ in range(steps):
        out = decoder(input_ids=token, encoder_hidden_states=encoder_states, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = native.lm_head(out.last_hidden_state)[:, -1].argmax(-1, keepdim=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="base")
    p.add_argument("--image-size", type=int, default=768, help="a multiple of 32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=12)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    p.add_argument("--no-transformers", action="store_true", help="time ours only")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    config = CONFIGS[args.config]

    native = None if args.no_transformers else native_florence2(config)
    if native is not None:  # ours gets the very same weights, through the converter
        _, tensors = convert_tensors(native.state_dict(), config=config)
        ours = florence2_from_tensors(config, {k: v.clone() for k, v in tensors.items()})
        native = native.to(device, dtype).eval()
    else:
        torch.manual_seed(0)
        ours = Florence2(config)
    ours = ours.to(device, dtype).eval()

    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device, dtype)
    prompt = torch.randint(3, 50265, (args.batch, args.prompt_tokens), generator=g).to(device)
    prompt[:, 0], prompt[:, -1] = 0, 2

    rows = []
    with torch.inference_mode():
        image_tokens = ours.encode_image(pixels)
        embeds = torch.cat([image_tokens, ours.language_model.embed_tokens(prompt)], dim=1)  # (B, I + T, D)
        states = ours.language_model.encode(embeds)
        cases = [
            ("vision tower", lambda: ours.vision_tower(pixels),
             native and (lambda: native.model.vision_tower(pixels))),
            ("vision tower + projector", lambda: ours.encode_image(pixels),
             native and (lambda: native.model.get_image_features(pixels).pooler_output)),
            (f"language encoder ({embeds.shape[1]} tokens)", lambda: ours.language_model.encode(embeds),
             native and (lambda: native.model.language_model.encoder(inputs_embeds=embeds))),
            (f"decoding, per token (greedy, {args.decode_steps} steps)",
             lambda: decode_ours(ours, states, args.decode_steps),
             native and (lambda: decode_native(native, states, args.decode_steps))),
        ]
        for name, ours_fn, native_fn in cases:
            per = args.decode_steps if name.startswith("decoding") else 1
            t_ours = timed(ours_fn, device, args.repeats) / per
            t_native = timed(native_fn, device, args.repeats) / per if native_fn else None
            rows.append((name, t_ours, t_native))

    print(f"Florence-2 {args.config}, image {args.image_size}, batch {args.batch}, {args.dtype}, {device}"
          f"{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}")
    print(f"{'stage':<48} {'ours ms':>10} {'transformers ms':>16} {'ratio':>7}")
    for name, t_ours, t_native in rows:
        native_ms = f"{t_native * 1e3:16.2f}" if t_native else f"{'-':>16}"
        ratio = f"{t_native / t_ours:7.2f}" if t_native else f"{'-':>7}"
        print(f"{name:<48} {t_ours * 1e3:10.2f} {native_ms} {ratio}")


if __name__ == "__main__":
    main()
