"""A training script's settings: one dataclass, its command line, its checks, and what may change on resume.

- `TrainSettings`, the fields every script has (data, output folder, starting weights, batch,
  precision, checkpointing...); each script's `Settings` adds its own and sets its defaults;
- `parse_command_line`: `--field value` overrides of the dataclass (booleans `--field` /
  `--no-field`); `--help` opens with the script's copy-pasteable examples and shows each option's
  help (the comment after its field in the source) and its default;
- `check_settings`: every value checked before anything runs, one line naming the option;
- resuming: `RESUME_MAY_CHANGE` (what a `--resume` may change), `RENAMED_SETTINGS` (old names in
  old checkpoints and on old command lines), `settings_changes` (what a resume would change);
- `read_config`: a model config from a JSON file, with one-line errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import textwrap
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

S = TypeVar("S")

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainSettings:
    """The settings every training script shares; a script's `Settings` subclasses it.

    A subclass gives its own defaults by declaring a field again (`out`, `model`, `epochs`, ...);
    the field keeps its place, so every script's `--help` lists these options in this order.
    """

    data: str = ""  # training data (what the script reads: see above)
    out: str = "runs/train"  # the run folder: settings.json, metrics.jsonl, last.pt, best/last.safetensors
    checkpoint: str | None = None  # starting weights: a converted .safetensors, or a run folder (its best)
    from_scratch: bool = False  # no --checkpoint: train random weights of --model (must be asked for)
    model: str = ""  # the architecture built with --from-scratch
    seed: int = 0  # seeds every random draw: the same seed gives the same run
    epochs: int = 10  # passes over the training data
    batch_size: int = 4  # samples per process and micro-batch
    accum_steps: int = 1  # micro-batches whose gradients add up to one optimizer step
    weight_decay: float = 0.01  # AdamW weight decay
    clip_grad: float = 1.0  # max gradient norm; 0: measured, not clipped
    precision: str = "auto"  # auto: bf16 autocast on CUDA, exact fp32 on CPU; fp32; bf16 (CPU too: pays with AMX)
    device: str = "auto"  # auto (CUDA if present), cpu, cuda or cuda:N
    workers: int = 0  # DataLoader worker processes; 0: load in the training process
    save_every: int = 0  # optimizer steps between last.pt writes; 0: once per epoch
    stop_after: int = 0  # stop after this many optimizer steps (as if interrupted); 0: never
    resume: bool = False  # continue from OUT/last.pt; settings not given are the checkpoint's
    overwrite: bool = False  # start a new run in an --out that holds one (its checkpoints are replaced)
    progress: bool = True  # a progress bar (only when stderr is a terminal)


# Settings renamed since: old name -> (new name, old value -> new value), so that an old last.pt resumes;
# on the command line the old flags are refused with the new spelling (`RENAMED_FLAGS`).
# --bf16 (autocast on CUDA only) is --precision auto; --no-bf16 is --precision fp32.
RENAMED_SETTINGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "bf16": ("precision", lambda on: "auto" if on else "fp32"),
}
RENAMED_FLAGS = {"--bf16": "--precision auto (bf16 autocast on CUDA, fp32 on CPU)",
                 "--no-bf16": "--precision fp32"}


class _Parser(argparse.ArgumentParser):
    """argparse with its error as one line (argparse prints the whole usage block first)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def script_name(cls: type) -> str:
    """`python -m train.sam` for a class defined in train/sam.py, also when it runs as `__main__`."""
    module = cls.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else Path(sys.argv[0]).stem
    return f"python -m {module}"


