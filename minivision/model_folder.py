"""Reading a model folder as Hugging Face downloads it: config.json, the other JSON files, and the
weights (model.safetensors or pytorch_model.bin, whole or sharded under an `*.index.json`).

Every tensor file goes through `minivision.checkpoint.read_official` (tensors only, never unpickled
objects, NaN and infinities refused); a folder that does not hold what its index says is a
`CheckpointError` naming the shards and tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from minivision.checkpoint import CheckpointError, first_line, list_names, read_official

# The weight files of a Hugging Face model folder, in the order transformers looks for them.
FOLDER_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def read_model_folder(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, torch.Tensor], list[Path]]:
    """A model folder as Hugging Face downloads it -> (its JSON files by name, tensors, the files read).

    config.json is required; the weights are the first of `FOLDER_WEIGHTS` present (the order
    transformers uses). A sharded `*.index.json` names, for every tensor, the shard that holds it:
    every shard must be present and hold exactly the tensors the index gives it. The other JSON
    files beside config.json (preprocessor_config.json, generation_config.json, tokenizer files)
    are returned too, for the converter to read what it needs from them.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    if not (folder / "config.json").is_file():
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".pth", ".pt", ".bin", ".safetensors"))
        hint = f"; it holds {list_names(found, 4)}: give one of those files instead" if found else ""
        raise CheckpointError(
            f"{folder}: is a folder without config.json, not a model folder (expected config.json with "
            f"model.safetensors, pytorch_model.bin or a sharded *.index.json, as Hugging Face downloads them){hint}"
        )
    jsons = {}
    for file in sorted(folder.glob("*.json")):
        try:
            jsons[file.name] = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            if file.name == "config.json" or file.name in FOLDER_WEIGHTS:
                raise CheckpointError(f"{file}: not readable JSON: {first_line(e)}") from None
    if not isinstance(jsons["config.json"], dict):
        raise CheckpointError(f"{folder / 'config.json'}: holds no JSON object")
    weights = next((folder / name for name in FOLDER_WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: has config.json but no weights (one of {', '.join(FOLDER_WEIGHTS)})")
    if not weights.name.endswith(".index.json"):
        return jsons, read_official(weights), [folder / "config.json", weights]
    weight_map = jsons.get(weights.name, {}).get("weight_map") if isinstance(jsons.get(weights.name), dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{weights}: has no weight_map (tensor name -> shard file)")
    by_shard: dict[str, set[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(str(shard), set()).add(key)
    bad = sorted(s for s in by_shard if Path(s).name != s or s.startswith("."))
    if bad:
        raise CheckpointError(f"{weights}: shard names must be plain file names in the folder: {list_names(bad, 4)}")
    absent = sorted(s for s in by_shard if not (folder / s).is_file())
    if absent:
        raise CheckpointError(
            f"{weights}: {len(absent)} shard(s) absent from the folder (incomplete download?): {list_names(absent, 4)}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for shard, keys in sorted(by_shard.items()):
        found = read_official(folder / shard)
        missing, unlisted = sorted(keys - set(found)), sorted(set(found) - keys)
        if missing or unlisted:
            raise CheckpointError(
                f"{folder / shard}: does not hold what {weights.name} says"
                + (f"; missing: {list_names(missing, 6)}" if missing else "")
                + (f"; not in the index: {list_names(unlisted, 6)}" if unlisted else "")
            )
        tensors.update(found)
    return jsons, tensors, [folder / "config.json", weights, *(folder / s for s in sorted(by_shard))]
