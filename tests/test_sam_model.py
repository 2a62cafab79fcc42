"""minisam.Sam against the official segment_anything model: same weights, same numbers.

The official model is built from its own classes with seeded random weights
(tests/reference/official.py), converted by `weights_convert.sam` (in memory; the `tiny` fixture
goes through the files and `minisam.load_sam`). Tolerances
(DESIGN.md): image embeddings, prompt embeddings and low-res mask logits within 1e-4 of their
standard deviation (max abs), IoU predictions within 1e-5.
Full-width variants run at reduced input sizes to keep CPU time small: vit_b at 224 (grid 14, no
window padding) and 320 (grid 20, windows padded to 28), vit_l and vit_h at 128 (grid 8).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.paths import asset_path
from helpers.sam import official_sam, prompt_sets, segment_anything, to_minisam
from official import fill_sam_random

import minisam
from minisam.sam import sam_from_tensors
from minivision.checkpoint import read_converted, save_converted

pytestmark = pytest.mark.all_threads  # full-width models: their matmuls use every core

PARITY_CASES = [
    pytest.param(("tiny", 160), id="tiny-160"),
    pytest.param(("vit_b", 224), id="vit_b-224"),
    pytest.param(("vit_b", 320), id="vit_b-320-window-padding"),
    pytest.param(("vit_l", 128), marks=pytest.mark.slow, id="vit_l-128"),
    pytest.param(("vit_h", 128), marks=pytest.mark.slow, id="vit_h-128"),
]


def assert_close_to_scale(ours: torch.Tensor, official: torch.Tensor, rel: float = 1e-4) -> float:
    assert ours.shape == official.shape
    err = (ours - official).abs().max().item()
    scale = official.float().std().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x std {scale:.3g}"
    return err


@pytest.fixture(scope="module", params=PARITY_CASES)
def pair(request, tmp_path_factory):
    variant, image_size = request.param
    official = official_sam(variant, image_size)
    ours = to_minisam(official)  # in memory: a vit_h file would be 2.5 GB
    yield variant, image_size, official, ours
    del official, ours


@torch.no_grad()
def test_parity_with_official(pair):
    variant, image_size, official, ours = pair
    assert ours.config.image_size == image_size
    generator = torch.Generator().manual_seed(1)
    # A 4:3 image, so the bottom padding of preprocess is part of the comparison.
    image = torch.randint(0, 256, (1, 3, image_size, image_size * 3 // 4), generator=generator).float()
    emb_official = official.image_encoder(official.preprocess(image))
    emb_ours = ours.encode_image(image)
    errors = {"image_embeddings": assert_close_to_scale(emb_ours, emb_official)}
    pe_err = (ours.prompt_encoder.get_dense_pe() - official.prompt_encoder.get_dense_pe()).abs().max().item()
    assert pe_err <= 1e-6
    for name, prompts in prompt_sets(image_size, generator).items():
        sparse_off, dense_off = official.prompt_encoder(**prompts)
        sparse, dense = ours.encode_prompts(**prompts)
        errors[f"{name}/sparse"] = assert_close_to_scale(sparse, sparse_off)
        errors[f"{name}/dense"] = assert_close_to_scale(dense, dense_off)
        for multimask in (True, False):
            masks_off, iou_off = official.mask_decoder(
                image_embeddings=emb_official,
                image_pe=official.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse_off,
                dense_prompt_embeddings=dense_off,
                multimask_output=multimask,
            )
            masks, iou = ours.decode_masks(emb_ours, sparse, dense, multimask)
            errors[f"{name}/masks/{multimask}"] = assert_close_to_scale(masks, masks_off)
            iou_err = (iou - iou_off).abs().max().item()
            assert iou_err <= 1e-5, f"{name}: IoU predictions differ by {iou_err:.3g}"
            errors[f"{name}/iou/{multimask}"] = iou_err
            # Not degenerate: both signs present in the logits.
            assert 0.05 < (masks_off > 0).float().mean() < 0.95
    print(f"\n{variant}@{image_size} max abs errors: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    official = official_sam("tiny", 160)
    return official, to_minisam(official, tmp_path_factory.mktemp("tiny"))


@torch.no_grad()
def test_forward_matches_official(tiny):
    """The end-to-end batched `forward`, two images with different prompts."""
    official, ours = tiny
    g = torch.Generator().manual_seed(2)
    batch = [
        {
            "image": torch.randint(0, 256, (3, 160, 120), generator=g).float(),
            "original_size": (400, 300),
            "point_coords": torch.tensor([[[30.0, 40.0], [90.0, 100.0]]]),
            "point_labels": torch.tensor([[1, 0]]),
        },
        {
            "image": torch.randint(0, 256, (3, 100, 160), generator=g).float(),
            "original_size": (250, 400),
            "boxes": torch.tensor([[10.0, 20.0, 120.0, 90.0], [0.0, 0.0, 60.0, 60.0]]),
        },
    ]
    for multimask in (True, False):
        for out_off, out in zip(official(batch, multimask), ours(batch, multimask), strict=True):
            assert_close_to_scale(out["low_res_logits"], out_off["low_res_logits"])
            assert (out["iou_predictions"] - out_off["iou_predictions"]).abs().max() <= 1e-5
            assert out["masks"].shape == out_off["masks"].shape and out["masks"].dtype == torch.bool
            # Masks from logits this close differ at most where a logit is within rounding of 0.
            assert (out["masks"] != out_off["masks"]).float().mean() < 1e-3


@torch.no_grad()
def test_sdpa_and_plain_attention_agree(tiny):
    official, _ = tiny
    fused = to_minisam(official, use_sdpa=True)
    plain = to_minisam(official, use_sdpa=False)
    assert fused.config.use_sdpa and not plain.config.use_sdpa
    image = torch.randint(0, 256, (2, 3, 160, 160), generator=torch.Generator().manual_seed(3)).float()
    emb_fused, emb_plain = fused.encode_image(image), plain.encode_image(image)
    assert_close_to_scale(emb_fused, emb_plain, rel=1e-5)
    prompts = prompt_sets(160, torch.Generator().manual_seed(4))["points+box"]
    sparse, dense = plain.encode_prompts(**prompts)
    masks_fused, iou_fused = fused.decode_masks(emb_plain[:1], sparse, dense)
    masks_plain, iou_plain = plain.decode_masks(emb_plain[:1], sparse, dense)
    assert_close_to_scale(masks_fused, masks_plain, rel=1e-5)
    assert (iou_fused - iou_plain).abs().max() <= 1e-5


def test_sdpa_and_plain_attention_gradients_agree(tiny):
    """Training runs the fused path; its gradients (rel_pos tables included) equal the plain math's."""
    official, _ = tiny
    grads = []
    for use_sdpa in (True, False):
        model = to_minisam(official, use_sdpa=use_sdpa)
        image = torch.randint(0, 256, (2, 3, 160, 160), generator=torch.Generator().manual_seed(10)).float()
        sparse, dense = model.encode_prompts(boxes=torch.tensor([[1.0, 2.0, 90.0, 100.0], [20.0, 30.0, 150.0, 140.0]]))
        masks, iou = model.decode_masks(model.encode_image(image), sparse, dense)
        (masks.square().mean() + iou.sum()).backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    fused, plain = grads
    used = [k for k, g in plain.items() if g is not None]  # box prompts leave the point embeddings unused
    assert used == [k for k, g in fused.items() if g is not None] and "image_encoder.blocks.1.attn.rel_pos_h" in used
    for key in used:
        if key.startswith("mask_decoder.transformer.") and key.endswith("k_proj.bias"):
            # A key bias adds the same q . b_k to all logits of a query, which softmax ignores: its
            # exact gradient is 0 and both paths return float32 noise (~1e-8, sign and size differ
            # with any change of rounding upstream). What holds is that the noise is negligible: at
            # most 1e-4 of the gradient of the same attention's query bias, the rule of every other tensor.
            scale = plain[key.replace("k_proj", "q_proj")].abs().max()
            assert max(fused[key].abs().max(), plain[key].abs().max()) <= 1e-4 * scale, key
            continue
        assert (fused[key] - plain[key]).abs().max() <= 1e-4 * plain[key].abs().max() + 1e-7, key


