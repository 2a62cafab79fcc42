"""What every ONNX export of the project shares: tracing a graph, checking it on onnxruntime, writing
the output folder whole, and the command line's one-line errors.

Graphs are traced with PyTorch's `torch.export`-based exporter (`torch.onnx.export(dynamo=True)`,
opset 18 or newer) and, unless told otherwise, run once with onnxruntime on the example inputs:
each output's largest difference from PyTorch, over its largest magnitude, must stay within
`CHECK_TOLERANCE`. Needs the `[onnx]` extra (onnx, onnxscript, onnxruntime); this module imports
them only inside the functions that use them, so importing it never does.

Used by `minisam.onnx` (image encoder, prompt encoder + mask decoder) and `miniflorence.onnx`
(vision tower, encoder, one decoder step).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minivision.checkpoint import resolve_weights

MIN_OPSET = 18  # the torch.export-based exporter writes opset 18 and newer
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
CHECK_TOLERANCE = 1e-3  # relative difference beyond which the export's self-check fails
SUMMARY_FILE = "export.json"


def missing_onnx_packages() -> list[str]:
    """The packages of the `[onnx]` extra that cannot be imported."""
    return [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]


def check_opset(opset: int) -> None:
    """`opset` must be one the exporter writes (18 up to the newest the installed onnx knows)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ValueError(f"--opset {opset}: must be between {MIN_OPSET} and {newest} (the newest this onnx knows)")


def export_graph(
    module: nn.Module,
    example: tuple[Any, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: tuple[Any, ...],
    opset: int,
) -> None:
    """Trace `module` with torch.export and write it to `path` (weights in a side file only past 2 GB)."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation and tracing notices
        program = torch.onnx.export(
            module, example, input_names=list(input_names), output_names=list(output_names),
            dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True, verbose=False,
        )
    written = next(entry.version for entry in program.model_proto.opset_import if entry.domain == "")
    if written != opset:
        raise ValueError(f"--opset {opset}: the exporter wrote opset {written} instead")
    program.save(str(path))


def flatten(values: tuple[Any, ...]) -> list[torch.Tensor]:
    """Graph inputs or outputs in ONNX order: nested lists are spliced in."""
    out: list[torch.Tensor] = []
    for v in values:
        out.extend(v if isinstance(v, (list, tuple)) else [v])
    return out


def onnxruntime_error(path: Path, module: nn.Module, example: tuple[Any, ...], input_names: Sequence[str]) -> float:
    """Largest (max abs difference / largest magnitude) over the outputs, onnxruntime vs PyTorch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: t.numpy() for name, t in zip(input_names, flatten(example))})
    with torch.no_grad():
        expected = module(*example)
    expected = flatten(expected if isinstance(expected, tuple) else (expected,))
    errors = [
        (torch.from_numpy(g).double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-12)
        for g, e in zip(got, expected)
    ]
    return float(max(errors))


def check_graph(path: Path, module: nn.Module, example: tuple[Any, ...], input_names: Sequence[str]) -> None:
    """Run the written graph on onnxruntime; print how far it is from PyTorch, refuse it beyond CHECK_TOLERANCE."""
    error = onnxruntime_error(path, module, example, input_names)
    print(f"{path.name}: onnxruntime vs PyTorch, max abs difference {error:.1e} of the largest value")
    if not error <= CHECK_TOLERANCE:
        raise ValueError(f"{path.name}: onnxruntime differs from PyTorch by {error:.1e} of the largest value")


def check_out_dir(out_dir: str | os.PathLike, force: bool) -> None:
    """An output folder that already holds files is written into only with `force` (the command line's --force)."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ValueError(f"{out_dir}: exists and is not empty; pass --force to overwrite the export in it, or give "
                         "a new folder")


def prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    """The output folder, created if absent; a clear error if it is a file or cannot be written."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder; give an output folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{out_dir}: cannot create the output folder ({error.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"{out_dir}: the output folder is not writable")
    return out_dir


def write_export(out_dir: str | os.PathLike, build: Callable[[Path], dict[str, Any]]) -> Path:
    """Call `build(tmp)` to write the graphs into a temporary folder inside `out_dir`; it returns the summary,
    written as `export.json`. Then every file is moved into `out_dir`: each appears complete or not at all."""
    out_dir = prepare_out_dir(out_dir)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        tmp = Path(tmp)
        summary = build(tmp)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        for path in sorted(tmp.iterdir()):  # the graphs, their weight side files if any, the summary
            os.replace(path, out_dir / path.name)
    return out_dir


def export_main(
    parser: argparse.ArgumentParser, argv: list[str] | None, export: Callable[[argparse.Namespace], dict[str, Path]]
) -> int:
    """The command line of an export: the `[onnx]` extra present, `args.checkpoint` resolved (a run folder
    gives its best.safetensors), a non-empty `args.out_dir` refused without --force (added here, the same
    for every export), `export(args)` run; its errors are one line, exit status 1."""
    parser.add_argument("--force", action="store_true",
                        help="write into an output folder that is not empty (replacing an earlier export's files)")
    args = parser.parse_args(argv)
    missing = missing_onnx_packages()
    if missing:
        print(f"error: ONNX export needs {', '.join(missing)}: pip install 'minivision[onnx]'", file=sys.stderr)
        return 1
    try:
        args.checkpoint = resolve_weights(args.checkpoint)
        check_out_dir(args.out_dir, args.force)
        paths = export(args)
    except (OSError, ValueError) as error:  # missing or wrong checkpoint (CheckpointError), bad folder or options
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in paths.values():
        print(f"wrote {path}")
    return 0
