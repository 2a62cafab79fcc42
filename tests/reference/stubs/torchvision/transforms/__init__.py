"""`torchvision.transforms` stand-in: only `functional` exists."""

from torchvision.transforms import functional  # noqa: F401