@torch.no_grad()
def test_plain_attention_is_bit_exact(tiny):
    """With use_sdpa=False every operation is the official one, in the same order."""
    official, _ = tiny
    plain = to_minisam(official, use_sdpa=False)
    image = torch.randint(0, 256, (1, 3, 160, 160), generator=torch.Generator().manual_seed(5)).float()
    emb = official.image_encoder(official.preprocess(image))
    assert torch.equal(plain.encode_image(image), emb)
    for prompts in prompt_sets(160, torch.Generator().manual_seed(6)).values():
        sparse_off, dense_off = official.prompt_encoder(**prompts)
        sparse, dense = plain.encode_prompts(**prompts)
        assert torch.equal(sparse, sparse_off) and torch.equal(dense, dense_off)
        out_off = official.mask_decoder(emb, official.prompt_encoder.get_dense_pe(), sparse_off, dense_off, True)
        out = plain.decode_masks(emb, sparse, dense, True)
        assert torch.equal(out[0], out_off[0]) and torch.equal(out[1], out_off[1])


def test_one_image_per_prompt():
    """decode_masks also takes (B, C, H, W) embeddings, one image per prompt (training batches)."""
    ours = minisam.Sam(minisam.tiny_config()).eval()
    fill_sam_random(ours)
    with torch.no_grad():
        emb = ours.encode_image(torch.rand(2, 3, 160, 160) * 255)
        sparse, dense = ours.encode_prompts(boxes=torch.tensor([[10.0, 10.0, 90.0, 80.0], [40.0, 30.0, 150.0, 120.0]]))
        masks, iou = ours.decode_masks(emb, sparse, dense, multimask_output=False)
        for i in range(2):
            single, single_iou = ours.decode_masks(emb[i : i + 1], sparse[i : i + 1], dense[i : i + 1], False)
            assert torch.allclose(masks[i : i + 1], single, atol=1e-5)
            assert torch.allclose(iou[i : i + 1], single_iou, atol=1e-6)
        with pytest.raises(ValueError, match="image embeddings for 3 prompts"):
            ours.decode_masks(emb, torch.cat([sparse, sparse[:1]]), torch.cat([dense, dense[:1]]))


