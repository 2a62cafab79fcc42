"""Hugging Face model folders in and out (`python -m weights_convert sam|florence2 DIR out.safetensors`,
`--to-hf OUT_DIR`), against transformers' own `SamModel` and `Florence2ForConditionalGeneration`.

- Folders written by transformers' `save_pretrained` (seeded random weights, sizes that are no
  preset: a 2-block SAM at 160 pixels with a narrower decoder, the tiny Florence-2) convert with
  their config.json alone and give transformers' outputs: SAM image embeddings, mask logits and
  IoU within 1e-4 of their std (DESIGN.md; masks identical away from the 0.0 threshold),
  Florence-2 logits within 1e-4 and greedy ids identical. Sharded folders and pytorch_model.bin
  folders convert to the same tensors.
- `--to-hf` folders load with `from_pretrained` (no missing or unexpected weights) and give our
  outputs; ours -> folder -> ours is bit-exact.
- The original Florence-2 remote-code config.json layout is read too (no transformers needed).
Everything that needs transformers skips with the reason when it is not installed.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers.florence import native_input_ids
from helpers.paths import needs_reference
from official import fill_sam_random, native_florence2, native_florence2_config

import minisam
from miniflorence import Florence2Config, load_florence2, tiny_config
from miniflorence.model import SHARED_KEY, TIED_KEYS
from minivision.checkpoint import CheckpointError, read_converted, save_converted
from minivision.model_folder import read_model_folder
from weights_convert import florence2 as convert_florence2
from weights_convert import sam as convert_sam
from weights_convert.__main__ import main as convert_main

VOCAB = 51289  # our Florence-2 token table; the native one pads it to 51328 (<image> = 51289 first)


def transformers_classes(*names: str) -> list:
    """The named transformers classes, or skip (not installed, or a torchvision stand-in is loaded)."""
    if any(m == "torchvision" or m.startswith("torchvision.") for m in sys.modules):
        pytest.skip("a torchvision (stand-in) is loaded; transformers would try to use it")
    transformers = needs_reference("transformers")
    try:
        return [getattr(transformers, name) for name in names]
    except AttributeError as e:
        pytest.skip(f"this transformers has no {e}")


def run(*argv: object) -> int:
    return convert_main([str(a) for a in argv])


def assert_close_to_scale(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-4) -> None:
    """DESIGN.md's SAM tolerance for embeddings and mask logits: max abs difference <= rel x the reference's std."""
    err, scale = (ours - theirs).abs().max().item(), theirs.float().std().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x std {scale:.3g}"


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key


# ---- SAM ----------------------------------------------------------------------------------------

# A size that is no preset: 2 blocks of width 64 at 160 pixels, windows of 7, MLP ratio 2, and a
# narrower mask decoder; as transformers' SamConfig sub-configs and as minisam's SamConfig.
HF_SAM = {
    "vision_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "global_attn_indexes": [1],
                       "image_size": 160, "window_size": 7, "mlp_dim": 128},
    "prompt_encoder_config": {"image_size": 160, "mask_input_channels": 8},
    "mask_decoder_config": {"mlp_dim": 512, "num_attention_heads": 4, "iou_head_hidden_dim": 64},
}
OURS_SAM = minisam.tiny_config(window_size=7, mlp_ratio=2.0, mask_in_chans=8, decoder_mlp_dim=512,
                               decoder_num_heads=4, iou_head_hidden_dim=64)


@pytest.fixture(scope="module")
def hf_sam(tmp_path_factory):
    """transformers' SamModel of HF_SAM with the seeded weights of tests/reference/official.py, saved by
    `save_pretrained` (whole and sharded), and the model itself (eager attention)."""
    SamConfig, SamModel = transformers_classes("SamConfig", "SamModel")
    model = SamModel(SamConfig(**HF_SAM)).eval()
    seeded = minisam.Sam(OURS_SAM)
    fill_sam_random(seeded, seed=4)
    state = {convert_sam.official_to_hf_key(k): v for k, v in seeded.state_dict().items()}
    state[convert_sam.HF_DUPLICATE[0]] = state[convert_sam.HF_DUPLICATE[1]]
    model.load_state_dict(state, strict=True)
    folder = tmp_path_factory.mktemp("hf_sam")
    model.save_pretrained(folder / "whole")
    model.save_pretrained(folder / "sharded", max_shard_size="300KB")
    model.set_attn_implementation("eager")
    return model, folder


def sam_outputs_hf(model, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        embeddings = model.get_image_embeddings(pixels)
        points = model(image_embeddings=embeddings, input_points=torch.tensor([[[[40.0, 50.0], [120.0, 90.0]]]]),
                       input_labels=torch.tensor([[[1, 0]]]), multimask_output=True)
        box = model(image_embeddings=embeddings, input_boxes=torch.tensor([[[20.0, 30.0, 140.0, 110.0]]]),
                    multimask_output=False)
    return {"embeddings": embeddings, "point_masks": points.pred_masks[:, 0], "point_iou": points.iou_scores[:, 0],
            "box_masks": box.pred_masks[:, 0], "box_iou": box.iou_scores[:, 0]}


def sam_outputs_ours(model: minisam.Sam, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        embeddings = model.image_encoder(pixels)
        points = (torch.tensor([[[40.0, 50.0], [120.0, 90.0]]]), torch.tensor([[1, 0]]))
        point_masks, point_iou = model.decode_masks(embeddings, *model.encode_prompts(points=points), True)
        box = torch.tensor([[20.0, 30.0, 140.0, 110.0]])
        box_masks, box_iou = model.decode_masks(embeddings, *model.encode_prompts(boxes=box), False)
    return {"embeddings": embeddings, "point_masks": point_masks, "point_iou": point_iou,
            "box_masks": box_masks, "box_iou": box_iou}


def assert_sam_outputs_match(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    for name, value in theirs.items():
        assert ours[name].shape == value.shape, name
    for name in ("embeddings", "point_masks", "box_masks"):
        assert_close_to_scale(ours[name], theirs[name])
    for name in ("point_iou", "box_iou"):  # as tests/test_sam_model.py compares them with the official model
        assert (ours[name] - theirs[name]).abs().max().item() <= 1e-5, name
    for name in ("point_masks", "box_masks"):  # thresholded masks: equal wherever the logit is not ~0.0
        clear = theirs[name].abs() > 1e-4 * theirs[name].std()
        assert torch.equal((ours[name] > 0)[clear], (theirs[name] > 0)[clear]), name
        assert 0.05 < (theirs[name] > 0).float().mean() < 0.95, f"{name}: degenerate masks test nothing"


def sam_pixels() -> torch.Tensor:
    return torch.randn(1, 3, 160, 160, generator=torch.Generator().manual_seed(0))


def test_sam_folder_saved_by_transformers_converts_and_matches(hf_sam, tmp_path) -> None:
    model, folder = hf_sam
    assert run("sam", folder / "whole", tmp_path / "ours.safetensors") == 0
    config, _ = read_converted(tmp_path / "ours.safetensors", "sam")
    assert minisam.SamConfig.from_dict(config) == OURS_SAM  # every size from config.json, no --variant
    ours = minisam.load_sam(tmp_path / "ours.safetensors", use_sdpa=False)
    pixels = sam_pixels()
    assert_sam_outputs_match(sam_outputs_ours(ours, pixels), sam_outputs_hf(model, pixels))


def test_sam_sharded_and_bin_folders_give_the_same_file(hf_sam, tmp_path) -> None:
    _, folder = hf_sam
    index = json.loads((folder / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    _, whole, _ = read_model_folder(folder / "whole")
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((folder / "whole" / "config.json").read_text())
    torch.save(whole, bin_folder / "pytorch_model.bin")
    for name, source in (("whole", folder / "whole"), ("sharded", folder / "sharded"), ("bin", bin_folder)):
        assert run("sam", source, tmp_path / f"{name}.safetensors") == 0
    reference = read_converted(tmp_path / "whole.safetensors", "sam")
    for name in ("sharded", "bin"):
        config, tensors = read_converted(tmp_path / f"{name}.safetensors", "sam")
        assert config == reference[0]
        assert_same_tensors(tensors, reference[1])


def test_sam_to_hf_loads_in_transformers_and_round_trips_bit_exact(tmp_path) -> None:
    (SamModel,) = transformers_classes("SamModel")
    seeded = minisam.Sam(OURS_SAM)
    fill_sam_random(seeded, seed=5)
    save_converted(tmp_path / "ours.safetensors", seeded.state_dict(), "sam", OURS_SAM.to_dict())
    assert run("sam", tmp_path / "ours.safetensors", "--to-hf", tmp_path / "hf") == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors",
                                                                  "preprocessor_config.json"]
    theirs, info = SamModel.from_pretrained(tmp_path / "hf", output_loading_info=True, attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ours = minisam.load_sam(tmp_path / "ours.safetensors", use_sdpa=False)
    pixels = sam_pixels()
    assert_sam_outputs_match(sam_outputs_ours(ours, pixels), sam_outputs_hf(theirs.eval(), pixels))
    # ... and back: the same config, the same tensors, bit for bit
    assert run("sam", tmp_path / "hf", tmp_path / "back.safetensors") == 0
    config, tensors = read_converted(tmp_path / "ours.safetensors", "sam")
    config_back, tensors_back = read_converted(tmp_path / "back.safetensors", "sam")
    assert config_back == config
    assert_same_tensors(tensors_back, tensors)


def test_sam_preprocessor_config_loads(tmp_path) -> None:
    """The preprocessor_config.json --to-hf writes is transformers' SamImageProcessor at the model's size."""
    (AutoImageProcessor,) = transformers_classes("AutoImageProcessor")
    seeded = minisam.Sam(OURS_SAM)
    save_converted(tmp_path / "ours.safetensors", seeded.state_dict(), "sam", OURS_SAM.to_dict())
    assert run("sam", tmp_path / "ours.safetensors", "--to-hf", tmp_path / "hf") == 0
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    image = torch.randint(0, 256, (3, 100, 200), dtype=torch.uint8).numpy().transpose(1, 2, 0)
    assert tuple(processor(image, return_tensors="pt")["pixel_values"].shape) == (1, 3, 160, 160)


def test_sam_config_json_fields_that_minisam_does_not_implement_are_refused() -> None:
    base = {"model_type": "sam", **HF_SAM}
    assert convert_sam.config_from_hf({"config.json": base}) == OURS_SAM
    cases = {
        "vision_config.hidden_act": ("vision_config", "hidden_act", "relu"),
        "vision_config.use_abs_pos": ("vision_config", "use_abs_pos", False),
        "prompt_encoder_config.image_size is 1024; with the other fields it must be 160": (
            "prompt_encoder_config", "image_size", 1024),
        "mask_decoder_config.hidden_size is 128": ("mask_decoder_config", "hidden_size", 128),
    }
    for message, (part, field, value) in cases.items():
        config = json.loads(json.dumps(base))
        config[part][field] = value
        with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
            convert_sam.config_from_hf({"config.json": config})
    with pytest.raises(CheckpointError, match="model_type 'sam2' is not 'sam'"):
        convert_sam.config_from_hf({"config.json": {**base, "model_type": "sam2"}})


# ---- Florence-2 ---------------------------------------------------------------------------------

FLORENCE = tiny_config(image_size=64)


@pytest.fixture(scope="module")
def hf_florence(tmp_path_factory):
    """transformers' native Florence-2 of the tiny config, seeded, saved by `save_pretrained` (whole, and
    sharded), with a preprocessor_config.json at 64 pixels; the model itself (eager attention)."""
    transformers_classes("Florence2ForConditionalGeneration")
    model = native_florence2(FLORENCE, seed=6)
    folder = tmp_path_factory.mktemp("hf_florence")
    for name, shard in (("whole", None), ("sharded", "1MB")):
        model.save_pretrained(folder / name, **({"max_shard_size": shard} if shard else {}))
        (folder / name / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 64, "width": 64}}))
    return model, folder


def florence_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 64, 64, generator=g)
    prompt = torch.tensor([[0, 100, 200, 300, 2], [0, 4000, 5000, 6000, 2]])
    decoder = torch.tensor([[2, 0, 7, 11], [2, 0, 9, 13]])
    return pixels, prompt, decoder


def assert_florence_matches(ours, theirs) -> None:
    """Logits within 1e-4 over our vocabulary, and greedy ids identical (transformers' generate, same settings)."""
    pixels, prompt, decoder = florence_inputs()
    image_tokens = ours.encode_image(pixels[:1]).shape[1]
    with torch.no_grad():
        expected = theirs(input_ids=native_input_ids(prompt, image_tokens), pixel_values=pixels,
                          decoder_input_ids=decoder).logits
        got = ours(pixels, prompt, decoder)
        assert (got - expected[..., :VOCAB]).abs().max().item() <= 1e-4
        ids = ours.generate(pixels, prompt, max_new_tokens=12, num_beams=1, no_repeat_ngram_size=0)
        reference = theirs.generate(input_ids=native_input_ids(prompt, image_tokens), pixel_values=pixels,
                                    max_new_tokens=12, num_beams=1, do_sample=False, no_repeat_ngram_size=0,
                                    forced_bos_token_id=0, forced_eos_token_id=2, decoder_start_token_id=2)
    assert reference.max().item() < VOCAB, "the reference picked a padding row; choose another seed"
    assert torch.equal(ids, reference), f"{ids.tolist()} != {reference.tolist()}"


def test_florence_folder_saved_by_transformers_converts_and_matches(hf_florence, tmp_path) -> None:
    model, folder = hf_florence
    assert run("florence2", folder / "whole", tmp_path / "ours.safetensors") == 0
    assert run("florence2", folder / "sharded", tmp_path / "sharded.safetensors") == 0
    config, tensors = read_converted(tmp_path / "ours.safetensors", "florence2")
    assert Florence2Config.from_dict(config) == FLORENCE  # sizes from config.json, image size from the preprocessor
    config_sharded, tensors_sharded = read_converted(tmp_path / "sharded.safetensors", "florence2")
    assert config_sharded == config
    assert_same_tensors(tensors_sharded, tensors)
    assert_florence_matches(load_florence2(tmp_path / "ours.safetensors", use_sdpa=False), model)


def test_florence_to_hf_loads_in_transformers_and_round_trips_bit_exact(tmp_path) -> None:
    (Florence2ForConditionalGeneration,) = transformers_classes("Florence2ForConditionalGeneration")
    native = native_florence2(FLORENCE, seed=8)
    _, tensors = convert_florence2.convert_tensors(native.state_dict(), config=FLORENCE)
    save_converted(tmp_path / "ours.safetensors", tensors, "florence2", FLORENCE.to_dict())
    assert run("florence2", tmp_path / "ours.safetensors", "--to-hf", tmp_path / "hf") == 0
    theirs, info = Florence2ForConditionalGeneration.from_pretrained(
        tmp_path / "hf", output_loading_info=True, attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert theirs.config.image_token_id == VOCAB and theirs.config.text_config.vocab_size == 51328
    assert_florence_matches(load_florence2(tmp_path / "ours.safetensors", use_sdpa=False), theirs.eval())
    # ... and back, bit for bit
    assert run("florence2", tmp_path / "hf", tmp_path / "back.safetensors") == 0
    config, tensors = read_converted(tmp_path / "ours.safetensors", "florence2")
    config_back, tensors_back = read_converted(tmp_path / "back.safetensors", "florence2")
    assert config_back == config
    assert_same_tensors(tensors_back, tensors)


def test_florence_to_hf_key_table_is_the_native_one() -> None:
    """Our names -> native names covers transformers' state_dict exactly, and reads back through NATIVE_RENAMES."""
    transformers_classes("Florence2ForConditionalGeneration")
    from transformers import Florence2ForConditionalGeneration

    with torch.device("meta"):
        native = Florence2ForConditionalGeneration(native_florence2_config(FLORENCE))
    ours = [k for k in convert_florence2.expected_shapes(FLORENCE) if k not in (*TIED_KEYS, convert_florence2.BIAS_KEY)]
    native_names = {convert_florence2.rename_original(k) for k in ours}
    tied = {"lm_head.weight", "model.language_model.encoder.embed_tokens.weight",
            "model.language_model.decoder.embed_tokens.weight"}  # transformers ties them to `shared`
    assert native_names == set(native.state_dict()) - tied
    assert all(convert_florence2.rename_native(convert_florence2.rename_original(k)) == k for k in ours)


def original_config_json(config: Florence2Config) -> dict:
    """config.json as the original remote code (microsoft/Florence-2-*) lays it out."""
    return {
        "model_type": "florence2", "vocab_size": config.vocab_size, "projection_dim": config.projection_dim,
        "architectures": ["Florence2ForConditionalGeneration"],
        "vision_config": {
            "model_type": "davit", "dim_embed": list(config.dims), "depths": list(config.depths),
            "num_heads": list(config.heads), "num_groups": list(config.channel_groups),
            "window_size": config.window_size, "patch_size": list(config.patch_sizes),
            "patch_stride": list(config.patch_strides), "patch_padding": list(config.patch_paddings),
            "patch_prenorm": list(config.patch_prenorm), "drop_path_rate": config.drop_path_rate,
            "projection_dim": config.projection_dim, "enable_checkpoint": False,
            "visual_temporal_embedding": {"type": "COSINE", "max_temporal_embeddings": config.max_temporal_embeddings},
            "image_pos_embed": {"type": "learned_abs_2d", "max_pos_embeddings": config.image_pos_embed_size},
            "image_feature_source": ["spatial_avg_pool", "temporal_avg_pool"],
        },
        "text_config": {
            "model_type": "florence2_language", "vocab_size": config.vocab_size, "d_model": config.d_model,
            "encoder_layers": config.encoder_layers, "decoder_layers": config.decoder_layers,
            "encoder_attention_heads": config.encoder_heads, "decoder_attention_heads": config.decoder_heads,
            "encoder_ffn_dim": config.encoder_ffn_dim, "decoder_ffn_dim": config.decoder_ffn_dim,
            "max_position_embeddings": config.max_position_embeddings, "activation_function": "gelu",
            "dropout": config.dropout, "attention_dropout": config.attention_dropout,
            "activation_dropout": config.activation_dropout, "scale_embedding": False, "normalize_before": False,
            "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 2,
            "forced_bos_token_id": 0, "forced_eos_token_id": 2, "num_beams": 3, "no_repeat_ngram_size": 3,
        },
    }


def test_florence_original_remote_code_folder(tmp_path) -> None:
    """config.json in the remote code's layout + pytorch_model.bin in the original key layout (no transformers)."""
    from official import seeded_florence2_fill

    config = tiny_config()
    state = seeded_florence2_fill({k: torch.zeros(s) for k, s in convert_florence2.expected_shapes(config).items()}, 3)
    for key in TIED_KEYS:
        state[key] = state[SHARED_KEY]
    folder = tmp_path / "Florence-2-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(original_config_json(config)))
    torch.save(state, folder / "pytorch_model.bin")
    assert convert_florence2.config_from_hf({"config.json": original_config_json(config)}) == config
    assert run("florence2", folder, tmp_path / "ours.safetensors") == 0
    converted_config, tensors = read_converted(tmp_path / "ours.safetensors", "florence2")
    assert converted_config == config.to_dict()
    assert_same_tensors(tensors, {k: v for k, v in state.items() if k not in TIED_KEYS})


def test_florence_tokens_after_image_are_refused() -> None:
    """A native fine-tune whose tokenizer added tokens after <image> would lose their rows: refused, named."""
    native_config = {"model_type": "florence2", "image_token_id": VOCAB, "vision_config": {},
                     "text_config": {"model_type": "bart"}}
    jsons = {"config.json": native_config, "added_tokens.json": {"<DocVQA>": VOCAB + 1, "<image>": VOCAB}}
    with pytest.raises(CheckpointError, match=r"1 token\(s\) after <image> \(51289\): <DocVQA> \(51290\)"):
        convert_florence2.config_from_hf(jsons)


def test_florence_to_hf_refuses_a_final_logits_bias() -> None:
    """transformers' Florence-2 has no final_logits_bias: a non-zero one cannot be carried over silently."""
    shapes = convert_florence2.expected_shapes(FLORENCE)
    tensors = {k: torch.zeros(s) for k, s in shapes.items() if k not in TIED_KEYS}
    tensors[convert_florence2.BIAS_KEY] = torch.full((1, VOCAB), 0.5)
    with pytest.raises(CheckpointError, match="final_logits_bias is not zero"):
        convert_florence2.to_hf(FLORENCE.to_dict(), tensors)


def test_fields_a_config_json_leaves_out_take_transformers_defaults() -> None:
    """An empty sub-config reads as transformers' default config does (SAM: vit_b; Florence-2: base's DaViT
    with bart-large's text model)."""
    SamConfig, Florence2Config_ = transformers_classes("SamConfig", "Florence2Config")
    sam_default = convert_sam.config_from_hf({"config.json": SamConfig().to_dict()})
    assert sam_default == convert_sam.config_from_hf({"config.json": {"model_type": "sam"}}) == minisam.CONFIGS["vit_b"]
    empty = {"model_type": "florence2", "vision_config": {}, "text_config": {}}
    florence_default = convert_florence2.config_from_hf({"config.json": Florence2Config_().to_dict()})
    assert florence_default == convert_florence2.config_from_hf({"config.json": empty})
