"""Batch jobs that survive a crash and spread over processes: shards, a journal, and the merge.

A batch CLI (`python -m minisam`, `miniflorence`, `convmae` over many images) runs as one process or
under `torchrun` (any number of processes, on one machine or several with a shared output folder):

    torchrun --nproc_per_node 2 -m miniflorence CKPT TOK photos/ --task "<CAPTION>" --out captions.jsonl

- Sharding: input i belongs to rank `i % world` (`RANK`, `WORLD_SIZE` as torchrun sets them), so the
  ranks take turns through the input list and finish at about the same time.
- Journal: every finished input is one JSON line in `OUT.parts/rank<r>.jsonl` (`{"index", ...record}`),
  flushed and synced before the next one starts. A killed run leaves at most one torn line, which
  is ignored. A rerun of the same command skips every input the journal holds, whatever the
  number of processes was, and does only the rest: a million-image job survives a crash.
- The job's identity (the inputs in order and the settings that change results) is written to
  `OUT.parts/job.json`; a rerun with other inputs or settings is refused instead of mixing results.
- Merge: rank 0, once the journal holds every input, writes the output in input order (one atomic
  write) and removes `OUT.parts/`. The other ranks finish their share and exit. The output is then
  the one a single process writes in one go.

No process group is needed (the ranks never talk to each other), only a folder that every rank sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minivision.checkpoint import atomic_write

PARTS_SUFFIX = ".parts"


class JobError(Exception):
    """A job that cannot run as asked (a journal of another job, a bad RANK/WORLD_SIZE): one line."""


@dataclass(frozen=True)
class Shard:
    """This process's place among the job's processes."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Shard:
        """RANK and WORLD_SIZE as torchrun sets them; one process when they are absent."""
        env = os.environ if env is None else env
        try:
            rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        except ValueError as error:
            raise JobError(f"RANK / WORLD_SIZE must be whole numbers (as torchrun sets them): {error}") from None
        if world < 1 or not 0 <= rank < world:
            raise JobError(f"RANK={rank}, WORLD_SIZE={world}: need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE")
        return cls(rank, world)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Input `index` belongs to this rank (round robin)."""
        return index % self.world == self.rank


def parts_folder(out: str | os.PathLike) -> Path:
    """Where the journal of the job writing `out` lives: `OUT.parts/` beside it."""
    out = Path(out)
    return out.with_name(out.name + PARTS_SUFFIX)


def job_identity(inputs: Sequence[str], settings: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two runs the same job: the inputs in order and the settings that change results."""
    digest = hashlib.sha256("\n".join(inputs).encode()).hexdigest()
    settings = json.loads(json.dumps(settings, sort_keys=True))  # as it reads back from job.json
    return {"inputs": len(inputs), "inputs_sha256": digest, "settings": settings}


class Journal:
    """The finished inputs of one job, kept in `OUT.parts/` (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, identity: Mapping[str, Any], shard: Shard) -> None:
        self.out = Path(out)
        self.folder = parts_folder(out)
        self.shard = shard
        self.identity = dict(identity)
        self.folder.mkdir(exist_ok=True)
        self._check_identity()
        self._file = self.folder / f"rank{shard.rank}.jsonl"

    def _check_identity(self) -> None:
        job = self.folder / "job.json"
        if job.exists():
            try:
                saved = json.loads(job.read_text())
            except (OSError, ValueError):
                saved = None  # torn by a crash while it was written: every rank writes the same text again
            if saved is not None and saved != self.identity:
                raise JobError(
                    f"{self.folder} holds the journal of an interrupted job with other inputs or settings; "
                    f"rerun that job's command to finish it, or delete {self.folder} to start this one"
                )
        # Every rank writes the same text, so concurrent writers leave the same file.
        atomic_write(job, lambda tmp: tmp.write_text(json.dumps(self.identity, sort_keys=True)))

    def records(self) -> dict[int, dict[str, Any]]:
        """Every finished input's record, by input index (all ranks' files; the first record of an index wins)."""
        found: dict[int, dict[str, Any]] = {}
        for file in sorted(self.folder.glob("rank*.jsonl")):
            for line in file.read_text().splitlines():
                try:
                    record = json.loads(line)
                    index = int(record.pop("index"))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # the torn last line of a killed run
                found.setdefault(index, record)
        return found

    def add(self, index: int, record: Mapping[str, Any]) -> None:
        """Journal input `index` as done; on disk before this returns."""
        line = json.dumps({"index": index, **record}, sort_keys=True)
        with open(self._file, "a") as f:
            if f.tell() and not _ends_with_newline(self._file):
                f.write("\n")  # a killed run's torn line stays on a line of its own
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def side_file(self, index: int, suffix: str) -> Path:
        """A file for input `index`'s bulky result (tensors, pictures), merged with its record."""
        return self.folder / f"{index:09d}{suffix}"

    def wait_for(self, count: int, poll_s: float = 0.2) -> dict[int, dict[str, Any]]:
        """Rank 0: wait until the journal holds all `count` inputs (the other ranks still at work)."""
        while True:
            records = self.records()
            if len(records) >= count:
                return records
            time.sleep(poll_s)

    def remove(self) -> None:
        """After the merge: the journal has served its purpose."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def todo(count: int, journal: Journal) -> Iterator[int]:
    """The indexes of this rank's inputs that the journal does not hold yet, in input order."""
    done = journal.records()
    return (i for i in range(count) if journal.shard.owns(i) and i not in done)
