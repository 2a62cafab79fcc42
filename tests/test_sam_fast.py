"""The fast path of minisam: bfloat16 image encoder, torch.compile, and the fused decoder paths.

- bf16 fidelity (DESIGN.md): on the four SAM demo photographs, masks of a bfloat16 image encoder
  agree with the float32 OFFICIAL masks at IoU >= 0.97 for every prompt (point, box, point + box;
  single and multimask). The model is vit_b's full width and depth (768 x 12 blocks) at 256 px,
  seeded N(0, 1/fan_in) weights (tests/reference/official.py).
- compile=True is as close to the exact float32 embedding as eager is, within the dtype's
  tolerance (tiny model; slow: compiling takes a minute on two cores).
- The decoder's fast path (image side shared by all prompts, cell projections folded into the
  tokens, upscaling as matmuls) equals the plain math for every branch it takes.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from helpers.sam import load_image, official_sam, segment_anything, to_minisam

import minisam
from minisam.image_encoder import folded_rel_pos_attention, rel_pos_bias
from minisam.predictor import SamPredictor
from minisam.sam import compile_sam
from minisam.two_way_transformer import Attention

pytestmark = pytest.mark.all_threads  # full-width models: their matmuls use every core

IMAGES = ["truck", "groceries", "dog", "dogs"]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def bf16_pair():
    """(official float32 predictor, minisam predictor with a bfloat16 image encoder), vit_b at 256 px."""
    sa = segment_anything()
    official = official_sam("vit_b", image_size=256, seed=0)
    ours = to_minisam(official).cast(torch.bfloat16)
    return sa.SamPredictor(official), SamPredictor(ours)


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGES)
def test_bf16_masks_match_official_fp32(bf16_pair, name: str) -> None:
    official, ours = bf16_pair
    assert ours.model.dtype == torch.bfloat16 and ours.model.mask_decoder.iou_token.weight.dtype == torch.float32
    image = load_image(name)
    official.set_image(image)
    ours.set_image(image)
    assert ours.get_image_embedding().dtype == torch.bfloat16
    h, w = image.shape[:2]
    point, label = np.array([[0.3 * w, 0.4 * h]]), np.array([1])
    box = np.array([0.2 * w, 0.25 * h, 0.6 * w, 0.8 * h])
    prompts = {"point": dict(point_coords=point, point_labels=label), "box": dict(box=box),
               "point+box": dict(point_coords=point, point_labels=label, box=box)}
    for kind, prompt in prompts.items():
        for multimask in (True, False):
            their_masks, their_scores, _ = official.predict(**prompt, multimask_output=multimask)
            our_masks, our_scores, our_low = ours.predict(**prompt, multimask_output=multimask)
            assert our_scores.dtype == np.float32 and our_low.dtype == np.float32
            for i, (a, b) in enumerate(zip(our_masks, their_masks, strict=True)):
                assert 0 < b.sum() < b.size, f"{name} {kind}: degenerate official mask"
                assert iou(a, b) >= 0.97, f"{name} {kind} multimask={multimask} mask {i}: IoU {iou(a, b):.4f}"
            np.testing.assert_allclose(our_scores, their_scores, atol=0.05)


def test_load_sam_dtype_and_cast(tmp_path) -> None:
    """dtype=bfloat16 puts the image encoder in bfloat16; everything else, and every output, stays float32."""
    model = minisam.Sam(minisam.tiny_config()).eval()
    path = tmp_path / "tiny.safetensors"
    from minivision.checkpoint import save_converted

    save_converted(path, model.state_dict(), "sam", model.config.to_dict())
    half = minisam.load_sam(path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert half.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    image = torch.rand(1, 3, 160, 120, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        emb = half.encode_image(image)
        assert emb.dtype == torch.bfloat16
        sparse, dense = half.encode_prompts(boxes=torch.tensor([[10.0, 10.0, 90.0, 80.0]]))
        masks, iou_pred = half.decode_masks(emb, sparse, dense)
        assert masks.dtype == iou_pred.dtype == torch.float32
        # The batched official-style forward takes the cast too.
        record = {"image": image[0], "original_size": (160, 120), "boxes": torch.tensor([[10.0, 10.0, 90.0, 80.0]])}
        out = half([record], multimask_output=False)
        assert out[0]["masks"].shape == (1, 1, 160, 120)
        reference = model.encode_image(image)
    assert ((emb.float() - reference).abs().max() / reference.std()).item() < 0.05


# ---- torch.compile -------------------------------------------------------------------------------


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    """The spacing of `dtype`'s numbers at `magnitude`: eps * 2**floor(log2(magnitude))."""
    return torch.finfo(dtype).eps * 2.0 ** np.floor(np.log2(magnitude))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_encoder_equals_eager(dtype: torch.dtype) -> None:
    """The compiled encoder is as close to the exact float32 result as the eager one in `dtype` is.

    float32: DESIGN.md's SAM tolerance, 1e-4 of the embedding's std, for eager, compiled, and the
    two against each other.
    bfloat16: two bf16 ulps at the embedding's largest magnitude. The embedding is the output of the
    neck (conv, LayerNorm, conv, LayerNorm); each of these four ops rounds its result to bf16 (half
    an ulp) and the LayerNorms carry their inputs' errors onto the embedding's scale, so the neck
    alone contributes up to 4 x 1/2 = 2 ulps of max |embedding| (the blocks' roundings before it are
    normalised away to well below that). max |embedding| ~ 4 (unit std), so the bound is 2 x 2^-5.
    Compiled and eager bf16 are not compared with each other: inductor keeps fused element-wise work
    in float32 where eager rounds after every op, so each is within the bound of float32, not of
    the other. (Eager, measured on an AMX CPU: 0.8 to 0.97 ulp over six seeds.)
    """
    torch.manual_seed(0)
    exact = minisam.Sam(minisam.tiny_config()).eval()
    eager = minisam.Sam(minisam.tiny_config()).eval()
    eager.load_state_dict(exact.state_dict())
    eager.cast(dtype)
    compiled = compile_sam(minisam.Sam(minisam.tiny_config()).eval().cast(dtype))
    compiled.load_state_dict(eager.state_dict())
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # nn.Module.compile keeps the keys
    image = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(1)) * 255
    with torch.no_grad():
        expected = exact.encode_image(image)
        got_eager, got_compiled = eager.encode_image(image), compiled.encode_image(image)
    assert got_eager.dtype == got_compiled.dtype == dtype
    if dtype == torch.float32:
        tolerance = 1e-4 * expected.std().item()
    else:
        tolerance = 2 * ulp(dtype, expected.abs().max().item())
    assert (got_eager.float() - expected).abs().max().item() <= tolerance
    assert (got_compiled.float() - expected).abs().max().item() <= tolerance
    if dtype == torch.float32:
        assert (got_compiled - got_eager).abs().max().item() <= tolerance


