"""Offline conversion of official checkpoints into minivision's `.safetensors` format, and back.

`python -m weights_convert {sam,florence2,convmae} SRC DST [options]` (`--to-official` for the way
back); `__main__.py` does all file I/O, through `checkpoint_format`. One module per family holds
its key map as data and works on dicts of tensors only: `convert_tensors(tensors, **options) ->
(config, tensors)` and `to_official(config, tensors) -> tensors`.
"""
