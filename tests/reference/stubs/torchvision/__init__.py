"""A minimal stand-in for torchvision, just enough for the official `segment_anything` to import and run.

Test-only: it lives under tests/reference/stubs and is put on `sys.path` by
`tests/reference/official.py::import_segment_anything()` when no real torchvision loads beside the installed
torch. It reproduces, exactly, the few torchvision calls segment_anything makes:

- `torchvision.transforms.functional.to_pil_image` / `resize` (the PIL path used by
  `ResizeLongestSide.apply_image`): `Image.fromarray` then `PIL.Image.resize((w, h), BILINEAR)`;
- `torchvision.ops.boxes.batched_nms` / `box_area` (the automatic mask generator): greedy NMS in
  the same order and with the same float32 arithmetic as torchvision's CPU kernel.
"""

__version__ = "0.0.0+minivision-stub"

from torchvision import ops, transforms  # noqa: E402,F401