def field_comments(cls: type) -> dict[str, str]:
    """The comment after each field in the source of `cls` and its bases (the subclass's wins): its help."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass) if dataclasses.is_dataclass(klass) else ""
        except (OSError, TypeError):
            source = ""
        comments.update(re.findall(r"^\s+(\w+): [^=\n]+=[^#\n]*#\s*(.+)$", source, flags=re.MULTILINE))
    return comments


def parse_command_line(
    cls: type[S], argv: Sequence[str] | None = None, prog: str | None = None, examples: str = "",
) -> tuple[S, set[str]]:
    """The dataclass `cls` from its defaults and `--field value` overrides, and the names of the
    fields given on the command line (`--resume` takes the others from the checkpoint).

    Booleans take `--field` / `--no-field`; `str | None` fields accept the string "none". The help
    opens with `examples` (copy-pasteable command lines), then the class docstring (what the data
    must look like), then each option with its help (the comment after the field in the source) and
    default. An unknown option, a renamed one (`RENAMED_FLAGS`) or a value of the wrong type is one
    line on stderr and exit status 2. `prog`: the command in messages (default: `script_name(cls)`).
    """
    prog = prog or script_name(cls)
    hints = typing.get_type_hints(cls)
    shown = textwrap.indent(inspect.cleandoc(examples), "  ")
    description = (f"examples:\n{shown}\n\n" if examples else "") + inspect.cleandoc(cls.__doc__ or "")
    parser = _Parser(prog=prog, usage="%(prog)s [--option VALUE ...]", description=description,
                     formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    comments, defaults = field_comments(cls), {}
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        defaults[field.name] = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        shown = '""' if defaults[field.name] == "" else defaults[field.name]
        help_text = f"{comments.get(field.name, '')} (default: {shown})".strip()
        if base is bool:
            parser.add_argument(flag(field.name), action=argparse.BooleanOptionalAction, help=help_text)
        else:
            def convert(text: str, base: type = base, optional: bool = optional) -> Any:
                return None if optional and text.lower() == "none" else base(text)

            convert.__name__ = base.__name__  # argparse says "invalid int value: 'x'"
            parser.add_argument(flag(field.name), type=convert, metavar=base.__name__.upper(), help=help_text)
    argv = list(argv) if argv is not None else sys.argv[1:]
    for old, new in RENAMED_FLAGS.items():
        if old in argv and old[2:].removeprefix("no-").replace("-", "_") not in defaults:
            parser.error(f"{old} was renamed: use {new}")
    given = vars(parser.parse_args(argv))
    return cls(**{**defaults, **given}), set(given)


def parse_settings(
    cls: type[S], argv: Sequence[str] | None = None, prog: str | None = None, examples: str = "",
) -> S:
    """Build the dataclass `cls` from its defaults and `--field value` overrides (`parse_command_line`)."""
    return parse_command_line(cls, argv, prog, examples)[0]


def flag(name: str) -> str:
    """The command-line option of a field: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


# Limits every script's settings share (where it has the field); each script adds its own.
COMMON_LIMITS = {"seed": "[0,4294967295]", "epochs": ">=1", "batch_size": ">=1", "accum_steps": ">=1",
                 "workers": ">=0", "save_every": ">=0", "stop_after": ">=0", "weight_decay": ">=0",
                 "clip_grad": ">=0"}
COMMON_CHOICES = {"precision": PRECISIONS}


def _within(value: float, rule: str) -> bool:
    """`rule` is ">=A", ">A", or an interval such as "[A,B)" / "(A,B]"."""
    if rule.startswith(">"):
        bound = float(rule.lstrip(">="))
        return value >= bound if rule.startswith(">=") else value > bound
    low, high = (float(x) for x in rule[1:-1].split(","))
    above = value >= low if rule[0] == "[" else value > low
    below = value <= high if rule[-1] == "]" else value < high
    return above and below


