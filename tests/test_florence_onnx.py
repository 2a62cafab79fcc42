"""miniflorence.onnx: the three exported graphs on onnxruntime against miniflorence in PyTorch.

A tiny Florence-2 (the structure of base, narrow widths, the real vocabulary) with seeded random
weights, exported at 96 x 96. Each graph's outputs are compared with the PyTorch stage they export
(max abs difference within 1e-4 of the tensor's standard deviation, DESIGN.md's Florence-2 logits
tolerance), and the numpy greedy loop over onnxruntime must give exactly the ids of
`Florence2.generate(..., num_beams=1)`, with and without a padding mask.
Skips only when the `[onnx]` extra (onnx, onnxscript, onnxruntime) is not installed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

for _name in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(_name, reason=f"{_name} is not installed: pip install 'minivision[onnx]'")

from helpers.paths import ROOT
from official import seeded_florence2_fill

from miniflorence import Florence2, Florence2Config
from miniflorence.language_model import KVCache
from miniflorence.onnx import OnnxFlorence2, export_florence2, kv_names, main
from minivision.checkpoint import save_converted

# Tiny, NOT official: base's structure (four DaViT stages, 6 blocks, window padding at 96 x 96), narrow.
CONFIG = Florence2Config(
    dims=(16, 32, 48, 64), depths=(1, 1, 2, 1), heads=(2, 2, 3, 4), channel_groups=(2, 2, 3, 4), window_size=4,
    drop_path_rate=0.0, image_size=96, projection_dim=32, d_model=32, encoder_layers=2, decoder_layers=2,
    encoder_heads=4, decoder_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
)
EOS, PAD = CONFIG.eos_token_id, CONFIG.pad_token_id
MAX_NEW_TOKENS = 24


def make_model(config: Florence2Config, seed: int) -> Florence2:
    model = Florence2(config).eval()
    model.load_state_dict(seeded_florence2_fill(model.state_dict(), seed))
    with torch.no_grad():  # EOS likelier: with seed 5, rows end at different steps, some at the forced EOS
        model.language_model.final_logits_bias[0, EOS] = 2.0
    return model


@pytest.fixture(scope="module")
def model() -> Florence2:
    return make_model(CONFIG, seed=5)


@pytest.fixture(scope="module")
def runner(model: Florence2, tmp_path_factory) -> OnnxFlorence2:
    folder = tmp_path_factory.mktemp("florence_onnx")
    export_florence2(model, folder, check=False)
    return OnnxFlorence2(folder)


def inputs(image_size: int, seed: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """3 images and prompts `<s> ... </s>`; with `padded`, shorter prompts right-padded, and the mask."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 50265, (3, 8), generator=g)
    prompt[:, 0], prompt[:, 7] = 0, EOS
    mask = None
    if padded:
        prompt[1, 5], prompt[1, 6:] = EOS, PAD
        prompt[2, 3], prompt[2, 4:] = EOS, PAD
        mask = (prompt != PAD).long()
    return torch.randn(3, 3, image_size, image_size, generator=g), prompt, mask


def assert_close_to_scale(got: np.ndarray, expected: torch.Tensor, rel: float = 1e-4) -> float:
    got = torch.from_numpy(got)
    assert got.shape == expected.shape, f"{tuple(got.shape)} != {tuple(expected.shape)}"
    error = (got - expected).abs().max().item()
    scale = expected.std().item()
    assert error <= rel * scale, f"max abs diff {error:.3g} > {rel} x std {scale:.3g}"
    return error


def test_graphs_match_pytorch(model, runner) -> None:
    pixel_values, prompt, mask = inputs(CONFIG.image_size, seed=1, padded=True)
    (features,) = runner.sessions["vision"].run(None, {"pixel_values": pixel_values.numpy()})
    encoded = runner.encode(pixel_values.numpy(), prompt.numpy(), mask.numpy())
    with torch.no_grad():
        expected_features = model.encode_image(pixel_values)
        expected_states, expected_mask = model.encode(pixel_values, prompt, mask)
    errors = {
        "image features": assert_close_to_scale(features, expected_features),
        "encoder states": assert_close_to_scale(encoded["encoder_hidden_states"], expected_states),
    }
    np.testing.assert_array_equal(encoded["encoder_attention_mask"], expected_mask.numpy())

    # Three decoder steps from a zero-length cache, against the PyTorch decoder with its own cache.
    layers = CONFIG.decoder_layers
    feeds = {name: encoded[name] for name in ["encoder_attention_mask", *kv_names("cross", layers)]}
    feeds.update({name: np.zeros((3, 4, 0, 8), np.float32) for name in kv_names("past", layers)})
    cache: KVCache | None = None
    for step, token in enumerate([CONFIG.decoder_start_token_id, 0, 1234]):
        ids = torch.full((3, 1), token)
        logits, *present = runner.sessions["decoder"].run(None, {"input_ids": ids.numpy(), **feeds})
        with torch.no_grad():
            expected_logits, cache = model.language_model.decode(ids, expected_states, expected_mask, cache)
        errors[f"logits step {step}"] = assert_close_to_scale(logits, expected_logits)
        for got, (k, _v) in zip(present[::2], cache.self_kv, strict=True):
            assert_close_to_scale(got, k)
        feeds.update(zip(kv_names("past", layers), present, strict=True))
    print("\nmax abs errors: " + ", ".join(f"{k}={v:.1e}" for k, v in errors.items()))