# ---- custom image sizes ----------------------------------------------------------------------


@torch.no_grad()
def test_checkpoint_at_1024_runs_at_512(tmp_path):
    official = official_sam("tiny", 1024)
    model = to_minisam(official, tmp_path, image_size=512)
    assert model.config.image_size == 512
    assert model.image_encoder.pos_embed.shape == (1, 32, 32, 64)
    assert model.image_encoder.blocks[1].attn.rel_pos_h.shape == (63, 32)  # global block: 2 * 32 - 1
    assert model.image_encoder.blocks[0].attn.rel_pos_h.shape == (27, 32)  # windowed: 2 * 14 - 1, unchanged
    emb = model.encode_image(torch.rand(1, 3, 512, 384) * 255)
    assert emb.shape == (1, 256, 32, 32)
    sparse, dense = model.encode_prompts(points=(torch.tensor([[[100.0, 200.0]]]), torch.tensor([[1]])))
    masks, iou = model.decode_masks(emb, sparse, dense)
    assert masks.shape == (1, 3, 128, 128) and iou.shape == (1, 3)
    assert model.postprocess_masks(masks, (512, 384), (1000, 750)).shape == (1, 3, 1000, 750)
    # The global tables are what the official get_rel_pos interpolates to on every call.
    from segment_anything.modeling.image_encoder import get_rel_pos

    table = official.image_encoder.blocks[1].attn.rel_pos_w
    assert torch.equal(get_rel_pos(32, 32, table), get_rel_pos(32, 32, model.image_encoder.blocks[1].attn.rel_pos_w))


@torch.no_grad()
def test_built_at_512_matches_official_at_512():
    official = official_sam("tiny", 512)
    ours = to_minisam(official)
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(7)) * 255
    emb_off = official.image_encoder(official.preprocess(image))
    assert_close_to_scale(ours.encode_image(image), emb_off)
    prompts = prompt_sets(512, torch.Generator().manual_seed(8))["points+mask"]
    masks_off, iou_off = official.mask_decoder(
        emb_off, official.prompt_encoder.get_dense_pe(), *official.prompt_encoder(**prompts), True
    )
    masks, iou = ours.decode_masks(emb_off, *ours.encode_prompts(**prompts))
    assert_close_to_scale(masks, masks_off)
    assert (iou - iou_off).abs().max() <= 1e-5


