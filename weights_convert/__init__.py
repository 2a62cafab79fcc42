"""Offline conversion of official checkpoints into minivision's `.safetensors` format, and back.

`python -m weights_convert {sam,florence2,convmae} SRC DST [options]` (`--to-official` for the way
back; for sam and florence2, SRC may be a Hugging Face model folder and `--to-hf OUT_FOLDER` writes
one); `__main__.py` does all file I/O, through `minivision.checkpoint`, and never overwrites its source.
One module per family holds its key map as data and works on dicts of tensors only:
`convert_tensors(tensors, **options) -> (config, tensors)` and `to_official(config, tensors) -> tensors`,
plus `config_from_hf(json files) -> config` and `to_hf(config, tensors) -> (json files, tensors)`
where a Hugging Face layout exists.
"""
