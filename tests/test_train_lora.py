"""train.lora: frozen base weights, merge == unmerged outputs (SAM and Florence-2 tiny), the
LoRA-only file round trip, apply_lora == merge_lora, parameter counts, bad targets and files."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers.sam import TINY_SAM
from torch import nn

import miniflorence
import minisam
from miniflorence.model import TIED_KEYS
from minivision.checkpoint import CheckpointError, read_converted, save_converted
from train.lora import (
    TARGET_PRESETS,
    LoRALinear,
    add_lora,
    apply_lora,
    apply_lora_file,
    count_parameters,
    lora_state_dict,
    main,
    merge_lora,
    merged_state_dict,
    read_lora,
    resolve_targets,
    save_lora,
)

FLORENCE_SIZE = 64


def tiny_sam(seed: int = 0) -> minisam.Sam:
    torch.manual_seed(seed)
    return minisam.Sam(TINY_SAM).eval()


def tiny_florence(seed: int = 0) -> miniflorence.Florence2:
    torch.manual_seed(seed)
    return miniflorence.Florence2(miniflorence.tiny_config(image_size=FLORENCE_SIZE)).eval()


def sam_outputs(model: minisam.Sam, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Image -> encoder -> a box and two points -> three low-res masks and IoU predictions."""
    g = torch.Generator().manual_seed(seed)
    S = TINY_SAM.image_size
    image = torch.rand(1, 3, S, S, generator=g) * 255
    points = (torch.rand(2, 2, 2, generator=g) * S, torch.tensor([[1, 0], [1, 1]]))
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [10.0, 3.0, 60.0, 30.0]])
    embeddings = model.encode_image(image)  # (1, C, H, W)
    sparse, dense = model.encode_prompts(points, boxes, None)
    return model.decode_masks(embeddings, sparse, dense, multimask_output=True)


def florence_logits(model: miniflorence.Florence2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 3, FLORENCE_SIZE, FLORENCE_SIZE, generator=g)
    input_ids = torch.randint(3, 500, (2, 7), generator=g)
    decoder_ids = torch.cat([torch.full((2, 1), 2), torch.randint(3, 500, (2, 5), generator=g)], dim=1)
    return model(pixels, input_ids, decoder_ids)  # (2, 6, V)


def merge_bound(model: nn.Module, outputs: torch.Tensor) -> float:
    """How far merged and unmerged outputs may differ: one float32 ulp of the outputs' scale per adapter.

    Merging computes each adapted layer as x (W + s B A)^T instead of x W^T + s (x A^T) B^T: the same
    real number, rounded in another order, so each layer's output moves by about one rounding of its
    own scale (relative eps). Layer norms carry relative errors through, so the outputs' error is at
    most (adapted layers) x eps x max |outputs|: 32 x 1.2e-7 x 30 = 1.1e-4 for the tiny Florence-2
    logits (a few eps observed), 32 x 1.2e-7 x 0.2 = 7.6e-7 for the tiny SAM low-res masks.
    """
    adapted = sum(isinstance(m, LoRALinear) for m in model.modules())  # before merge_lora
    assert adapted > 0
    return adapted * torch.finfo(torch.float32).eps * outputs.abs().max().item()


