"""Offline conversion of official checkpoints into minivision's `.safetensors` format.

`python -m weights_convert {sam,florence2,convmae} SRC DST [options]`; one module per family
holds its key map as data. `checkpoint.py` is the one place files are read and written.
"""

from weights_convert.checkpoint import (
    CheckpointError,
    check_tensors,
    load_strict,
    read_converted,
    read_official,
    save_converted,
)

__all__ = ["CheckpointError", "check_tensors", "load_strict", "read_converted", "read_official", "save_converted"]