def test_configs_match_official_builders():
    """Keys, shapes and parameter counts of the three presets equal the official build_sam models."""
    sa = segment_anything()
    counts = {"vit_b": (314, 93.7), "vit_l": (482, 312.3), "vit_h": (594, 641.1)}
    for variant, (n_keys, millions) in counts.items():
        with torch.device("meta"):
            official = sa.sam_model_registry[variant]()
            ours = minisam.Sam(minisam.CONFIGS[variant])
        theirs = {k: v.shape for k, v in official.state_dict().items()}
        mine = {k: v.shape for k, v in ours.state_dict().items()}
        assert mine == theirs and len(mine) == n_keys
        assert round(sum(p.numel() for p in ours.parameters()) / 1e6, 1) == millions
    assert "default" not in minisam.CONFIGS
    assert dataclasses.replace(minisam.CONFIGS["vit_b"], image_size=512).image_size == 512
    with pytest.raises(ValueError):
        dataclasses.replace(minisam.CONFIGS["vit_b"], image_size=500)
    with pytest.raises(ValueError, match="unknown"):
        minisam.SamConfig.from_dict({**minisam.CONFIGS["vit_b"].to_dict(), "img_size": 3})


# ---- pre- and post-processing on the official demo images --------------------------------------

SAM_IMAGES = ["truck.jpg", "groceries.jpg", "dog.jpg", "dogs.jpg"]


def load_rgb(name: str) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(asset_path("images", "sam", name)).convert("RGB"))


@pytest.mark.parametrize("name", SAM_IMAGES)
def test_resize_longest_side_matches_official(name):
    from segment_anything.utils.transforms import ResizeLongestSide as Official

    segment_anything()
    image = load_rgb(name)
    H, W = image.shape[:2]
    for target in (1024, 512, 333):
        official, ours = Official(target), minisam.ResizeLongestSide(target)
        assert ours.get_preprocess_shape(H, W, target) == official.get_preprocess_shape(H, W, target)
        resized = ours.apply_image(image)
        assert resized.dtype == np.uint8 and max(resized.shape[:2]) == target
        assert np.array_equal(resized, official.apply_image(image))
        coords = np.array([[[0.0, 0.0], [W - 1, H - 1], [W / 3, H / 7]]])
        assert np.array_equal(ours.apply_coords(coords, (H, W)), official.apply_coords(coords, (H, W)))
        boxes = np.array([[10, 20, W - 5, H - 9], [0, 0, W, H]])
        assert np.array_equal(ours.apply_boxes(boxes, (H, W)), official.apply_boxes(boxes, (H, W)))
        t_coords, t_boxes = torch.tensor(coords), torch.tensor(boxes)
        assert torch.equal(ours.apply_coords_torch(t_coords, (H, W)), official.apply_coords_torch(t_coords, (H, W)))
        assert torch.equal(ours.apply_boxes_torch(t_boxes, (H, W)), official.apply_boxes_torch(t_boxes, (H, W)))
    batch = torch.from_numpy(image[:64, :48]).permute(2, 0, 1)[None].float()
    assert torch.equal(minisam.ResizeLongestSide(64).apply_image_torch(batch), Official(64).apply_image_torch(batch))


@pytest.mark.parametrize("name", SAM_IMAGES)
def test_pre_and_postprocess_match_official(name, tiny):
    from segment_anything.utils.transforms import ResizeLongestSide as Official

    official, ours = tiny
    image = load_rgb(name)
    resized = Official(160).apply_image(image)
    x = torch.as_tensor(resized).permute(2, 0, 1).float()
    assert torch.equal(ours.preprocess(x), official.preprocess(x))
    low_res = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(9))
    args = (low_res, resized.shape[:2], image.shape[:2])
    masks = ours.postprocess_masks(*args)
    assert masks.shape == (2, 3, *image.shape[:2])
    assert torch.equal(masks, official.postprocess_masks(*args))


@pytest.mark.parametrize(
    "input_size, original_size",
    [((576, 1024), (603, 1072)), ((1024, 683), (1500, 1000)), ((8, 1024), (9, 1152)), ((1024, 1024), (700, 700))],
)
def test_postprocess_masks_upscales_only_the_kept_block(input_size, original_size):
    """Upscaling just the low-res block the crop keeps gives the official values bit for bit."""
    with torch.device("meta"):  # only the image size (1024) is used
        model = minisam.Sam(minisam.CONFIGS["vit_b"])
    low_res = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    full = F.interpolate(low_res, (1024, 1024), mode="bilinear", align_corners=False)  # the official steps
    full = full[..., : input_size[0], : input_size[1]]
    expected = F.interpolate(full, original_size, mode="bilinear", align_corners=False)
    assert torch.equal(model.postprocess_masks(low_res, input_size, original_size), expected)


# ---- the torchvision stand-in the official code runs on (tests/reference/stubs) ------------------


