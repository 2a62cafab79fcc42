"""Every training script's `main`: settings from the command line, the process group, and what a
user sees when the run ends early: a user error is one line on stderr (exit status 1), Ctrl-C says
where the run stopped (exit status 130).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from minivision.memory import reuse_freed_memory
from train.distributed import Dist, rank, setup_distributed, teardown_distributed
from train.loop import NonFiniteLossError
from train.run_folder import interrupted_message, settings_to_resume
from train.settings import one_line, parse_command_line, script_name

S = TypeVar("S")


def run_script(
    settings_cls: type[S], train: Callable[[S, Dist], dict], argv: Sequence[str] | None = None, examples: str = "",
) -> dict:
    """Every script's `main`: parse the settings, join the process group, train, leave the group.

    `examples`: copy-pasteable command lines, the first thing `--help` shows.

    - `--resume` takes every setting not given on the command line from OUT/last.pt
      (`settings_to_resume`); `train` then refuses given ones that would change the run.
    - A user error (bad settings or data, a missing or damaged file, a non-finite loss) ends the
      run with one line on stderr and exit status 1, never a traceback.
    - Ctrl-C (SIGINT) ends it with "interrupted at step N; the last checkpoint is step M; rerun
      with --resume" and exit status 130. The checkpoint on disk is whole: it is only ever
      replaced by a rename, and an interrupted write leaves no temporary file. Further Ctrl-Cs
      while the run winds down (a write cleaning up, the message reading last.pt) are ignored:
      each would otherwise cut that work short with a traceback.

    Under torchrun every rank runs this. An error reaches every rank (they read the same files
    and agree on a NaN loss), and each prints its line, prefixed with "[rank R]". Ctrl-C in the
    terminal reaches every rank: rank 0 prints where the run stopped, the others leave quietly,
    all with status 130 (a rank whose collective fails because a peer left first counts as
    interrupted too); torchrun then reports the stopped ranks in its own words.
    """
    interrupted: list[int] = []

    def on_interrupt(signum: int, frame: Any) -> None:
        interrupted.append(signum)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one interrupt is enough; the `finally` restores `previous`
        raise KeyboardInterrupt

    handles_sigint = _main_thread()  # (Python lets only the main thread set signal handlers)
    previous = signal.signal(signal.SIGINT, on_interrupt) if handles_sigint else None
    s = None
    try:
        s, given = parse_command_line(settings_cls, argv, examples=examples)
        if s.resume:
            s = settings_to_resume(s, given)
        reuse_freed_memory()  # the steps' large arrays come back from the heap, not fresh from the system
        return train(s, setup_distributed(s.device))
    except (KeyboardInterrupt, Exception) as e:
        if interrupted or isinstance(e, KeyboardInterrupt):
            if rank() == 0:
                print(interrupted_message(Path(s.out) if s is not None else None), file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        if not isinstance(e, (NonFiniteLossError, ValueError, OSError)):
            raise  # a bug, not a user error: its traceback helps
        where = f"[rank {rank()}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        raise SystemExit(f"{where}{script_name(settings_cls)}: error: {one_line(e)}") from None
    finally:
        teardown_distributed()
        if handles_sigint:  # (None: a handler set outside Python; Python's own stands in for it)
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
