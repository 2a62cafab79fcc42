"""`torchvision.ops` stand-in: `nms`, `batched_nms`, `box_area`."""

from torchvision.ops.boxes import batched_nms, box_area, nms  # noqa: F401