def greedy_nms(boxes: np.ndarray, scores: torch.Tensor, threshold: float) -> list[int]:
    """torchvision's CPU NMS kernel, box by box in float32."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    suppressed, keep = set(), []
    order = scores.sort(0, descending=True)[1].tolist()
    for n, i in enumerate(order):
        if i in suppressed:
            continue
        keep.append(i)
        for j in order[n + 1 :]:
            w = max(np.float32(0), min(x2[i], x2[j]) - max(x1[i], x1[j]))
            h = max(np.float32(0), min(y2[i], y2[j]) - max(y1[i], y1[j]))
            if j not in suppressed and w * h / (areas[i] + areas[j] - w * h) > threshold:
                suppressed.add(j)
    return keep


@pytest.mark.parametrize("n", [60, 1100])  # coordinate-offset path, then per-category path (> 4000 numbers)
def test_torchvision_stand_in_batched_nms(n):
    sa = segment_anything()
    batched_nms = sa.automatic_mask_generator.batched_nms
    g = torch.Generator().manual_seed(n)
    corners = torch.rand(n, 2, generator=g) * 300
    boxes = torch.cat([corners, corners + torch.rand(n, 2, generator=g) * 60 + 1], dim=1)
    scores, categories = torch.rand(n, generator=g), torch.randint(0, 3, (n,), generator=g)
    expected = []
    for c in range(3):
        members = torch.where(categories == c)[0]
        expected += members[greedy_nms(boxes[members].numpy(), scores[members], 0.7)].tolist()
    expected.sort(key=lambda i: -scores[i].item())
    assert batched_nms(boxes, scores, categories, 0.7).tolist() == expected


def test_torchvision_stand_in_resize():
    from PIL import Image

    sa = segment_anything()
    resize, to_pil_image = sa.utils.transforms.resize, sa.utils.transforms.to_pil_image
    image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    pil_resized = Image.fromarray(image).resize((29, 20), Image.BILINEAR)
    assert np.array_equal(np.array(resize(to_pil_image(image), (20, 29))), np.array(pil_resized))
    assert np.array_equal(np.array(resize(to_pil_image(image), (37, 53))), image)


# ---- loading: built on the meta device, one copy of the weights ------------------------------------


def test_loaded_model_equals_a_normally_built_one(tmp_path):
    """load_sam builds on the meta device and assigns the file's tensors; the result is the model
    built the ordinary way with the same state dict, non-persistent pixel statistics included."""
    built = minisam.Sam(minisam.tiny_config()).eval()
    fill_sam_random(built, seed=4)
    save_converted(tmp_path / "tiny.safetensors", built.state_dict(), "sam", built.config.to_dict())
    loaded = minisam.load_sam(tmp_path / "tiny.safetensors")
    assert not loaded.training and loaded.config == built.config
    ours, theirs = dict(loaded.named_buffers()), dict(built.named_buffers())
    assert ours.keys() == theirs.keys() >= {"pixel_mean", "pixel_std"}
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    state = loaded.state_dict()
    assert state.keys() == built.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in built.state_dict().items())
    assert all(p.requires_grad for p in loaded.parameters())
    image = torch.rand(1, 3, 160, 120, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(image), built.encode_image(image))
    half = minisam.load_sam(tmp_path / "tiny.safetensors", dtype=torch.bfloat16)
    assert {p.dtype for p in half.image_encoder.parameters()} == {torch.bfloat16} and half.dtype == torch.bfloat16
    # The prompt encoder and mask decoder stay float32 (Sam.cast says why).
    prompt_side = (half.prompt_encoder, half.mask_decoder)
    assert {t.dtype for m in prompt_side for t in m.state_dict().values()} == {torch.float32}


def test_loading_keeps_one_copy_of_the_weights(tmp_path):
    """The model's parameters are the tensors read from the file (assigned, not copied into a
    second, randomly initialised set); each was read from the file straight into its memory."""
    model = minisam.Sam(minisam.tiny_config())
    path = tmp_path / "tiny.safetensors"
    save_converted(path, model.state_dict(), "sam", model.config.to_dict())
    config, tensors = read_converted(path, "sam")
    loaded = sam_from_tensors(minisam.SamConfig.from_dict(config), tensors)
    for name, param in loaded.named_parameters():
        assert param.data_ptr() == tensors[name].data_ptr(), name
    assert sum(t.numel() * t.element_size() for t in tensors.values()) > 0.95 * path.stat().st_size
