"""minivision.jobs: round-robin shards, a journal that survives a kill, and refusing to mix two jobs."""

from __future__ import annotations

import pytest

from minivision.jobs import (
    SKIPPED,
    JobError,
    Journal,
    Shard,
    batches,
    finish,
    job_identity,
    parts_folder,
    refuse_several_processes,
    todo,
)


def test_shards_cover_every_input_once() -> None:
    for world in (1, 2, 3, 5):
        owners = [[r for r in range(world) if Shard(r, world).owns(i)] for i in range(17)]
        assert all(len(o) == 1 for o in owners)


def test_shard_from_torchrun_environment() -> None:
    assert Shard.from_env({}) == Shard(0, 1)
    assert Shard.from_env({"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    for env in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(JobError):
            Shard.from_env(env)


def test_journal_skips_done_inputs_whatever_the_number_of_processes(tmp_path) -> None:
    out = tmp_path / "results.jsonl"
    ident = job_identity(["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"], {"task": "<CAPTION>"})
    first = Journal(out, ident, Shard(1, 2))
    for i in todo(5, first):
        first.add(i, {"text": f"image {i}"})
    assert sorted(first.records()) == [1, 3]
    # The rerun has three processes: rank 0 of three owns 0 and 3, and 3 is done already.
    again = Journal(out, ident, Shard(0, 3))
    assert list(todo(5, again)) == [0]
    assert again.records()[3] == {"text": "image 3"}
    assert parts_folder(out).is_dir()


def test_a_torn_last_line_is_ignored_and_the_next_record_stays_readable(tmp_path) -> None:
    out = tmp_path / "results.jsonl"
    ident = job_identity(["a", "b", "c"], {})
    journal = Journal(out, ident, Shard())
    journal.add(0, {"ok": True})
    with open(parts_folder(out) / "rank0.jsonl", "a") as f:
        f.write('{"index": 1, "ok"')  # the process was killed mid-write
    assert sorted(journal.records()) == [0]
    journal.add(1, {"ok": True})
    assert sorted(journal.records()) == [0, 1]
    assert list(todo(3, journal)) == [2]


def test_a_journal_of_another_job_is_refused(tmp_path) -> None:
    out = tmp_path / "results.jsonl"
    Journal(out, job_identity(["a", "b"], {"task": "<OD>"}), Shard())
    with pytest.raises(JobError, match="other inputs or settings"):
        Journal(out, job_identity(["a", "b"], {"task": "<CAPTION>"}), Shard())
    with pytest.raises(JobError, match="delete"):
        Journal(out, job_identity(["a", "c"], {"task": "<OD>"}), Shard())


def test_wait_for_returns_when_every_input_is_journaled_and_remove_clears_it(tmp_path) -> None:
    out = tmp_path / "results.jsonl"
    ident = job_identity(["a", "b"], {})
    rank0, rank1 = Journal(out, ident, Shard(0, 2)), Journal(out, ident, Shard(1, 2))
    rank0.add(0, {"v": 0})
    rank1.add(1, {"v": 1})
    assert rank0.wait_for(2, poll_s=0.01) == {0: {"v": 0}, 1: {"v": 1}}
    rank0.remove()
    assert not parts_folder(out).exists()


def test_a_lazy_journal_writes_nothing_before_its_first_record(tmp_path) -> None:
    out = tmp_path / "new" / "results.jsonl"
    journal = Journal(out, job_identity(["a", "b"], {}), Shard(), lazy=True)
    assert list(todo(2, journal)) == [0, 1] and not (tmp_path / "new").exists()
    journal.add(1, {"v": 1})
    assert sorted(p.name for p in parts_folder(out).iterdir()) == ["job.json", "rank0.jsonl"]


def test_finish_merges_in_input_order_without_the_skipped_and_removes_the_journal(tmp_path, capsys) -> None:
    out = tmp_path / "results.jsonl"
    ident = job_identity(["a", "b", "c"], {})
    rank0, rank1 = Journal(out, ident, Shard(0, 2), lazy=True), Journal(out, ident, Shard(1, 2), lazy=True)
    assert finish(rank1, 3, lambda records: pytest.fail("only rank 0 merges")) is False
    rank1.add(1, {SKIPPED: True})
    rank0.add(2, {"v": 2})
    rank0.add(0, {"v": 0})
    merged = []
    assert finish(rank0, 3, merged.extend) is True
    assert merged == [{"index": 0, "v": 0}, {"index": 2, "v": 2}] and not parts_folder(out).exists()


def test_batches_and_refusing_several_processes() -> None:
    assert list(batches(iter([0, 2, 4, 6, 8]), 2)) == [[0, 2], [4, 6], [8]]
    refuse_several_processes(Shard(0, 1), "stdout")
    with pytest.raises(JobError, match="WORLD_SIZE=2: give --out"):
        refuse_several_processes(Shard(1, 2), "give --out")
