"""Reading the `.safetensors` file format without the safetensors library.

A file is 8 bytes (little-endian header length n), n bytes of JSON (`{name: {dtype, shape,
data_offsets}}` plus an optional `__metadata__` of strings), then the tensor bytes
(https://github.com/huggingface/safetensors, "Format"). Reading it here, rather than with
`safetensors.torch.load_file`, puts each tensor straight into its own allocation (no memory map
whose pages double the peak) and lets the header alone be read (a converted file's family and config, its
completeness) without touching the tensors. `minivision.checkpoint` builds the project's converted
format on these functions.
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch

# The dtype names of the header.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int, int]:
    """(header, where the tensor bytes begin, file size) of a `.safetensors` file, reading its header only
    (the module docstring gives the format); a file that does not follow the format is a `ValueError`
    saying what is wrong."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ValueError(f"{size} bytes, shorter than the 8-byte header length")
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            raise ValueError(f"the header claims {header_len} bytes, the file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise ValueError(f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, 8 + header_len, size


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a `.safetensors` file (`read_safetensors_header`), each tensor read from the
    file straight into its own memory.

    Every tensor gets a fresh (64-byte aligned) allocation that the file is read into, with no
    intermediate buffer: aligned like any other tensor, so the math kernels take the same paths, bit
    for bit, as for weights made in memory.
    """
    header, start, size = read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    with open(path, "rb") as f:
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ValueError(f"{name}: dtype {info.get('dtype')!r} is not one of {sorted(SAFETENSORS_DTYPES)}")
            shape, (begin, end) = info["shape"], info["data_offsets"]
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or start + end > size:
                raise ValueError(f"{name}: bytes {begin}..{end} do not hold a {dtype} tensor of shape {shape} "
                                 f"in a file of {size} bytes (truncated?)")
            data = torch.empty(nbytes, dtype=torch.uint8)
            f.seek(start + begin)
            view, done = memoryview(data.numpy()), 0
            while done < nbytes:  # one read() returns at most ~2 GiB
                n = f.readinto(view[done:])
                if not n:
                    raise ValueError(f"{name}: the file ends inside it (truncated?)")
                done += n
            tensors[name] = data.view(dtype).view(shape)
    return metadata, tensors


def looks_like_safetensors(path: str | os.PathLike) -> bool:
    """True when the file starts like a safetensors file: an 8-byte header length, then `{`."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < (1 << 32)
