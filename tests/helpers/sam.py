"""Helpers for the SAM tests: the official model (tests/reference/official.py) or, without the
official package, an official-layout state dict made from minisam itself, and their conversion.

`to_minisam(official)` converts the official model's state_dict in memory (`weights_convert.sam`,
then `minisam.sam.sam_from_tensors`, which shares the official tensors: read-only use); with
`tmp_path` it takes the file path instead: `.pth` -> `python -m weights_convert sam` -> `load_sam`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import official
import pytest
import torch
from official import fill_sam_random, import_segment_anything
from PIL import Image

import minisam
from helpers.paths import asset_path
from minisam.sam import sam_from_tensors
from weights_convert import sam as convert_sam
from weights_convert.__main__ import main as convert_main

# The tiny SAM of the training and LoRA tests: vit_b's layout at 64 px, width 32.
TINY_SAM = dataclasses.replace(
    minisam.CONFIGS["vit_b"], image_size=64, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
    encoder_global_attn_indexes=(1,), window_size=2, prompt_embed_dim=32, mask_in_chans=4,
    decoder_num_heads=2, decoder_mlp_dim=64, iou_head_hidden_dim=32,
)

def segment_anything() -> ModuleType:
    """The official package, or skip the test when it is not installed."""
    sa = import_segment_anything()
    if sa is None:
        pytest.skip("the official segment-anything is the reference here: pip install -e '.[reference]'")
    return sa


def official_sam(variant: str, image_size: int = 1024, seed: int = 0) -> torch.nn.Module:
    """tests/reference/official.py's official SAM ("vit_b", "vit_l", "vit_h" or "tiny"), or skip the test."""
    segment_anything()
    return official.official_sam(variant, image_size, seed)


def official_layout_state(variant: str, image_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """An official-layout SAM state dict with the seeded weights of tests/reference/official.py, made
    without the official package: minisam's model (its attribute paths are the official keys,
    test_configs_match_official_builders) filled by the same recipe, then `to_official`."""
    config = minisam.tiny_config() if variant == "tiny" else minisam.CONFIGS[variant]
    model = minisam.Sam(dataclasses.replace(config, image_size=image_size))
    fill_sam_random(model, seed)
    return convert_sam.to_official(model.config.to_dict(), model.state_dict())


def tiny_config_json(folder: Path) -> Path:
    """minisam.tiny_config() as the JSON file `--config` reads (the converter infers released variants only)."""
    path = Path(folder) / "tiny_config.json"
    path.write_text(json.dumps(minisam.tiny_config().to_dict()))
    return path


def to_minisam(
    official_model: torch.nn.Module,
    tmp_path: Path | None = None,
    image_size: int | None = None,
    use_sdpa: bool | None = None,
) -> minisam.Sam:
    """minisam's model with the official model's weights: converted in memory, or through files with `tmp_path`.

    A tiny official model (width 64) is converted with `minisam.tiny_config()`; the released sizes are inferred.
    """
    tiny = official_model.image_encoder.patch_embed.proj.out_channels == minisam.tiny_config().encoder_embed_dim
    if tmp_path is None:
        state = official_model.state_dict()
        config = minisam.tiny_config() if tiny else None
        config, tensors = convert_sam.convert_tensors(state, config=config, image_size=image_size)
        config = minisam.SamConfig.from_dict(config)
        if use_sdpa is not None:
            config = dataclasses.replace(config, use_sdpa=use_sdpa)
        return sam_from_tensors(config, tensors)
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    src, dst = tmp_path / "official.pth", tmp_path / "minisam.safetensors"
    torch.save(official_model.state_dict(), src)
    config = ["--config", str(tiny_config_json(tmp_path))] if tiny else []
    assert convert_main(["sam", str(src), str(dst), *config]) == 0
    src.unlink()
    return minisam.load_sam(dst, image_size=image_size, use_sdpa=use_sdpa)


def load_image(name: str) -> np.ndarray:
    return np.array(Image.open(asset_path("images", "sam", f"{name}.jpg")).convert("RGB"))


def prompts_for(h: int, w: int) -> list[dict]:
    """Point, box, point + box, several points: placed by fractions of the image size."""
    points = np.array([[0.3 * w, 0.4 * h], [0.7 * w, 0.6 * h]])
    labels = np.array([1, 0])
    box = np.array([0.2 * w, 0.25 * h, 0.6 * w, 0.8 * h])
    return [
        dict(point_coords=points[:1], point_labels=labels[:1]),
        dict(point_coords=points[:1], point_labels=labels[:1], multimask_output=False),
        dict(box=box, multimask_output=False),
        dict(box=box),
        dict(point_coords=points, point_labels=labels, box=box),
        dict(point_coords=points, point_labels=labels, box=box, multimask_output=False),
    ]


def prompt_sets(image_size: int, generator: torch.Generator) -> dict[str, dict]:
    """Points only, a box only, points + box, points + mask input; 2 prompts each, in the input frame."""
    grid = image_size // 16
    points = torch.rand(2, 3, 2, generator=generator) * image_size * 0.7
    labels = torch.tensor([[1, 0, 1], [1, 1, -1]])
    corners = torch.rand(2, 2, 2, generator=generator) * image_size * 0.7
    boxes = torch.cat([corners.min(1).values, corners.max(1).values], dim=1)
    masks = torch.randn(2, 1, 4 * grid, 4 * grid, generator=generator) * 5
    return {
        "points": dict(points=(points, labels), boxes=None, masks=None),
        "box": dict(points=None, boxes=boxes, masks=None),
        "points+box": dict(points=(points[:, :2], labels[:, :2]), boxes=boxes, masks=None),
        "points+mask": dict(points=(points, labels), boxes=None, masks=masks),
    }


LOW_FILTERS = dict(points_per_side=6, points_per_batch=16, pred_iou_thresh=0.01, stability_score_thresh=0.05)