@pytest.mark.parametrize("padded", [False, True], ids=["no mask", "padded with mask"])
def test_greedy_ids_identical_to_pytorch(model, runner, padded: bool) -> None:
    pixel_values, prompt, mask = inputs(CONFIG.image_size, seed=2, padded=padded)
    with torch.no_grad():
        expected = model.generate(pixel_values, prompt, mask, max_new_tokens=MAX_NEW_TOKENS, num_beams=1)
    got = runner.generate(pixel_values.numpy(), prompt.numpy(), None if mask is None else mask.numpy(),
                          max_new_tokens=MAX_NEW_TOKENS)
    np.testing.assert_array_equal(got, expected.numpy())
    rows = got.tolist()
    assert all(row[:2] == [CONFIG.decoder_start_token_id, CONFIG.bos_token_id] for row in rows)  # forced BOS
    lengths = [row.index(EOS, 1) for row in rows]
    assert len(set(map(tuple, rows))) == 3 and len(set(lengths)) > 1, rows  # rows differ; some end early
    assert max(lengths) == MAX_NEW_TOKENS  # ... and one runs into the forced EOS


def test_vision_graph_accepts_only_its_export_size(runner) -> None:
    """DaViT's channel attention scale is frozen at the export size, so the input size is fixed."""
    assert runner.sessions["vision"].get_inputs()[0].shape[1:] == [3, CONFIG.image_size, CONFIG.image_size]
    with pytest.raises(ValueError, match="export size"):
        runner.encode(np.zeros((1, 3, 64, 64), np.float32), np.array([[0, 2]]))


@pytest.fixture(scope="module")
def checkpoint(model: Florence2, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "florence_tiny.safetensors"
    tensors = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    save_converted(path, tensors, "florence2", CONFIG.to_dict())
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}", "{out}"], "no such file"),
        (["{ckpt}", "{file}"], "exists and is not a folder"),
        (["{ckpt}", "{out}", "--image-size", "100"], "multiple of 32"),
        (["{ckpt}", "{out}", "--opset", "17"], "must be between 18 and"),
    ],
)
def test_cli_errors_are_one_line(args, message, checkpoint, tmp_path, capsys) -> None:
    (tmp_path / "file").write_text("")
    paths = {"missing": tmp_path / "nope.safetensors", "ckpt": checkpoint, "out": tmp_path / "out"}
    paths["file"] = tmp_path / "file"
    assert main([a.format(**paths) for a in args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_cli_without_the_onnx_extra(checkpoint, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("minivision.onnx.missing_onnx_packages", lambda: ["onnxruntime"])
    assert main([str(checkpoint), str(tmp_path / "out")]) == 1
    assert "pip install 'minivision[onnx]'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_end_to_end_at_another_size(model, checkpoint, tmp_path) -> None:
    """Exported at 64 x 64 from a converted file: greedy ids equal PyTorch's at 64 x 64."""
    out = tmp_path / "onnx"
    command = [sys.executable, "-m", "miniflorence.onnx", str(checkpoint), str(out), "--image-size", "64"]
    result = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "decoder.onnx: onnxruntime vs PyTorch" in result.stdout
    summary = json.loads((out / "export.json").read_text())
    assert summary["image_size"] == 64 and summary["num_image_tokens"] == 1 + 2 * 2
    pixel_values, prompt, mask = inputs(64, seed=4, padded=True)
    with torch.no_grad():
        expected = model.generate(pixel_values, prompt, mask, max_new_tokens=MAX_NEW_TOKENS, num_beams=1)
    got = OnnxFlorence2(out).generate(pixel_values.numpy(), prompt.numpy(), mask.numpy(), max_new_tokens=MAX_NEW_TOKENS)
    np.testing.assert_array_equal(got, expected.numpy())