# ---- the decoder's fast path against the plain math ---------------------------------------------------


@pytest.fixture(scope="module")
def fused_and_plain():
    torch.manual_seed(0)
    plain = minisam.Sam(dataclasses.replace(minisam.tiny_config(), use_sdpa=False)).eval()
    for p in plain.parameters():  # stronger than the default init, so that every path shows in the logits
        p.data.add_(0.05 * torch.randn_like(p))
    fused = minisam.Sam(minisam.tiny_config()).eval()
    fused.load_state_dict(plain.state_dict())
    return fused, plain


@pytest.mark.parametrize(
    "case",
    [
        "boxes",  # shared image side, few tokens: folded cross-attentions
        "many points",  # 20 points: h * tokens > attention width, the SDPA path
        "masks",  # mask prompts: one image side per prompt
        "one image per prompt",
    ],
)
@torch.no_grad()
def test_fused_decoder_equals_plain(fused_and_plain, case: str) -> None:
    fused, plain = fused_and_plain
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(3 if case == "one image per prompt" else 1, 256, 10, 10, generator=g)
    corners = torch.rand(3, 2, 2, generator=g).sort(dim=1).values * 160
    boxes = corners.permute(0, 2, 1).reshape(-1, 4)  # (3, 4)
    points = (torch.rand(1, 20, 2, generator=g) * 160, torch.randint(0, 2, (1, 20), generator=g))
    masks = torch.randn(3, 1, 40, 40, generator=g) * 3
    prompts = {
        "boxes": dict(boxes=boxes),
        "many points": dict(points=points),
        "masks": dict(boxes=boxes, masks=masks),
        "one image per prompt": dict(boxes=boxes),
    }[case]
    sparse, dense = plain.encode_prompts(**prompts)
    for multimask in (True, False):
        masks_fused, iou_fused = fused.decode_masks(emb, sparse, dense, multimask)
        masks_plain, iou_plain = plain.decode_masks(emb, sparse, dense, multimask)
        scale = masks_plain.std().item()
        assert scale > 0.1 and (masks_fused - masks_plain).abs().max().item() <= 1e-5 * scale
        assert (iou_fused - iou_plain).abs().max().item() <= 1e-5