def check_settings(s: Any, limits: dict[str, str], choices: dict[str, Sequence[str]]) -> None:
    """Refuse a bad value before anything runs, with one line naming the option and what is allowed.

    Every float must be finite; `choices` (over `COMMON_CHOICES`) maps a field to its allowed
    strings; `limits` (over `COMMON_LIMITS`) maps a field to a rule: ">=1", ">0", "[0,1)", "(0,1]",
    ... A None value (an optional setting left unset) passes.
    """
    for field in dataclasses.fields(s):
        value = getattr(s, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag(field.name)} must be a finite number, not {value}")
    for name, allowed in {**{k: v for k, v in COMMON_CHOICES.items() if hasattr(s, k)}, **choices}.items():
        if getattr(s, name) not in allowed:
            raise ValueError(f"{flag(name)} must be one of {', '.join(allowed)}; not {getattr(s, name)!r}")
    rules = {**{k: v for k, v in COMMON_LIMITS.items() if hasattr(s, k)}, **limits}
    for name, rule in rules.items():
        value = getattr(s, name)
        if value is not None and not _within(value, rule):
            where = f">= {rule[2:]}" if rule.startswith(">=") else f"> {rule[1:]}" if rule[0] == ">" else f"in {rule}"
            raise ValueError(f"{flag(name)} must be {where}, not {value}")


# Settings that may differ on --resume: they cannot change what is trained, only where it is
# written and how it is shown. The output folder (it may have moved), when last.pt is written and
# where the run stops (resuming is exact from any step), the progress bar, the DataLoader workers
# (every random draw of a sample comes from its own seeded generator, never from a worker's RNG),
# the evaluation before training (done by the first start only), and the flags of starting itself
# (a resumed run starts from last.pt, whatever its first weights were).
# Besides these, --epochs may be raised (the schedule then stretches to the new end); any other
# difference is refused, listed as "--setting: saved -> given", as is another number of torchrun
# processes (the checkpoint counts its place in an epoch in per-process batches).
RESUME_MAY_CHANGE = frozenset({"out", "resume", "overwrite", "save_every", "stop_after", "progress", "workers",
                               "val_before", "compile", "from_scratch"})


def upgrade_settings(saved: dict[str, Any], settings: Any) -> dict[str, Any]:
    """Settings saved in a checkpoint, with the names and values of `settings`' script today
    (`RENAMED_SETTINGS`, where the script has the new name and no longer the old one)."""
    upgraded, known = dict(saved), {field.name for field in dataclasses.fields(settings)}
    for old, (new, convert) in RENAMED_SETTINGS.items():
        if old in upgraded and new not in upgraded and new in known and old not in known:
            upgraded[new] = convert(upgraded.pop(old))
    return upgraded


def settings_changes(saved: dict[str, Any], settings: Any) -> list[str]:
    """The differences between the settings in a checkpoint and `settings` that would change the
    run, as "--setting: saved -> given" (see `RESUME_MAY_CHANGE`). A setting the checkpoint lacks
    (added to the script since) counts as its default; one the script lacks is a difference."""
    saved, changes = upgrade_settings(saved, settings), []
    for field in dataclasses.fields(settings):
        given = getattr(settings, field.name)
        old = saved.get(field.name, field.default)
        if field.name in RESUME_MAY_CHANGE or old == given or (field.name == "epochs" and given > old):
            continue
        changes.append(f"{flag(field.name)}: {old!r} -> {given!r}")
    known = {field.name for field in dataclasses.fields(settings)}
    changes += [f"{flag(name)}: {value!r} -> (not a setting of this script)" for name, value in saved.items()
                if name not in known]
    return changes


def one_line(error: BaseException) -> str:
    """An error's message on one line (its lines joined by '; ')."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def read_json_object(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A JSON file holding one object (a config); a missing or malformed file is one line naming it
    and `what` it should hold."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected {what})")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{path}: not {what}: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a JSON {type(obj).__name__}, expected {what}")
    return obj


def read_config(path: str | os.PathLike, from_dict: Callable[[dict[str, Any]], S], what: str) -> S:
    """A model config from a JSON file of its fields (`from_dict`, e.g. `ConvMAEConfig.from_dict`); a
    missing or malformed file, or a field or value `what` refuses, is one line naming the file."""
    fields = read_json_object(path, f"an object of {what} fields")
    try:
        return from_dict(fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {one_line(e)}") from None