def randomize_adapters(model: nn.Module, seed: int = 3, scale: float = 0.2) -> None:
    """Give every B a visible value (B starts at zero, where merging changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(".lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)


# ----------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("n_parts, adapted", [(1, (0,)), (3, (0, 2)), (3, (0, 1, 2))])
def test_lora_linear_is_w_plus_scaled_ba(n_parts: int, adapted: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    base = nn.Linear(12, 18)
    layer = LoRALinear(base, rank=4, alpha=8.0, n_parts=n_parts, adapted=adapted)
    assert layer.weight is base.weight and layer.bias is base.bias  # the same tensors, frozen
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    x = torch.randn(5, 3, 12)
    assert torch.equal(layer(x), base(x))  # B = 0: training starts at the base model
    with torch.no_grad():
        layer.lora_B.normal_()
    # independent formula: the update of part p is (alpha / r) B_p A_p in rows p*d .. (p+1)*d
    d = 18 // n_parts
    delta = torch.zeros(18, 12)
    for i, part in enumerate(adapted):
        delta[part * d : (part + 1) * d] = 2.0 * layer.lora_B[i].detach() @ layer.lora_A[i].detach()
    expected = x @ (base.weight + delta).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), delta, rtol=0, atol=1e-6)


def test_init_is_kaiming_uniform_a_and_zero_b() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(400, 30), rank=8, alpha=8.0, n_parts=3, adapted=(0, 2))
    assert layer.lora_A.shape == (2, 8, 400) and layer.lora_B.shape == (2, 10, 8)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / 400**0.5  # kaiming_uniform(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound


def test_dropout_acts_on_the_adapter_only_in_training() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), rank=2, alpha=2.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 16)
    plain = LoRALinear(nn.Linear(16, 16), rank=2, alpha=2.0)
    plain.load_state_dict(layer.state_dict())
    assert torch.equal(layer.eval()(x), plain(x))
    assert not torch.equal(layer.train()(x), plain(x))


# ----------------------------------------------------------------------------- targets


def test_sam_preset_wraps_encoder_attention_and_decoder_attention() -> None:
    model = tiny_sam()
    names = add_lora(model, "sam", rank=4, alpha=4.0)
    depth, decoder_attn = TINY_SAM.encoder_depth, 2 * 3 + 1  # 2 two-way layers x 3 attentions + final
    assert len(names) == 2 * depth + 4 * decoder_attn
    assert "image_encoder.blocks.0.attn.qkv" in names
    assert "mask_decoder.transformer.final_attn_token_to_image.out_proj" in names
    assert not any("mlp" in n or "iou_prediction_head" in n for n in names)
    qkv = model.get_submodule("image_encoder.blocks.0.attn.qkv")
    assert isinstance(qkv, LoRALinear) and qkv.adapted == (0, 2) and qkv.n_parts == 3  # q and v inside qkv


def test_florence_presets() -> None:
    model = tiny_florence()
    names = add_lora(model, "florence2", rank=2, alpha=4.0)
    c = miniflorence.tiny_config()
    assert len(names) == 2 * (c.encoder_layers + 2 * c.decoder_layers)  # q, v of self + cross attention
    assert all(n.startswith("language_model.") and n.endswith(("q_proj", "v_proj")) for n in names)
    vision = add_lora(tiny_florence(), "florence2_vision", rank=2, alpha=4.0)
    assert len(vision) == 2 * 2 * sum(c.depths)  # qkv + proj of the spatial and the channel block
    assert resolve_targets("florence2_all") == TARGET_PRESETS["florence2_language"] + TARGET_PRESETS["florence2_vision"]


def test_bad_targets_are_errors_naming_them() -> None:
    with pytest.raises(ValueError, match=r"'image_encoder\.blocks\.\*\.attn\.qkvv' matches no nn.Linear"):
        add_lora(tiny_sam(), "sam_decoder,image_encoder.blocks.*.attn.qkvv", rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="no LoRA target"):
        add_lora(tiny_sam(), " , ", rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="qkv_parts"):
        add_lora(tiny_sam(), "sam", rank=2, alpha=2.0, qkv_parts="qx")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        add_lora(tiny_sam(), "sam", rank=0, alpha=2.0)
    model = tiny_sam()
    add_lora(model, "sam_encoder", rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, "sam_decoder", rank=2, alpha=2.0)


def test_parameter_counts() -> None:
    model = tiny_sam()
    total_before = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    assert count_parameters(model) == (0, total_before)
    r = 4
    add_lora(model, "sam", rank=r, alpha=4.0)
    C, D = TINY_SAM.encoder_embed_dim, TINY_SAM.prompt_embed_dim
    # A Linear in -> out gets r * (in + out); the encoder's fused qkv gets that for q and for v.
    encoder = TINY_SAM.encoder_depth * (2 * r * (C + C) + r * (C + C))  # qkv (q, v pairs) + proj
    # Decoder attention of internal width D / ds: q, k, v (D -> D/ds) and out_proj (D/ds -> D).
    attention = {ds: 4 * r * (D + D // ds) for ds in (1, 2)}  # self-attention ds 1, cross-attention ds 2
    decoder = 2 * (attention[1] + 2 * attention[2]) + attention[2]  # two two-way layers + the final attention
    expected = encoder + decoder
    trainable, total = count_parameters(model)
    assert trainable == expected == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert total == total_before + trainable


# ----------------------------------------------------------------------------- training and merging


def test_frozen_base_weights_are_bit_identical_after_training() -> None:
    model = tiny_sam()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.requires_grad_(False)
    add_lora(model, "sam", rank=4, alpha=8.0, dropout=0.1)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for step in range(3):
        low_res, iou = sam_outputs(model, seed=step)
        loss = low_res.square().mean() + iou.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # every base tensor, keys unchanged
    adapters = lora_state_dict(model)
    assert set(after) - set(before) == set(adapters)
    assert all(torch.count_nonzero(v) > 0 for k, v in adapters.items() if k.endswith(".lora_B"))  # B did train


@pytest.mark.parametrize("targets", ["sam", "sam_encoder,mask_decoder.iou_prediction_head.layers.*"])
def test_sam_merged_equals_unmerged(targets: str) -> None:
    model = tiny_sam()
    original_keys = list(model.state_dict())
    add_lora(model, targets, rank=4, alpha=8.0)
    randomize_adapters(model)
    with torch.no_grad():
        low_res, iou = sam_outputs(model)
        base_low_res, _ = sam_outputs(tiny_sam())
        state = merged_state_dict(model)
        merged = copy.deepcopy(model)
        merge_lora(merged)
        merged_low_res, merged_iou = sam_outputs(merged)
    assert (low_res - base_low_res).abs().max() > 0.2 * base_low_res.abs().max()  # the adapters change the output ...
    assert (merged_low_res - low_res).abs().max() <= merge_bound(model, low_res)  # ... and merging keeps it
    assert (merged_iou - iou).abs().max() <= merge_bound(model, iou)
    assert list(merged.state_dict()) == original_keys
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert all(torch.equal(merged.state_dict()[k], state[k]) for k in original_keys)
    # the merged weights load into a fresh model strictly, as every loader does
    fresh = minisam.Sam(TINY_SAM).eval()
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(sam_outputs(fresh)[0], merged_low_res)


def test_florence_merged_equals_unmerged() -> None:
    model = tiny_florence()
    original_keys = list(model.state_dict())
    add_lora(model, "florence2_all", rank=4, alpha=8.0)
    randomize_adapters(model)
    with torch.no_grad():
        logits = florence_logits(model)
        base_logits = florence_logits(tiny_florence())
        bound = merge_bound(model, logits)
        merge_lora(model)
        merged_logits = florence_logits(model)
    assert (logits - base_logits).abs().max() > 0.2 * base_logits.abs().max()
    assert (merged_logits - logits).abs().max() <= bound
    assert list(model.state_dict()) == original_keys
    assert model.language_model.lm_head.weight is model.language_model.model.shared.weight  # ties intact


def test_lora_only_file_round_trip_and_apply(tmp_path) -> None:
    base_model = tiny_sam()
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    model = copy.deepcopy(base_model)
    add_lora(model, "sam", rank=3, alpha=6.0)
    randomize_adapters(model)
    save_lora(tmp_path / "adapter.safetensors", model, "sam", "sam")
    tensors, metadata = read_lora(tmp_path / "adapter.safetensors")
    adapters = lora_state_dict(model)
    assert set(tensors) == set(adapters) and all(torch.equal(tensors[k], adapters[k]) for k in adapters)
    assert metadata["base_family"] == "sam" and metadata["rank"] == "3" and float(metadata["alpha"]) == 6.0
    assert metadata["qkv_parts"] == "qv" and metadata["targets"].startswith('["image_encoder.blocks.*.attn.qkv"')
    applied = apply_lora(base, tensors, metadata)
    merged = copy.deepcopy(model)
    merge_lora(merged)
    assert list(applied) == list(base)
    assert all(torch.equal(applied[k], v) for k, v in merged.state_dict().items())  # bit-identical
    assert all(torch.equal(base[k], v) for k, v in base_model.state_dict().items())  # the input is untouched
    # file to file: a converted base + the adapter -> a converted file load_sam reads
    save_converted(tmp_path / "base.safetensors", base, "sam", TINY_SAM.to_dict())
    assert main(["apply", str(tmp_path / "base.safetensors"), str(tmp_path / "adapter.safetensors"),
                 str(tmp_path / "out.safetensors")]) == 0
    loaded = minisam.load_sam(tmp_path / "out.safetensors").eval()
    with torch.no_grad():
        assert torch.equal(sam_outputs(loaded)[0], sam_outputs(merged)[0])


def test_the_lora_file_carries_the_fully_trained_tensors_and_apply_puts_them_in(tmp_path, capsys) -> None:
    """--train-also: the tensors that train fully beside the adapters go into the file whole, and
    apply replaces the base's with them before merging (an adapted Linear that trains too: W + B A)."""
    base_model = tiny_sam()
    model = copy.deepcopy(base_model)
    add_lora(model, "sam_decoder", rank=2, alpha=2.0)
    randomize_adapters(model)
    trained = ["mask_decoder.iou_token.weight", "mask_decoder.transformer.layers.0.self_attn.q_proj.weight"]
    with torch.no_grad():
        for name in trained:  # as training would change them
            model.get_parameter(name).add_(0.5)
    save_lora(tmp_path / "lora.safetensors", model, "sam", "sam_decoder", trained)
    tensors, metadata = read_lora(tmp_path / "lora.safetensors")
    assert set(tensors) == set(lora_state_dict(model)) | set(trained) and metadata["trained"] == json.dumps(trained)
    base = {k: v.clone() for k, v in base_model.state_dict().items()}
    applied = apply_lora(base, tensors, metadata)
    merged = copy.deepcopy(model)
    merge_lora(merged)
    assert all(torch.equal(applied[k], v) for k, v in merged.state_dict().items())  # the trained model, exactly
    assert all(torch.equal(base[k], v) for k, v in base_model.state_dict().items())  # the input is untouched
    save_converted(tmp_path / "base.safetensors", base, "sam", TINY_SAM.to_dict())
    assert main(["apply", str(tmp_path / "base.safetensors"), str(tmp_path / "lora.safetensors"),
                 str(tmp_path / "out.safetensors")]) == 0
    assert capsys.readouterr().out == (f"merged 28 LoRA layers, replaced 2 trained tensors into "
                                       f"{tmp_path / 'out.safetensors'}\n")
    # A file of adapters alone (written before the trained tensors were stored): nothing to replace.
    old = {k: v for k, v in tensors.items() if k.endswith((".lora_A", ".lora_B"))}
    old_metadata = {k: v for k, v in metadata.items() if k != "trained"}
    applied = apply_lora(base, old, old_metadata)
    assert all(torch.equal(applied[k], base[k]) for k in trained if not k.endswith("q_proj.weight"))
    # A tensor that is neither an adapter nor listed, or a trained one that does not fit the base: errors naming it.
    with pytest.raises(CheckpointError, match=r"neither adapters nor listed as trained: mask_decoder\.iou_token"):
        apply_lora(base, tensors, old_metadata)
    smaller = {**base, "mask_decoder.iou_token.weight": torch.zeros(1, 8)}
    with pytest.raises(CheckpointError, match=r"without a base tensor of their shape: mask_decoder\.iou_token\.weight"):
        apply_lora(smaller, tensors, metadata)
    with pytest.raises(ValueError, match="not tensors of the model: nope.weight"):
        save_lora(tmp_path / "bad.safetensors", model, "sam", "sam_decoder", ["nope.weight"])


