"""Batch jobs that survive a crash and spread over processes: shards, a journal, and the merge.

A batch CLI (`python -m minisam`, `miniflorence`, `convmae` over many images) runs as one process or
under `torchrun` (any number of processes, on one machine or several with a shared output folder):

    torchrun --nproc_per_node 2 -m miniflorence CKPT TOK photos/ --task "<CAPTION>" --out captions.jsonl

- Sharding: input i belongs to rank `i % world` (`RANK`, `WORLD_SIZE` as torchrun sets them), so the
  ranks take turns through the input list and finish at about the same time.
- Journal: every finished input is one JSON line in `OUT.parts/rank<r>.jsonl` (`{"index", ...record}`),
  flushed and synced before the next one starts. A killed run leaves at most one torn line, which
  is ignored. A rerun of the same command skips every input the journal holds, whatever the
  number of processes was, and does only the rest: a million-image job survives a crash. A
  single process keeps the same journal. Bulky results (tensors, pictures) go to side files in
  `OUT.parts/` (`side_file`), written whole before their record; an input skipped as unusable
  (`--skip-bad`) is journaled too (`SKIPPED`), so that the merge knows it is not coming.
- A command line opens its journal `lazy`: nothing is written before the first record, so a run
  refused for a bad input leaves no journal.
- The job's identity (the inputs in order and the settings that change results) is written to
  `OUT.parts/job.json`; a rerun with other inputs or settings is refused instead of mixing results.
- Merge: rank 0, once the journal holds every input, writes the output in input order (one atomic
  write) and removes `OUT.parts/`. The other ranks finish their share and exit. The output is then
  the one a single process writes in one go.

No process group is needed (the ranks never talk to each other), only a folder that every rank sees.
Each rank checks its own share of the inputs before its model loads; a bad input stops that rank
and torchrun stops the others; the journal keeps what was done. One narrow case is not covered: a
rerun of a job killed after its last record but before the merge, in which a rank starts only
after rank 0 has merged: that rank redoes its share into a journal nobody merges (the output is
right; delete the left `OUT.parts/`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minivision.files import atomic_write

PARTS_SUFFIX = ".parts"
SKIPPED = "skipped"  # the key of the record of an input skipped as unusable (--skip-bad): its reason


class JobError(ValueError):
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
    settings = json.loads(json.dumps(settings, sort_keys=True, default=str))  # as it reads back from job.json
    return {"inputs": len(inputs), "inputs_sha256": digest, "settings": settings}


class Journal:
    """The finished inputs of one job, kept in `OUT.parts/` (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, identity: Mapping[str, Any], shard: Shard, lazy: bool = False) -> None:
        """Open the journal of the job writing `out`, refusing one of another job; it is created now, or
        with `lazy` at its first record (a command line that may still refuse its inputs writes nothing)."""
        self.out = Path(out)
        self.folder = parts_folder(out)
        self.shard = shard
        self.identity = dict(identity)
        self._file = self.folder / f"rank{shard.rank}.jsonl"
        self._started = False
        self._check_identity()
        if not lazy:
            self.start()

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

    def start(self) -> None:
        """Create the journal (at the first record): the folder and `job.json`."""
        if self._started:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        # Every rank writes the same text, so concurrent writers leave the same file.
        atomic_write(self.folder / "job.json", lambda tmp: tmp.write_text(json.dumps(self.identity, sort_keys=True)))
        self._started = True

    def records(self) -> dict[int, dict[str, Any]]:
        """Every finished input's record, by input index (all ranks' files; the first record of an index wins)."""
        found: dict[int, dict[str, Any]] = {}
        for file in sorted(self.folder.glob("rank*.jsonl")) if self.folder.is_dir() else []:
            for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                    index = int(record.pop("index"))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # the torn last line of a killed run
                found.setdefault(index, record)
        return found

    def add(self, index: int, record: Mapping[str, Any]) -> None:
        """Journal input `index` as done; on disk before this returns."""
        line = json.dumps({"index": index, **record}, ensure_ascii=False)  # the record's own key order
        self.start()
        with open(self._file, "a", encoding="utf-8") as f:
            if f.tell() and not _ends_with_newline(self._file):
                f.write("\n")  # a killed run's torn line stays on a line of its own
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def side_file(self, index: int, suffix: str) -> Path:
        """A file for input `index`'s bulky result (tensors, pictures), merged with its record; write it
        whole (`minivision.files`) before the record."""
        self.start()
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


def batches(indexes: Iterable[int], size: int) -> Iterator[list[int]]:
    """`indexes` in consecutive lists of at most `size`."""
    batch: list[int] = []
    for index in indexes:
        batch.append(index)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def finish(journal: Journal, count: int, merge: Callable[[list[dict[str, Any]]], None]) -> bool:
    """The end of every rank's run: rank 0 waits until the journal holds all `count` inputs, calls
    `merge` with their records in input order (those skipped as unusable left out; each with its
    "index"), then removes the journal; the other ranks return at once. True where `merge` ran."""
    if not journal.shard.is_main:
        print(f"rank {journal.shard.rank}: its share is done; rank 0 writes {journal.out}", file=sys.stderr)
        return False
    records = journal.wait_for(count)
    merge([{"index": i, **records[i]} for i in range(count) if SKIPPED not in records[i]])
    journal.remove()
    return True


def refuse_several_processes(shard: Shard, what: str) -> None:
    """Under torchrun with several processes, an output that only one process can make (stdout, one
    image's picture) is refused: `what` names it and says what to give instead."""
    if shard.world > 1:
        raise JobError(f"WORLD_SIZE={shard.world}: {what}")