@pytest.mark.parametrize("use_sdpa, regroup", [(True, False), (False, True)], ids=["sdpa-only", "regroup-only"])
@torch.no_grad()
def test_attention_kernel_and_regrouping_are_separate_flags(fused_and_plain, use_sdpa: bool, regroup: bool) -> None:
    """Each of the two-way transformer's two flags alone still gives the plain math's masks."""
    _, plain = fused_and_plain
    mixed = copy.deepcopy(plain)
    for module in mixed.mask_decoder.modules():
        if isinstance(module, Attention):
            module.use_sdpa, module.regroup = use_sdpa, regroup
    mixed.mask_decoder.regroup = regroup
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(1, 256, 10, 10, generator=g)
    boxes = (torch.rand(4, 2, 2, generator=g).sort(dim=1).values * 160).permute(0, 2, 1).reshape(-1, 4)
    sparse, dense = plain.encode_prompts(boxes=boxes)
    masks_mixed, iou_mixed = mixed.decode_masks(emb, sparse, dense)
    masks_plain, iou_plain = plain.decode_masks(emb, sparse, dense)
    assert (masks_mixed - masks_plain).abs().max().item() <= 1e-5 * masks_plain.std().item()
    assert (iou_mixed - iou_plain).abs().max().item() <= 1e-5


@pytest.mark.parametrize("grid", [5, 14])
def test_folded_rel_pos_attention_equals_the_bias_mask(grid: int) -> None:
    """The bf16 encoder's attention folds the decomposed bias into the dot product; in fp32 it is the
    masked kernel's function to float32 rounding (the logits are summed in another order)."""
    g = torch.Generator().manual_seed(0)
    B, h, d = 2, 3, 16
    q, k, v = (torch.randn(B, h, grid * grid, d, generator=g) for _ in range(3))
    rel_pos_h, rel_pos_w = (torch.randn(2 * grid - 1, d, generator=g) * 0.5 for _ in range(2))
    bias = rel_pos_bias(q, rel_pos_h, rel_pos_w, grid, grid)  # (B, h, N, N)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    folded = folded_rel_pos_attention(q, k, v, rel_pos_h, rel_pos_w, grid, grid, d**-0.5)
    # Each logit sums n = d + 2 * grid products in another order: at most n ulps of the sum of their
    # magnitudes apart. Softmax turns a logit error e into a weight error of at most 2e, and the output is a
    # mix of v's rows: |error| <= 2 * e * max|v|.
    n = d + 2 * grid
    magnitudes = (q.abs() * d**-0.5) @ k.abs().transpose(-2, -1) + bias.abs()  # (B, h, N, N), a bound per logit
    e = n * torch.finfo(torch.float32).eps * magnitudes.max()
    assert (folded - expected).abs().max() <= 2 * e * v.abs().max()