def test_florence_adapter_applies_to_a_converted_base(tmp_path) -> None:
    base_model = tiny_florence()
    model = copy.deepcopy(base_model)
    add_lora(model, "florence2", rank=2, alpha=2.0)
    randomize_adapters(model)
    base = {k: v for k, v in base_model.state_dict().items() if k not in TIED_KEYS}
    save_converted(tmp_path / "base.safetensors", base, "florence2", base_model.config.to_dict())
    save_lora(tmp_path / "lora.safetensors", model, "florence2", "florence2")
    apply_lora_file(tmp_path / "base.safetensors", tmp_path / "lora.safetensors", tmp_path / "out.safetensors")
    loaded = miniflorence.load_florence2(tmp_path / "out.safetensors").eval()
    with torch.no_grad():
        unmerged = florence_logits(model)
        assert (florence_logits(loaded) - unmerged).abs().max() <= merge_bound(model, unmerged)


def test_bad_lora_files_and_bases_are_clear_errors(tmp_path, capsys) -> None:
    model = tiny_sam()
    add_lora(model, "sam_decoder", rank=2, alpha=2.0)
    save_lora(tmp_path / "lora.safetensors", model, "sam", "sam_decoder")
    tensors, metadata = read_lora(tmp_path / "lora.safetensors")
    base = tiny_sam().state_dict()
    del base["mask_decoder.transformer.layers.0.self_attn.q_proj.weight"]
    missing = r"no such base weight: mask_decoder\.transformer\.layers\.0\.self_attn\.q_proj\.weight"
    with pytest.raises(CheckpointError, match=missing):
        apply_lora(base, tensors, metadata)
    other = minisam.Sam(minisam.tiny_config()).state_dict()  # decoder width 256, not 32
    with pytest.raises(CheckpointError, match="do not fit the base weight"):
        apply_lora(other, tensors, metadata)
    save_converted(tmp_path / "base.safetensors", tiny_sam().state_dict(), "sam", TINY_SAM.to_dict())
    with pytest.raises(CheckpointError, match="not a LoRA-only file"):
        read_lora(tmp_path / "base.safetensors")
    with pytest.raises(ValueError, match="overwrite an input"):
        apply_lora_file(tmp_path / "base.safetensors", tmp_path / "lora.safetensors", tmp_path / "base.safetensors")
    lora = str(tmp_path / "lora.safetensors")
    assert main(["apply", lora, lora, str(tmp_path / "x.safetensors")]) == 1
    assert "has no minivision metadata" in capsys.readouterr().err  # a LoRA file is not a base model
    config, _ = read_converted(tmp_path / "base.safetensors", "sam")  # the inputs were not touched
    assert config == TINY_SAM.to_dict()
